"""The Qwen v1 block math, top to bottom: norm -> RoPE/NTK/LogN -> attention -> MLP -> block.

Module and parameter names equal the checkpoint's tensor names (`attn.c_attn`, `mlp.w1`, ...). These parts
sit below `qwen.py`'s whole model so that generation's fused step and static cache, which read and run the
blocks' math, need not import the model class (whose chat/generate conveniences call up into them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from .config import QwenConfig
from .kv_cache import KVCache, dequantize_kv, quantize_kv
from .paged_kv_cache import PagedBatch


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
