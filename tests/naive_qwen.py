"""A deliberately plain Qwen v1 reference forward, written from the spec alone, used as a test oracle.

It reads the raw checkpoint tensor names and the raw ``config.json`` dict and computes the logits of
one full-sequence call (a prefill, no KV cache) with inference semantics: dynamic NTK and LogN on
when the config asks for them, no dropout. It loops over layers and batch rows and favours clarity
over speed; it must never import anything from ``qwenlm.model`` (it is the thing that checks it).

    logits = naive_forward(state_dict, json.load(open("config.json")), input_ids, attention_mask)
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass

import torch

__all__ = ["NaiveConfig", "ntk_alpha", "logn_factor", "rope_inv_freq", "naive_forward"]


@dataclass(frozen=True)
class NaiveConfig:
    """The handful of ``config.json`` fields the forward needs, with the QWenConfig class defaults."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    kv_channels: int
    seq_length: int
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    layer_norm_epsilon: float = 1e-6
    no_bias: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> NaiveConfig:
        # seq_length has no default in the reference either (spec 1.2: it is required).
        fields = cls.__dataclass_fields__
        missing = [name for name in fields if fields[name].default is MISSING and name not in config]
        if missing:
            raise ValueError(f"config is missing required keys: {missing}")
        cfg = cls(**{name: config[name] for name in fields if name in config})
        if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
            raise ValueError("kv_channels * num_attention_heads must equal hidden_size")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        # Spec 2.5.2: the whole head when rotary_pct == 1, else int(kv_channels * rotary_pct).
        if self.rotary_pct == 1:
            return self.kv_channels
        return int(self.kv_channels * self.rotary_pct)


# ------------------------------------------------------------------------------------------------
# Pure helpers (spec 2.5.4 / 2.5.5)
# ------------------------------------------------------------------------------------------------


def ntk_alpha(length: int, seq_length: int) -> int:
    """Dynamic-NTK alpha for a sequence of ``length`` tokens: max(1, 2**ceil(log2(L/Ls) + 1) - 1)."""
    if length < 1:  # an all-padding row; log2(0) is undefined and the formula would give 1 anyway
        return 1
    # math.log2 (not log(x, 2)) so exact powers of two such as 16384/8192 stay exact.
    return max(1, 2 ** math.ceil(math.log2(length / seq_length) + 1) - 1)


def logn_factor(position: int, seq_length: int) -> float:
    """LogN query multiplier for absolute position ``position``: log(p+1)/log(Ls) once p+1 > Ls."""
    if position + 1 > seq_length:
        return math.log(position + 1) / math.log(seq_length)
    return 1.0


def rope_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    """inv_freq[i] = 1 / base**(2i/d_rot), i < d_rot/2, in fp32."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return 1.0 / (base**exponents)


def _rope_tables(cfg: NaiveConfig, alpha: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin of shape [length, d_rot] for positions 0..length-1 with the NTK-scaled base."""
    d_rot = cfg.rotary_dim
    base = cfg.rotary_emb_base * alpha ** (d_rot / (d_rot - 2))
    inv_freq = rope_inv_freq(base, d_rot)
    positions = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [T, d_rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # dims j and j + d_rot/2 share a frequency
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first d_rot dims of every head of x [T, n, D] (fp32 math, cast back)."""
    d_rot = cos.shape[-1]
    rot = x[..., :d_rot].float()
    c = cos[:, None, :]  # [T, 1, d_rot], broadcast over heads
    s = sin[:, None, :]
    rot = rot * c + _rotate_half(rot) * s
    return torch.cat([rot.to(x.dtype), x[..., d_rot:]], dim=-1)


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ weight.T
    return y if bias is None else y + bias


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Spec 2.3: normalise in fp32, cast back to the activation dtype, then multiply by the weight.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def _optional_bias(sd: dict[str, torch.Tensor], name: str, cfg: NaiveConfig) -> torch.Tensor | None:
    # Only c_attn always has a bias; c_proj / w1 / w2 have one iff no_bias is false.
    return None if cfg.no_bias else sd[name]


def _mlp(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, cfg: NaiveConfig) -> torch.Tensor:
    a1 = _linear(x, sd[prefix + "w1.weight"], _optional_bias(sd, prefix + "w1.bias", cfg))
    a2 = _linear(x, sd[prefix + "w2.weight"], _optional_bias(sd, prefix + "w2.bias", cfg))
    m = a1 * torch.nn.functional.silu(a2)  # SiLU on the w2 branch: w2 is the gate
    return _linear(m, sd[prefix + "c_proj.weight"], _optional_bias(sd, prefix + "c_proj.bias", cfg))


def _attention_row(
    x: torch.Tensor,
    sd: dict[str, torch.Tensor],
    prefix: str,
    cfg: NaiveConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    logn: torch.Tensor | None,
    key_is_real: torch.Tensor,
) -> torch.Tensor:
    """Self-attention of one batch row x [T, H]; key_is_real [T] bool marks non-padding keys."""
    T, H = x.shape
    n, D = cfg.num_attention_heads, cfg.head_dim
    qkv = _linear(x, sd[prefix + "c_attn.weight"], sd[prefix + "c_attn.bias"])  # [T, 3H]
    q = qkv[:, 0:H].reshape(T, n, D)
    k = qkv[:, H : 2 * H].reshape(T, n, D)
    v = qkv[:, 2 * H : 3 * H].reshape(T, n, D)

    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    if logn is not None:
        q = q * logn.to(q.dtype)[:, None, None]  # query at absolute position p scaled by logn[p]

    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)  # [n, T, T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal & key_is_real[None, :]  # [T(query), T(key)]
    # A disallowed position gets exactly finfo.min (never min + min = -inf), so fully padded query
    # rows end up with uniform (finite) attention instead of NaN, as in the reference.
    scores = torch.where(allowed[None], scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, H)
    return _linear(out, sd[prefix + "c_proj.weight"], _optional_bias(sd, prefix + "c_proj.bias", cfg))


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def _row_alphas(cfg: NaiveConfig, T: int, attention_mask: torch.Tensor | None, B: int) -> list[int]:
    if not cfg.use_dynamic_ntk:
        return [1] * B
    if attention_mask is not None and T > cfg.seq_length:
        return [ntk_alpha(int(row.sum()), cfg.seq_length) for row in attention_mask]
    return [ntk_alpha(T, cfg.seq_length)] * B


def naive_forward(
    state_dict: dict[str, torch.Tensor],
    config: dict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Qwen v1 logits for a full-sequence prefill (no cache), inference semantics.

    Args:
        state_dict: raw checkpoint tensors (``transformer.wte.weight``, ``transformer.h.{i}...``,
            ``lm_head.weight``); everything is computed in their dtype.
        config: the raw ``config.json`` dict.
        input_ids: [B, T] token ids.
        attention_mask: optional [B, T], 1 = real token, 0 = padding.

    Returns:
        [B, T, V] logits in the weights' dtype.
    """
    cfg = NaiveConfig.from_dict(config)
    sd = state_dict
    B, T = input_ids.shape
    key_is_real = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

    alphas = _row_alphas(cfg, T, attention_mask, B)  # one NTK alpha per batch row
    tables = {alpha: _rope_tables(cfg, alpha, T) for alpha in set(alphas)}
    logn = None
    if cfg.use_logn_attn and T > cfg.seq_length:
        logn = torch.tensor([logn_factor(p, cfg.seq_length) for p in range(T)], dtype=torch.float32)

    x = sd["transformer.wte.weight"][input_ids]  # [B, T, H]
    eps = cfg.layer_norm_epsilon
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        h = _rms_norm(x, sd[p + "ln_1.weight"], eps)
        rows = []
        for b in range(B):
            cos, sin = tables[alphas[b]]
            rows.append(_attention_row(h[b], sd, p + "attn.", cfg, cos, sin, logn, key_is_real[b]))
        x = x + torch.stack(rows)
        h = _rms_norm(x, sd[p + "ln_2.weight"], eps)
        x = x + _mlp(h, sd, p + "mlp.", cfg)
    x = _rms_norm(x, sd["transformer.ln_f.weight"], eps)
    return _linear(x, sd["lm_head.weight"])
