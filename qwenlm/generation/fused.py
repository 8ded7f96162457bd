"""The fused CPU decode step: a whole one-token forward (every layer, the final norm and lm_head) as one native
call per step, for single-sequence decoding.

    decoder = fused_decoder(model, cache)          # after the prefill; None when the model is not covered
    logits = decoder(token)                        # [1, 1, V], as model([[token]], past_key_values=cache).logits
    next_token = decoder.argmax(token)             # greedy decoding: the argmax of those logits, as an int
    step = fused_step(model, pool)                 # the serving engine's paged cache (one running sequence)
    logits = step.paged(token, pool, block_ids, position, alpha)

The Python forward spends ~15 tensor ops per layer on a token, and on the CPU their dispatch (~5 ms per 1.8B
step) is a sizeable part of a step whose weight reads take 30-100 ms. `DecodePlan` (kernels/cpu_step.cpp) runs
the same ops in C++ over the same kernels, in the same order with the same roundings: its logits equal the
forward's bit for bit, in fp32 and bf16, dense or int8/int4 weight-only.

Covered: batch 1, bf16/fp32, every module on the CPU, qwenlm's kernels loaded, inference (no gradients),
`Linear`/`QuantLinear` layers the kernels take, an `nn.Embedding` or `QuantEmbedding` token embedding (the
step looks its row up itself), the sdpa attention setting, no module hooks, a float cache.
Anything else (int8 KV cache, padded batches, CUDA, several devices, training, eager attention, adapters that
wrap the linears) keeps the Python forward; `unsupported_reason` says why. QWENLM_FUSED_DECODE=0 turns it off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .. import kernels
from ..kernels import QuantizedWeight
from ..model.blocks import Linear, QWenAttention, QWenBlock, QWenMLP, RMSNorm, rope_inv_freqs
from ..model.config import ContextLengthError
from ..model.kv_cache import KVCache
from ..model.paged_kv_cache import PagedKVCache
from ..quant.embedding import QuantEmbedding
from ..quant.linear import QuantLinear

_DENSE, _INT8, _INT4, _INT6 = 0, 1, 2, 3
_QUANT_KIND = {8: _INT8, 6: _INT6, 4: _INT4}  # cpu_step.cpp's LinearSpec::Kind by bits
_DENSE_DTYPES = ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32))


def fused_enabled() -> bool:
    """False when QWENLM_FUSED_DECODE is 0/false/off (read per generation, so tests and benchmarks can compare)."""
    return os.environ.get("QWENLM_FUSED_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


def _linear_reason(module: nn.Module, dtype: torch.dtype) -> str | None:
    """Why `module` would not run the kernel the Python forward runs for one row (None: it would)."""
    if type(module) is Linear:
        if not module.use_kernels:
            return "the kernels are turned off on a linear layer"
        if (dtype, module.weight.dtype) not in _DENSE_DTYPES or not module.weight.is_contiguous():
            return f"a {module.weight.dtype} linear weight under a {dtype} model"
        return None
    if type(module) is QuantLinear:
        qw = module.qweight()
        if not module.use_kernels:
            return "the kernels are turned off on a quantized linear layer"
        if not qw.kernel_compatible or kernels.QUANT_MAX_ROWS.get((qw.bits, dtype), 0) < 1:
            return f"an int{qw.bits} layout the kernels do not take (group {qw.group_size})"
        return None
    return f"a {type(module).__name__} layer (only qwenlm's Linear and QuantLinear are fused)"


def _linear_args(module: nn.Module, dtype: torch.dtype) -> tuple[list[int], list[Tensor]]:
    """A layer as DecodePlan reads it (cpu_step.cpp's Reader.linear): ints kind, has_bias, has_perm, group,
    in_features; tensors weight | (codes, scales, zeros), then bias and perm if present. The bias is passed
    as the Python wrappers pass it (QuantLinear casts it to x's dtype first)."""
    if type(module) is Linear:
        bias = module.bias
        ints = [_DENSE, bias is not None, False, 0, module.in_features]
        return ints, [module.weight] + ([bias] if bias is not None else [])
    qw = module.qweight()
    bias, perm = module._buffers["bias"], module._buffers["perm"]
    ints = [_QUANT_KIND[qw.bits], bias is not None, perm is not None, qw.kernel_group, qw.in_features]
    tensors = kernels.plan_weight(qw)
    tensors += [bias.to(dtype)] if bias is not None else []
    return ints, tensors + ([perm] if perm is not None else [])


def _embedding_weight(module: nn.Module, dtype: torch.dtype) -> Tensor | QuantizedWeight | None:
    """The token embedding as DecodePlan looks rows up in it (a dense table in the model dtype, or int8/int4 codes
    in a layout the dequantize kernel takes), or None when the fused step does not take it."""
    if type(module) is nn.Embedding:
        weight = module.weight
        return weight if weight.dtype == dtype and weight.dim() == 2 and weight.stride(1) == 1 else None
    if type(module) is QuantEmbedding and module.dtype == dtype:
        qw = QuantizedWeight(module.qdata, module.scales.float(), module.zeros, module.bits, module.group_size,
                             module.embedding_dim)  # fmt: skip
        return qw if qw.kernel_compatible else None
    return None


def _model_reason(model) -> str | None:
    """Why the fused step cannot run `model` whatever the cache (None: it can)."""
    if not fused_enabled():
        return "QWENLM_FUSED_DECODE=0"
    if model.training:
        return "the model is in training mode"
    dtype = model.dtype
    if dtype not in (torch.bfloat16, torch.float32):
        return f"model dtype {dtype} (bf16 and fp32 are fused)"
    if not kernels.layer_kernels_available():
        return f"qwenlm's CPU kernels are not available ({kernels.kernels_status()})"
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return "gradients are enabled"
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return "global module hooks are registered"
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a forward hook on {type(module).__name__}"
        tensors = (*module._parameters.values(), *module._buffers.values())
        if any(t is not None and t.device.type != "cpu" for t in tensors):
            return "a module is not on the CPU"
    norms = [model.transformer.ln_f]
    for block in model.transformer.h:
        if (type(block), type(block.attn), type(block.mlp)) != (QWenBlock, QWenAttention, QWenMLP):
            return f"a modified block ({type(block).__name__})"
        if not block.attn.use_sdpa:
            return "the eager attention implementation was selected"
        norms += [block.ln_1, block.ln_2]
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.w1, block.mlp.w2, block.mlp.c_proj):
            reason = _linear_reason(layer, dtype)
            if reason is not None:
                return reason
    if any(type(n) is not RMSNorm or n.weight.dtype != dtype or n.eps != norms[0].eps for n in norms):
        return "a norm the fused step does not take"
    if _embedding_weight(model.transformer.wte, dtype) is None:
        return f"a {type(model.transformer.wte).__name__} token embedding the fused step does not take"
    reason = _linear_reason(model.lm_head, dtype)
    if reason is None and not kernels.fused_step_available():
        return "the fused step's library is not available (see the log)"
    return reason


def unsupported_reason(model, cache: KVCache | PagedKVCache) -> str | None:
    """Why the fused step cannot run `model` on `cache`, a one-row KVCache after its prefill or the engine's
    paged pool (None: it can)."""
    if type(cache) is KVCache:
        if cache.quantized or cache.batch_size != 1:
            return "only a float KVCache of one row is fused"
        if cache.ntk_alpha is None:
            return "the cache holds no prefill"
    elif type(cache) is not PagedKVCache or cache.quantized:
        return "only a float KVCache or PagedKVCache is fused"
    if cache.dtype != model.dtype or any(t.device.type != "cpu" for t in (*cache.keys, *cache.values)):
        return f"a {cache.dtype} cache off the CPU or in another dtype than the model's ({model.dtype})"
    return _model_reason(model)


class FusedStep:
    """`model`'s one-token forward as a DecodePlan over its tensors (shared by every cache it runs on)."""

    def __init__(self, model) -> None:
        config = model.config
        ints = [config.num_hidden_layers, config.num_attention_heads, config.head_dim, config.use_logn_attn,
                config.seq_length]  # fmt: skip
        tensors: list[Tensor] = []
        embedding = _embedding_weight(model.transformer.wte, model.dtype)
        if isinstance(embedding, QuantizedWeight):
            ints += [embedding.bits, embedding.kernel_group, embedding.in_features]
            tensors += kernels.plan_weight(embedding)
        else:
            ints += [0, 0, config.hidden_size]
            tensors.append(embedding)

        def add(layer: nn.Module) -> None:
            layer_ints, layer_tensors = _linear_args(layer, model.dtype)
            ints.extend(int(v) for v in layer_ints)
            tensors.extend(layer_tensors)

        for block in model.transformer.h:
            tensors.append(block.ln_1.weight)
            add(block.attn.c_attn)
            add(block.attn.c_proj)
            tensors.append(block.ln_2.weight)
            add(block.mlp.w1)
            add(block.mlp.w2)
            add(block.mlp.c_proj)
        tensors.append(model.transformer.ln_f.weight)
        add(model.lm_head)
        self.plan = kernels.decode_plan(tensors, ints, [model.transformer.ln_f.eps])
        self.model = model
        self.limit = config.max_context_length
        self._inv_freqs: dict[float, Tensor] = {}
        self._bound: tuple[Tensor, ...] | None = None  # first and last key and value buffers bound to the plan

    def _bind(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """Bind the plan to these buffers unless it already is (a KVCache replaces them all when it grows)."""
        ends = (keys[0], keys[-1], values[0], values[-1])
        if self._bound is None or any(a is not b for a, b in zip(ends, self._bound, strict=True)):
            self.plan.bind(keys, values)
            self._bound = ends

    def _check(self, position: int) -> None:
        if position + 1 > self.limit:
            raise ContextLengthError(
                f"sequence of {position + 1} tokens does not fit the model's context of {self.limit} tokens"
            )

    def _next_position(self, cache: KVCache) -> int:
        """The position the next token takes in `cache`, with room made for it and the plan bound to it."""
        position = cache.length
        self._check(position)
        cache.reserve(position + 1)
        self._bind(cache.keys, cache.values)
        return position

    def contiguous(self, token: int, cache: KVCache, inv_freq: Tensor) -> Tensor:
        """Logits [1, 1, V] of `token` after cache.length tokens, which it advances by one."""
        position = self._next_position(cache)
        logits = self.plan.step(token, position, inv_freq)
        cache.length = position + 1
        return logits.view(1, 1, -1)

    def contiguous_argmax(self, token: int, cache: KVCache, inv_freq: Tensor, limit: int | None = None) -> int:
        """The greedy next token after `token`: `sampling.argmax` of contiguous()'s logits[..., :limit]."""
        position = self._next_position(cache)
        next_token = self.plan.step_argmax(token, position, inv_freq, limit or 0)
        cache.length = position + 1
        return next_token

    def _paged_args(self, pool: PagedKVCache, block_ids: list[int], position: int,
                    alpha: float) -> tuple[Tensor, Tensor]:  # fmt: skip
        """inv_freq for `alpha` and the block table, with the plan bound to `pool`."""
        self._check(position)
        inv_freq = self._inv_freqs.get(alpha)
        if inv_freq is None:
            inv_freq = self._inv_freqs[alpha] = rope_inv_freqs(self.model.config, torch.tensor([float(alpha)]))
        self._bind(pool.keys, pool.values)
        return inv_freq, torch.tensor([block_ids], dtype=torch.int32)

    def paged(self, token: int, pool: PagedKVCache, block_ids: list[int], position: int, alpha: float) -> Tensor:
        """Logits [1, 1, V] of `token` at `position` of the sequence whose blocks are block_ids (the block the new
        token goes to included), with its prefill's NTK alpha."""
        inv_freq, table = self._paged_args(pool, block_ids, position, alpha)
        return self.plan.step_paged(token, position, inv_freq, table).view(1, 1, -1)

    def paged_argmax(self, token: int, pool: PagedKVCache, block_ids: list[int], position: int, alpha: float,
                     limit: int | None = None) -> int:  # fmt: skip
        """The greedy next token: `sampling.argmax` of paged()'s logits[..., :limit]."""
        inv_freq, table = self._paged_args(pool, block_ids, position, alpha)
        return self.plan.step_paged_argmax(token, position, inv_freq, table, limit or 0)

    def profile(self, enabled: bool = True) -> dict[str, float] | None:
        """Start timing the step's parts (enabled) or stop and return mean ms per step spent in the linear
        kernels, in attention (cache writes included) and in everything else (norms, RoPE, adds, SiLU, calls)."""
        if enabled:
            self.plan.set_profiling(True)
            return None
        steps, linear, attention, other = self.plan.profile()
        self.plan.set_profiling(False)
        per_step = 1e3 / max(steps, 1)
        return {"steps": steps, "linear_ms": linear * per_step, "attention_ms": attention * per_step,
                "other_ms": other * per_step}  # fmt: skip


def fused_step(model, cache: KVCache | PagedKVCache) -> FusedStep | None:
    """The FusedStep of `model` for `cache`, or None when `unsupported_reason` finds one."""
    return FusedStep(model) if unsupported_reason(model, cache) is None else None


class FusedDecoder:
    """One-token steps of a model on one KVCache (after its prefill, whose NTK alpha it keeps, as the forward
    does); `cache.length` advances as the forward's does."""

    def __init__(self, step: FusedStep, cache: KVCache) -> None:
        self.step, self.cache = step, cache
        self.inv_freq = rope_inv_freqs(step.model.config, cache.ntk_alpha)

    def __call__(self, token: int) -> Tensor:
        """Logits [1, 1, V] (model dtype) of `token` after the cached tokens."""
        return self.step.contiguous(token, self.cache, self.inv_freq)

    def argmax(self, token: int, limit: int | None = None) -> int:
        """The greedy token after `token` among the first `limit` ids (all when None), without the logits."""
        return self.step.contiguous_argmax(token, self.cache, self.inv_freq, limit)


def fused_decoder(model, cache: KVCache) -> FusedDecoder | None:
    """A FusedDecoder for `model` on `cache` (after its prefill), or None when `unsupported_reason` finds one."""
    step = fused_step(model, cache)
    return FusedDecoder(step, cache) if step is not None else None
