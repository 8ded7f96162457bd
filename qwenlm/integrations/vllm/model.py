"""Qwen v1 (`QWenLMHeadModel`) as a vLLM model, with Qwen's LogN and dynamic NTK.

vLLM dropped Qwen v1 after 0.23 and never had its long-context rules. This class builds the model from
vLLM's tensor-parallel layers (fused QKV from `c_attn`; `w2` the gate and `w1` the up projection merged into
one `gate_up_proj`), supports pipeline parallelism and vLLM's quantization configs (GPTQ int4/int8), and
loads the original tensor names (sharded safetensors or `pytorch_model.bin`). The math is qwenlm's:

- LogN: each query is scaled by `logn_factors(position)`, a function of its absolute position only, so it
  is exact under continuous batching, chunked prefill, prefix caching and any parallelism.
- NTK: RoPE uses a fixed alpha per engine (`hf_overrides={"qwenlm_ntk_alpha": 3}`, default 1) through
  `rope_inv_freq`, the function qwenlm's own model calls. Qwen picks alpha per request from the prompt
  length; `qwenlm serve --backend vllm` runs one engine per alpha and routes requests (see routing.py).
- The logits of the padded vocabulary rows (ids the tokenizer does not have) are -inf, as qwenlm samples.

Registered with vLLM by `qwenlm.integrations.vllm.register()` (the `vllm.general_plugins` entry point).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP, SupportsQuant
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from ...generation.generate import QWEN_VOCAB_SIZE
from ...model.blocks import logn_factors, rope_inv_freq
from ...model.config import QwenConfig
from .hf_config import qwen_config
from .routing import ALPHA_KEY, ROUTED_KEY, check_engine_alpha
from .weights import PACKED_MODULES, vllm_weight_name

logger = init_logger(__name__)


class QWenRotaryEmbedding(RotaryEmbedding):
    """vLLM's RoPE with Qwen's NTK-stretched base for one fixed alpha (qwenlm's `rope_inv_freq`)."""

    def __init__(self, config: QwenConfig, alpha: float, max_position: int, dtype: torch.dtype) -> None:
        self.alpha = alpha  # read by _compute_inv_freq, which the base constructor calls
        super().__init__(config.head_dim, config.rotary_dim, max_position, config.rotary_emb_base, True, dtype)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return rope_inv_freq(self.rotary_dim, base, self.alpha)


class QWenAttention(nn.Module):
    def __init__(self, config: QwenConfig, alpha: float, max_position: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:  # fmt: skip
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.head_dim
        tp = get_tensor_model_parallel_world_size()
        if heads % tp:
            raise ValueError(f"num_attention_heads ({heads}) must be divisible by tensor_parallel_size ({tp})")
        self.num_heads = heads // tp
        # c_attn rows are [Q | K | V] of all heads, exactly QKVParallelLinear's layout; always with a bias.
        self.c_attn = QKVParallelLinear(config.hidden_size, head_dim, heads, heads, bias=True,
                                        quant_config=quant_config, prefix=f"{prefix}.c_attn")  # fmt: skip
        self.c_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=not config.no_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.c_proj")  # fmt: skip
        self.rotary_emb = QWenRotaryEmbedding(config, alpha, max_position, torch.get_default_dtype())
        self.logn_length = config.seq_length if config.use_logn_attn else None
        self.attn = Attention(self.num_heads, head_dim, head_dim**-0.5, num_kv_heads=self.num_heads,
                              cache_config=cache_config, quant_config=quant_config,
                              prefix=f"{prefix}.attn")  # fmt: skip

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(x)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.logn_length is not None:  # per token, from its absolute position (1 up to seq_length)
            q = q * logn_factors(positions, self.logn_length).to(q.dtype)[:, None]
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class QWenMLP(nn.Module):
    def __init__(self, config: QwenConfig, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        width = config.mlp_width
        # shard 0 = w2, the GATE (SiLU goes on it), shard 1 = w1: SiluAndMul computes silu(x[:F]) * x[F:]
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [width, width], bias=not config.no_bias, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )  # fmt: skip
        self.c_proj = RowParallelLinear(width, config.hidden_size, bias=not config.no_bias, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")  # fmt: skip
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.c_proj(self.act(gate_up))
        return out


class QWenBlock(nn.Module):
    def __init__(self, config: QwenConfig, alpha: float, max_position: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:  # fmt: skip
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, alpha, max_position, cache_config, quant_config, f"{prefix}.attn")
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if residual is None:
            residual, x = x, self.ln_1(x)
        else:
            x, residual = self.ln_1(x, residual)
        x = self.attn(positions, x)
        x, residual = self.ln_2(x, residual)
        return self.mlp(x), residual


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class QWenModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = qwen_config(vllm_config.model_config.hf_config)
        alpha = engine_alpha(vllm_config)
        max_position = max(vllm_config.model_config.max_model_len, config.seq_length)
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        pp = get_pp_group()
        self.wte = (
            VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.wte"
            )  # fmt: skip
            if pp.is_first_rank
            else PPMissingLayer()
        )
        self.start_layer, self.end_layer, self.h = make_layers(
            config.num_hidden_layers,
            lambda prefix: QWenBlock(config, alpha, max_position, cache_config, quant_config, prefix),
            prefix=f"{prefix}.h",
        )
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:  # fmt: skip
        if get_pp_group().is_first_rank:
            x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            assert intermediate_tensors is not None
            x, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for block in islice(self.h, self.start_layer, self.end_layer):
            x, residual = block(positions, x, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": x, "residual": residual})
        x, _ = self.ln_f(x, residual)
        return x


class QWenLMHeadModel(nn.Module, SupportsPP, SupportsQuant):
    packed_modules_mapping = PACKED_MODULES

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = qwen_config(vllm_config.model_config.hf_config)
        check_context(vllm_config, config)
        self.config = vllm_config.model_config.hf_config
        self.quant_config = vllm_config.quant_config
        self.transformer = QWenModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))  # fmt: skip
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.vocab_limit = min(config.vocab_size, QWEN_VOCAB_SIZE)  # rows past the tokenizer's ids: never sampled
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:  # fmt: skip
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None:
            logits[..., self.vocab_limit :] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load original checkpoint tensors (names mapped by `vllm_weight_name`); returns the params loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        if self.quant_config is not None:  # what the quantization method does not load (e.g. GPTQ's g_idx)
            mapper = self.quant_config.get_checkpoint_weight_mapper() | self.quant_config.get_cache_scale_mapper()
            weights = mapper.apply(weights)
        for name, tensor in weights:
            target = vllm_weight_name(name)
            if target is None:
                continue
            param_name, shard = target
            if is_pp_missing_parameter(param_name, self):
                continue  # another pipeline stage holds it
            if param_name not in params:
                if param_name.endswith(".bias"):
                    continue  # GPTQ exporters write zero biases for layers that have none
                raise ValueError(
                    f"checkpoint tensor {name!r} has no place in a Qwen v1 model (expected the names of a Qwen v1 "
                    "checkpoint: transformer.wte, transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.w1,mlp.w2,"
                    "mlp.c_proj}, transformer.ln_f, lm_head)"
                )
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(param_name)
        return loaded


def engine_alpha(vllm_config: VllmConfig) -> float:
    """This engine's fixed NTK alpha: `hf_overrides={"qwenlm_ntk_alpha": a}`, default 1."""
    return getattr(vllm_config.model_config.hf_config, ALPHA_KEY, 1)


def check_context(vllm_config: VllmConfig, config: QwenConfig) -> None:
    """Refuse what Qwen cannot run, and warn when this engine's RoPE differs from Qwen's for some prompts."""
    max_model_len = vllm_config.model_config.max_model_len
    if max_model_len > config.max_context_length:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds Qwen's context of {config.max_context_length} tokens "
            f"(seq_length={config.seq_length}; with dynamic NTK / LogN the reference stops at its 32K LogN table)"
        )
    routed = bool(getattr(vllm_config.model_config.hf_config, ROUTED_KEY, False))
    note = check_engine_alpha(engine_alpha(vllm_config), config.seq_length, max_model_len, config.use_dynamic_ntk,
                              routed)  # fmt: skip
    if note:
        logger.warning("qwenlm: %s", note)
