"""GPTQ and round-to-nearest weight quantization as pure tensor functions (no model knowledge).

Codes follow AutoGPTQ's quantizer (spec 11.2): `q = clamp(round(w / scale) + zero, 0, 2^b - 1)`,
`w ~ scale * (q - zero)`, one (scale, zero) per group of `group_size` input columns and output row.
Scales are rounded to fp16 *before* any code is chosen, so the codes are optimal for the scales a
checkpoint actually stores and dequantization from the written files is bit-exact.

    acc = HessianAccumulator(in_features)
    for x in activations: acc.add(x)                               # x: [..., in_features]
    result = gptq_quantize(linear.weight, acc.hessian, bits=4, group_size=128)
    linear.weight.data = result.dequantize(linear.weight.dtype)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16: scales never go below it


class HessianNotPositiveDefiniteError(ValueError):
    """The dampened Hessian has no Cholesky factor (too few or degenerate calibration inputs)."""


@dataclass
class QuantResult:
    """Integer codes and the per-group parameters that dequantize them.

    Attributes:
        q: [N, K] uint8 codes in [0, 2^bits - 1], in the weight's own (unpermuted) column order.
        scales: [G, N] float16, the exact values a checkpoint stores.
        zeros: [G, N] int32 zero points (2^(bits-1) everywhere when symmetric).
        g_idx: [K] int32 group of each input column (`k // group_size` unless act-order).
        bits: code width.
        loss: GPTQ's own estimate of the added output error, 1/2 ||(W - Wq) X||^2 under the dampened
            Hessian (None for round-to-nearest).
    """

    q: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    loss: float | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W [N, K] = scale[g_idx] * (q - zero[g_idx]); computed exactly in fp32, rounded once to `dtype`."""
        g = self.g_idx.long()
        scale = self.scales.float().T.index_select(1, g)  # (N, K), contiguous
        zero = self.zeros.float().T.index_select(1, g)
        return (scale * (self.q.float() - zero)).to(dtype)


# --------------------------------------------------------------------------------------------------
# Quantizer: per-row parameters of a slice of columns, and codes
# --------------------------------------------------------------------------------------------------
def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    return 2**bits - 1


def group_params(w: Tensor, bits: int, sym: bool = True) -> tuple[Tensor, Tensor]:
    """(scale [N] fp32 holding fp16-exact values, zero [N] fp32 integers) for columns w [N, k].

    Symmetric: zero = 2^(b-1), scale = 2 max|w| / (2^b - 1). Asymmetric: the range [min, max]
    widened to include 0, zero = round(-min / scale). An all-zero row gets the range [-1, 1], as
    AutoGPTQ does, so its scale is never 0.

    AutoGPTQ keeps the asymmetric [0, max] range in symmetric mode when a row has no negative value
    (and then clips its top half); this uses 2 max|w| for every row, the rule spec 11.2 states.
    """
    maxq = _check_bits(bits)
    w = w.float()
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / maxq).clamp(min=_FP16_TINY).half().float()
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes (float, integral) of w [N] or [N, k] for per-row scale/zero [N]."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def _groups(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} must be -1 or a positive divisor of in_features={in_features}")
    return in_features // group_size


def quantize_rtn(W: Tensor, bits: int, group_size: int = 128, sym: bool = True) -> QuantResult:
    """Round-to-nearest quantization of W [N, K] (no calibration data).

    Raises:
        ValueError: bits outside [2, 8], or group_size neither -1 nor a divisor of K.
    """
    N, K = W.shape
    G = _groups(K, group_size)
    width = K if group_size == -1 else group_size
    rows = W.detach().float().reshape(N * G, width)  # row n*G + g: group g of output n (a view)
    scale, zero = group_params(rows, bits, sym)
    q = quantize_codes(rows, scale, zero, bits).to(torch.uint8).reshape(N, K)
    g_idx = torch.arange(K, device=W.device, dtype=torch.int32) // width
    scales, zeros = scale.view(N, G).T.contiguous(), zero.view(N, G).T.contiguous()
    return QuantResult(q, scales.half(), zeros.to(torch.int32), g_idx, bits)


# --------------------------------------------------------------------------------------------------
# Hessian of the layer-wise reconstruction loss
# --------------------------------------------------------------------------------------------------
class HessianAccumulator:
    """Running H = 2/n * sum_i x_i x_i^T over every input row x_i seen so far (fp32).

    Each `add` rescales the old sum before adding the new rows (H <- H n/(n+m) + 2/(n+m) X^T X), so
    the entries stay at the scale of one sample however many are added. (AutoGPTQ counts sequences
    rather than rows in n; the scale of H does not change GPTQ's result.)
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: Tensor) -> None:
        """Accumulate the inputs x [..., in_features] of one forward call."""
        x = x.detach().reshape(-1, self.hessian.shape[0]).to(device=self.hessian.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.hessian.mul_(self.count / (self.count + m))
        self.count += m
        x = x * math.sqrt(2 / self.count)
        self.hessian.addmm_(x.T, x)


# --------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------
def _inverse_cholesky_upper(H: Tensor, damp_percent: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; H is modified in place."""
    damp = damp_percent * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info == 0:
            return U
    raise HessianNotPositiveDefiniteError(
        f"the Hessian is not positive definite even after dampening with damp_percent={damp_percent}; "
        "use a larger damp_percent (e.g. 0.1) or more / more varied calibration samples"
    )


def _block_width(block_size: int, group_size: int) -> int:
    """A block width such that no group straddles a block boundary mid-way.

    Group parameters are computed from the up-to-date weights when the group starts. Inside a block
    only the block's own columns get the in-block updates, so a group either lies inside one block
    (block = multiple of group) or starts at a block start (block = divisor of group).
    """
    if group_size == -1 or block_size % group_size == 0 or group_size % block_size == 0:
        return block_size
    if group_size < block_size:
        return (block_size // group_size) * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
) -> QuantResult:
    """GPTQ (Frantar et al. 2022): quantize W [N, K] column by column, spreading each column's
    rounding error over the columns not yet quantized so that ||(W - Wq) X||^2 stays small.

    Args:
        W: weight [N, K] (out_features, in_features); not modified.
        H: Hessian [K, K] of the layer inputs (`HessianAccumulator.hessian`); not modified.
        bits: code width (4 and 8 in checkpoints).
        group_size: input columns per (scale, zero) group, or -1 for one group per row.
        sym: symmetric codes (zero = 2^(bits-1)).
        desc_act: act-order: quantize columns by decreasing H diagonal; groups are formed over that
            order (unless static_groups), and g_idx maps each original column to its group.
        damp_percent: added to H's diagonal, as a fraction of its mean.
        block_size: columns per lazy batch update (speed only, up to rounding).
        static_groups: compute every group's parameters from the original W up front (groups of
            consecutive original columns, even with desc_act).

    Raises:
        HessianNotPositiveDefiniteError: the dampened H has no Cholesky factor.
        ValueError: bad bits or group_size, or shapes that do not match.
    """
    _check_bits(bits)
    N, K = W.shape
    if tuple(H.shape) != (K, K):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({K}, {K}) for a weight of shape {(N, K)}")
    if damp_percent < 0:
        raise ValueError(f"damp_percent must be >= 0, got {damp_percent}")
    G = _groups(K, group_size)
    width = K if group_size == -1 else group_size
    # Work on W^T [K, N]: column k of W is the contiguous row k, so the per-column rank-1 updates
    # below run over contiguous memory (an order of magnitude faster on CPU than strided columns).
    Wt = W.detach().to(dtype=torch.float32, device=H.device).T.contiguous()
    H = H.detach().float().clone()

    dead = torch.diag(H) == 0  # inputs that are always 0: any weight there is free; quantize it as 0
    H[dead, dead] = 1
    Wt[dead] = 0

    scales = torch.empty(G, N, device=Wt.device)
    zeros = torch.empty(G, N, device=Wt.device)
    if static_groups or group_size == -1:
        for g in range(G):
            scales[g], zeros[g] = group_params(Wt[g * width : (g + 1) * width].T, bits, sym)

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if desc_act else None
    if perm is not None:
        Wt, H = Wt[perm], H[perm][:, perm]
    col_group = torch.arange(K, device=Wt.device) // width  # group of each (permuted) column
    if static_groups and perm is not None:
        col_group = perm // width  # static groups stay groups of original columns

    U = _inverse_cholesky_upper(H, damp_percent)
    del H
    codes = torch.empty(K, N, device=Wt.device)  # transposed, like Wt
    loss = torch.zeros((), device=Wt.device)
    dynamic = not static_groups and group_size != -1
    block = _block_width(block_size, group_size)
    groups_of = col_group.tolist()  # Python ints: no device sync per column on a GPU
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = Wt[i1:i2].clone()  # (B, N): this block's columns, updated as we go
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = groups_of[col]
            if dynamic and col % width == 0:  # a group starts: parameters from the updated weights
                source = W1[i : i + width] if i + width <= i2 - i1 else Wt[col : col + width]
                scales[g], zeros[g] = group_params(source.T, bits, sym)
            w = W1[i]
            c = quantize_codes(w, scales[g], zeros[g], bits)
            codes[col] = c
            err = (w - scales[g] * (c - zeros[g])) / U1[i, i]
            loss += err.dot(err) / 2
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # OBS update of the rest of the block
            E1[i] = err
        Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)  # lazy batch update of everything after the block

    g_idx = col_group.to(torch.int32)
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, g_idx = codes[inverse], g_idx[inverse]
    q = codes.T.to(torch.uint8).contiguous()
    return QuantResult(q, scales.half(), zeros.to(torch.int32), g_idx, bits, float(loss))


def reconstruction_error(W: Tensor, Wq: Tensor, X: Tensor) -> float:
    """||(W - Wq) X^T||^2 summed over outputs, for inputs X [..., K] (the quantity GPTQ minimises)."""
    X = X.reshape(-1, W.shape[1]).double()
    return float(((W.detach().double() - Wq.detach().double()) @ X.detach().T).pow(2).sum())
