"""The Qwen v1 model math, top to bottom: norm -> RoPE/NTK/LogN -> attention -> MLP -> block -> model.

Module and parameter names equal the checkpoint's tensor names (`transformer.h.0.attn.c_attn`,
`mlp.w1`, ...), so a released state dict loads strictly with no renaming:

    model = QWenLMHeadModel(config)
    logits = model(input_ids).logits                  # [B, T, vocab_size]
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from .config import QwenConfig
from .kv_cache import KVCache, dequantize_kv, quantize_kv
from .paged_kv_cache import PagedBatch


class ContextLengthError(ValueError):
    """The sequence does not fit the model's context."""


# --------------------------------------------------------------------------------------------------
# Linear and norm
# --------------------------------------------------------------------------------------------------
class Linear(nn.Linear):
    """nn.Linear whose few-row products (decoding) run on qwenlm's CPU matrix-vector kernels.

    Stock PyTorch reads weights at a fraction of memory bandwidth when x has one row; the kernels stream
    them (fp32 accumulate, any dtype mix qwenlm uses). Large inputs, GPUs and training use F.linear.
    """

    use_kernels: bool = True  # per module; QWenLMHeadModel.use_kernels() flips them all

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernels:
            return kernels.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------------
# Norm
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back to the activation dtype *before* the weight (spec 2.3).
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one op: the same math, fewer dispatches per token.
        if x.dtype == self.weight.dtype and kernels.fusable(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)  # decoding on CPU: the same steps in one call
        if x.dtype == torch.float32:  # skip two no-op casts: every dispatch counts when decoding
            return F.rms_norm(x, self.weight.shape, eps=self.eps) * self.weight
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


# --------------------------------------------------------------------------------------------------
# Positions: RoPE, dynamic NTK, LogN
# --------------------------------------------------------------------------------------------------
def ntk_alpha(length: int, seq_length: int) -> int:
    """Dynamic-NTK alpha for `length` tokens (spec 2.5.4): 1 up to seq_length, then 3, 7, 15, ..."""
    context_value = math.log(length / seq_length, 2) + 1  # math.log(x, 2), as the reference computes it
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_alphas(config: QwenConfig, total_length: int, attention_mask: Tensor | None, batch: int) -> Tensor:
    """One alpha per row: from each row's real (unpadded) length when a mask is given and the
    padded length passes seq_length, else one alpha from the padded length for all rows."""
    if attention_mask is not None and total_length > config.seq_length:
        lengths = attention_mask.sum(dim=-1).tolist()
        return torch.tensor([float(ntk_alpha(int(n), config.seq_length)) for n in lengths])
    return torch.full((batch,), float(ntk_alpha(total_length, config.seq_length)))


def rope_inv_freq(rotary_dim: int, base: float, alpha: float) -> Tensor:
    """Inverse frequencies [rotary_dim/2] in fp32, with the base stretched by NTK alpha."""
    if alpha != 1:
        base = base * alpha ** (rotary_dim / (rotary_dim - 2))
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))


def rope_cos_sin(config: QwenConfig, alphas: Tensor, start: int | Tensor, length: int) -> tuple[Tensor, Tensor]:
    """cos, sin for absolute positions [start, start+length): shape [B or 1, 1, length, rotary_dim].

    `start` is one int for the whole batch or a [B] tensor (rows of a continuous batch sit at different
    positions). Positions count from the first (possibly padded) slot, as in the reference.
    """
    return rope_cos_sin_at(_positions(start, length), rope_inv_freqs(config, alphas))


def rope_inv_freqs(config: QwenConfig, alphas: Tensor) -> Tensor:
    """Inverse frequencies for per-row NTK alphas [B]: [1, rotary_dim/2] when all rows share one alpha
    (broadcast), else [B, rotary_dim/2]; fp32 on the CPU."""
    unique, row_table = alphas.unique(return_inverse=True)  # a batch holds only a few distinct alphas
    tables = torch.stack([rope_inv_freq(config.rotary_dim, config.rotary_emb_base, float(a)) for a in unique])
    return tables if len(unique) == 1 else tables[row_table]


def rope_cos_sin_at(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [B|1, 1, S, rotary_dim] at absolute positions (S,) or (B, S) for inv_freq [B|1, d/2].

    Pure tensor math on the inputs' device, no host work: a captured decode step calls it too.
    """
    S = positions.shape[-1]
    freqs = positions.float().view(-1, S, 1) * inv_freq[:, None, :]  # (B|1, S, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B|1, 1, S, d): dims j and j+d/2 share a freq
    return emb.cos(), emb.sin()


def _positions(start: int | Tensor, length: int) -> Tensor:
    """Absolute positions of the new tokens: (S,) for one start, (B, S) for per-row starts."""
    if isinstance(start, int):
        return torch.arange(start, start + length)
    return start.long().cpu()[:, None] + torch.arange(length)[None, :]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first rotary_dim dims of each head (NeoX halves convention), in fp32."""
    fits = x.dim() == 4 and cos.dim() == 4 and cos.shape[2] == x.shape[2] and cos.shape[0] in (1, x.shape[0])
    if fits and cos.dtype == torch.float32 and x.stride(-1) == 1 and kernels.fusable(x, cos):
        return kernels.rope(x, cos, sin)  # decoding on CPU: the same operations in one call
    d = cos.shape[-1]
    xf = x if x.dtype == torch.float32 else x.float()
    if d == x.shape[-1]:
        rotated = xf * cos + rotate_half(xf) * sin
    else:  # rotary_pct < 1: the rest of the head passes through
        rotated = torch.cat((xf[..., :d] * cos + rotate_half(xf[..., :d]) * sin, xf[..., d:]), dim=-1)
    return rotated if rotated.dtype == x.dtype else rotated.type_as(x)


def logn_scale(start: int | Tensor, length: int, seq_length: int) -> Tensor:
    """LogN query factors for absolute positions [start, start+length) (spec 2.5.5): (S,) or (B, S).

    A factor differs from 1 only where position + 1 > seq_length, which implies the reference's
    condition (total key length > seq_length), so no separate check is needed.
    """
    return logn_factors(_positions(start, length), seq_length)


def logn_factors(positions: Tensor, seq_length: int) -> Tensor:
    """LogN query factors at absolute 0-based positions (any shape, on their device): log_seq_length(p + 1)
    past seq_length, else exactly 1."""
    n = positions.double() + 1  # 1-based positions
    scale = torch.where(n > seq_length, torch.log(n) / math.log(seq_length), torch.ones_like(n))
    return scale.float()


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def attention_bias(attention_mask: Tensor | None, start: int | Tensor, length: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:  # fmt: skip
    """Additive mask [B|1, 1, S, T]: 0 where allowed, finfo.min where masked (spec 2.5.6).

    The causal part is offset by each row's `start`, so a multi-token chunk on top of a cache only sees
    its own past (the reference applies no causal mask at all there), and in a continuous batch a row
    never sees the unused cache slots past its own end.
    """
    q_pos = _positions(start, length).to(device)  # (S,) or (B, S)
    total = int(q_pos.max()) + 1
    allowed = torch.arange(total, device=device) <= q_pos[..., None]  # (S, T) or (B, S, T)
    allowed = allowed.view(-1, 1, length, total)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def needs_bias(attention_mask: Tensor | None, start: int | Tensor, length: int) -> bool:
    """False when SDPA needs no explicit mask: one-token decode, or an unpadded prefill (is_causal)."""
    if not isinstance(start, int):
        return True  # rows at different positions
    return attention_mask is not None or (start > 0 and length > 1)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, softmax_in_fp32: bool = True) -> Tensor:
    """Plain softmax(QK^T/sqrt(D) + bias) V; the reference path SDPA is tested against."""
    S, T = q.shape[2], k.shape[2]
    if bias is None and S > 1:
        bias = attention_bias(None, T - S, S, q.dtype, q.device)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, n, S, T)
    if bias is not None:
        scores = scores + bias
    probs = scores.float().softmax(-1) if softmax_in_fp32 else scores.softmax(-1)
    return probs.to(v.dtype) @ v


@dataclass
class _Step:
    """What every layer needs about the current forward call, computed once per device."""

    cos: Tensor
    sin: Tensor
    bias: Tensor | None
    logn: Tensor | None  # query factors broadcastable to (B, n, S, 1), or None when LogN is off
    start: int | Tensor  # tokens already cached: one int, or per row (continuous batching)
    cache: KVCache | PagedBatch | None


class QWenAttention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attn_dropout_prob
        self.softmax_in_fp32 = config.softmax_in_fp32
        self.use_sdpa = True  # False: eager_attention, the reference path for tests
        # int8 K/V (spec 2.10); the cache object decides when there is one, this flag when there is none
        self.use_cache_quantization = config.use_cache_quantization
        projection = config.kv_channels * config.num_attention_heads
        self.c_attn = Linear(config.hidden_size, 3 * projection)  # fused QKV, always with bias
        self.c_proj = Linear(projection, config.hidden_size, bias=not config.no_bias)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, n, S, D) of x (B, S, H), with RoPE applied to q and k."""
        B, S, _ = x.shape
        # c_attn rows are [Q | K | V], each split into heads of head_dim rows.
        qkv = self.c_attn(x).view(B, S, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, n, S, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def merge(self, y: Tensor) -> Tensor:
        """The attention output (B, n, S, D) with its heads merged, through c_proj: (B, S, H)."""
        B, _, S, _ = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim))

    def forward(self, x: Tensor, step: _Step) -> Tensor:
        S = x.shape[1]
        q, k, v = self.project(x, step.cos, step.sin)
        if step.logn is not None:
            q = q * step.logn.type_as(q)
        cache = step.cache
        if cache is not None and cache.paged and S == 1 and self.use_sdpa and not cache.quantized:
            # The serving engine's paged cache: one-token rows read K/V through their block tables (no gather).
            return self.merge(cache.decode_attention(self.layer_idx, q, k, v))
        if cache is not None:
            quantized = cache.quantized
            k, v = cache.update(self.layer_idx, k, v, step.start)  # (B, n, T, D), keys post-RoPE
        else:  # the reference quantises K/V whenever the flag is on, cache or not (not when training)
            quantized = self.use_cache_quantization and not self.training
            if quantized:
                k, v = dequantize_kv(*quantize_kv(k)), dequantize_kv(*quantize_kv(v))
        if self.use_sdpa and not quantized and S == 1 and q.device.type == "cpu":
            # One query token per row (masked rows too, in a continuous batch): qwenlm's CPU kernel.
            y = kernels.decode_attention(q, k, v, step.bias)
        elif self.use_sdpa and not quantized:  # an int8 cache takes the reference's manual path
            is_causal = step.bias is None and S > 1
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.bias, is_causal=is_causal, dropout_p=dropout)
        else:
            y = eager_attention(q, k, v, step.bias, self.softmax_in_fp32)
        return self.merge(y)


# --------------------------------------------------------------------------------------------------
# MLP and block
# --------------------------------------------------------------------------------------------------
class QWenMLP(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        width = config.mlp_width  # intermediate_size // 2: config.json counts both branches
        self.w1 = Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: Tensor) -> Tensor:
        # w2 is the GATE (SiLU goes on w2, not w1): LLaMA's gate_proj = w2, up_proj = w1.
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x: Tensor, step: _Step) -> Tensor:
        x = x + self.attn(self.ln_1(x), step)
        return x + self.mlp(self.ln_2(x))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@dataclass
class CausalLMOutput:
    """What `forward` returns; field names follow transformers so existing code keeps working."""

    logits: Tensor | None  # [B, S or logits_to_keep, vocab_size], in the model dtype; None with return_logits=False
    past_key_values: KVCache | None = None
    hidden_states: Tensor | None = None  # final-norm output, [B, S, H]

    def __getitem__(self, index: int):  # outputs[0] is the logits, as with a transformers ModelOutput
        return (self.logits, self.past_key_values)[index]


class QWenModel(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


def _device_of(module: nn.Module) -> torch.device:
    """Where a module's tensors live (a quantized linear has buffers rather than a `weight`)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


class QWenLMHeadModel(nn.Module):
    """Qwen v1 causal LM. `forward` follows the transformers calling convention."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = QWenModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)  # untied
        self.generation_config = None  # set by the loader from generation_config.json

    @property
    def device(self) -> torch.device:
        return _device_of(self.transformer.wte)  # a quantized embedding holds buffers, not a `weight`

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (read from a norm: quantized linears hold integer weights)."""
        return self.transformer.ln_f.weight.dtype

    def use_kernels(self, enabled: bool = True) -> None:
        """Turn qwenlm's CPU decode kernels on or off (off: plain F.linear everywhere, for comparisons)."""
        for module in self.modules():
            if hasattr(module, "use_kernels") and module is not self:  # Linear and quantized linears
                module.use_kernels = enabled

    def set_attn_implementation(self, name: str) -> None:
        """'sdpa' (default, torch's fused kernels) or 'eager' (the plain reference path)."""
        if name not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {name!r}")
        for block in self.transformer.h:
            block.attn.use_sdpa = name == "sdpa"

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        cache_positions: Tensor | list[int] | None = None,
        logits_positions: Tensor | list[int] | None = None,
        return_logits: bool = True,
        **ignored,  # position_ids, token_type_ids, return_dict...: accepted, unused (as in the reference)
    ) -> CausalLMOutput:
        """Run S new tokens on top of `past_key_values` (which is filled in place).

        Args:
            input_ids: [B, S] token ids (or `inputs_embeds` [B, S, H]).
            attention_mask: [B, P+S], 1 for real tokens and 0 for padding, covering cached tokens too.
            past_key_values: a KVCache holding P tokens, or None.
            use_cache: make a cache when none is given (default: config.use_cache).
            logits_to_keep: if > 0, compute logits only for the last N positions.
            cache_positions: per-row count of tokens already in the cache, for a continuous batch whose
                rows sit at different positions (the caller tracks them; `cache.length` is left alone).
            logits_positions: per-row index in [0, S) whose logits to compute (right-padded chunks of
                different lengths); logits come back as [B, 1, V].
            return_logits: False skips lm_head (logits None): training computes its loss from
                `hidden_states` in chunks, and even one position's logits cost a pass over the 151,936-row head.
        """
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        cache = past_key_values
        if cache is None and (self.config.use_cache if use_cache is None else use_cache) and not self.training:
            cache = KVCache.for_model(self, batch_size=B, capacity=S)
        start: int | Tensor
        if cache_positions is not None:
            if cache is None:
                raise ValueError("cache_positions needs past_key_values")
            rows = torch.as_tensor(cache_positions, dtype=torch.long).cpu()
            start = int(rows[0]) if bool((rows == rows[0]).all()) else rows
        else:
            start = cache.length if cache is not None else 0
        total = start + S if isinstance(start, int) else int(start.max()) + S
        self._check_lengths(B, total, attention_mask, cache)
        if cache is not None:
            cache.reserve(total)

        # NTK alpha is chosen at prefill and kept while decoding; training never uses NTK or LogN.
        # A cache carries the alpha of its prefill (or one preset by a caller doing chunked prefill).
        inference = not self.training
        if cache is not None and cache.ntk_alpha is not None:
            alphas = cache.ntk_alpha
        elif inference and self.config.use_dynamic_ntk:
            alphas = ntk_alphas(self.config, total, attention_mask, B)
        else:
            alphas = torch.ones(B)
        if cache is not None:
            cache.ntk_alpha = alphas
        use_logn = inference and self.config.use_logn_attn and total > self.config.seq_length
        cos, sin = rope_cos_sin(self.config, alphas, start, S)
        logn = logn_scale(start, S, self.config.seq_length).view(-1, 1, S, 1) if use_logn else None

        with_bias = needs_bias(attention_mask, start, S)
        steps: dict[torch.device, _Step] = {}
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            device = block.ln_1.weight.device  # layers may sit on different GPUs (device_map="auto")
            if device not in steps:
                steps[device] = _Step(
                    cos=cos.to(device), sin=sin.to(device),
                    bias=attention_bias(attention_mask, start, S, x.dtype, device) if with_bias else None,
                    logn=logn.to(device) if logn is not None else None, start=start, cache=cache,
                )  # fmt: skip
            x = block(x.to(device), steps[device])
        if cache is not None and cache_positions is None:
            cache.length = total

        x = self.transformer.ln_f(x.to(self.transformer.ln_f.weight.device))
        if not return_logits:
            return CausalLMOutput(logits=None, past_key_values=cache, hidden_states=x)
        if logits_positions is not None:
            rows = torch.arange(B, device=x.device)
            kept = x[rows, torch.as_tensor(logits_positions, device=x.device)][:, None]
        else:
            kept = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
        logits = self.lm_head(kept.to(_device_of(self.lm_head)))
        return CausalLMOutput(logits=logits, past_key_values=cache, hidden_states=x)

    def _check_lengths(self, batch: int, total: int, attention_mask: Tensor | None, cache: KVCache | None) -> None:
        limit = self.config.max_context_length
        if total > limit:
            raise ContextLengthError(
                f"sequence of {total} tokens does not fit the model's context of {limit} tokens "
                f"(seq_length={self.config.seq_length}, dynamic NTK "
                f"{'on' if self.config.use_dynamic_ntk else 'off'})"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, {total}): "
                "one entry per cached plus new token"
            )
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"past_key_values holds {cache.batch_size} rows but the input has {batch}")

    # ---- transformers / reference conveniences; the work lives in generation/ and chat.py ------
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, generation_config=None,
                 **overrides) -> Tensor:  # fmt: skip
        """Prompt + continuation ids, as transformers returns them, sampling per `generation_config`
        (default: the checkpoint's) with `overrides` (max_new_tokens, do_sample, temperature, top_k,
        top_p, repetition_penalty, eos_token_id, pad_token_id, stop_words_ids, seed)."""
        from ..generation.generate import hf_generate  # generation sits above the model

        return hf_generate(self, input_ids, attention_mask, generation_config, **overrides)

    def chat(self, tokenizer, query: str, history=None, system: str = "You are a helpful assistant.", **kwargs):
        """`(response, new_history)` for one turn; see `qwenlm.chat.chat`."""
        from ..chat import chat

        return chat(self, tokenizer, query, history, system, **kwargs)

    def chat_stream(self, tokenizer, query: str, history=None, system: str = "You are a helpful assistant.",
                    **kwargs):  # fmt: skip
        """Yield the growing response; see `qwenlm.chat.chat_stream`."""
        from ..chat import chat_stream

        return chat_stream(self, tokenizer, query, history, system, **kwargs)

    def batch_chat(self, tokenizer, queries, histories=None, system: str = "You are a helpful assistant.", **kwargs):
        """Several conversations in one batch; see `qwenlm.chat.batch_chat`."""
        from ..chat import batch_chat

        return batch_chat(self, tokenizer, queries, histories, system, **kwargs)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init of spec 2.13 (N(0, 0.02); c_proj scaled by 1/sqrt(2L); norms 1; biases 0)."""
        std = self.config.initializer_range
        proj_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, proj_std if name.endswith("c_proj.weight") else std, generator=generator)
