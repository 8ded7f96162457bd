"""Round-to-nearest weight quantization for loading float checkpoints quantized ("int8" / "int4").

Pure tensor functions; the loader (`qwenlm.quant.loader`) applies them tensor by tensor:

    q, scales, zeros = quantize_weight(linear_weight, bits=4, group_size=128)
    # W ~ (q - zeros[:, k // 128]) * scales[:, k // 128]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..kernels.quant import QuantizedWeight, pack_quantized
from .formats import num_groups

Scheme = Literal["int8", "int4"]
SCHEMES = ("int8", "int4")
EMBEDDING = "transformer.wte"  # the token embedding, quantized with the blocks' recipe (see recipe_for)


@dataclass(frozen=True)
class Recipe:
    """How one linear is quantized on the fly."""

    bits: int
    group_size: int  # -1: one group per output channel
    sym: bool


def recipe_for(module_name: str, scheme: Scheme, group_size: int | None = None) -> Recipe:
    """The recipe of a linear under `scheme`.

    "int8": symmetric per-output-channel int8 for every linear, lm_head included, and per-row int8 for
    the token embedding (`EMBEDDING`).
    "int4": asymmetric group-wise int4 (group_size, default 128) for the blocks and the token embedding,
    and asymmetric int6 in the same groups for lm_head. That is what llama.cpp's Q4_0 files do (their
    output layer is Q6_K): the head stays at higher precision because its errors go straight into the
    logits, while an embedding row's error is one more perturbation of the residual stream, like any
    block's. Six bits keep the logits' cosine to an int8 head's at 0.9997 on the 1.8B shape (int4 heads:
    0.995-0.997, below the 0.999 asked for) and read a quarter less than int8 every decoded token
    (benchmarks/lm_head_precision.py, BENCHMARKS.md).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "int8" and group_size is not None:
        raise ValueError("quantization_group_size applies to quantization='int4' only; int8 is per channel")
    if scheme == "int8":
        return Recipe(bits=8, group_size=-1, sym=True)
    size = 128 if group_size is None else group_size
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size > 0):
        raise ValueError(f"quantization_group_size must be -1 or a positive integer, got {size!r}")
    return Recipe(bits=6 if module_name == "lm_head" else 4, group_size=size, sym=False)


_CHUNK_ELEMENTS = 1 << 24  # rows are quantized in slices of 16M weights: 64 MB fp32 temporaries, which
# glibc always maps and unmaps (smaller ones raise its mmap threshold and linger in the heap)


def quantize_weight(weight: Tensor, bits: int, group_size: int, sym: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest codes for a float weight [N, K], one (scale, zero) per output row and group.

    Symmetric: zero = 2^(b-1), scale = max|w| / (2^(b-1) - 1), so codes use [1, 2^b - 1] and w = 0
    is exact. Asymmetric: the group's [min, max] (widened to include 0) maps onto [0, 2^b - 1].
    Rows are processed in slices, so the fp32 temporaries stay small even for a 150k-row lm_head.

    Returns:
        q uint8 [N, K], scales float32 [N, G], zeros int32 [N, G]; W ~ (q - zeros[:, g]) * scales[:, g].
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight needs a 2-D weight, got shape {list(weight.shape)}")
    n, k = weight.shape
    groups = num_groups(k, group_size)
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, groups, dtype=torch.float32, device=weight.device)
    zeros = torch.empty(n, groups, dtype=torch.int32, device=weight.device)
    rows = max(1, _CHUNK_ELEMENTS // k)
    for r in range(0, n, rows):
        chunk = weight[r : r + rows].to(torch.float32, copy=True).view(-1, groups, k // groups)  # private fp32 copy
        q_chunk, scales[r : r + rows], zeros[r : r + rows] = _quantize_groups(chunk, bits, sym)
        q[r : r + rows] = q_chunk.reshape(-1, k)
    return q, scales, zeros


def quantize_packed(weight: Tensor, bits: int, group_size: int, sym: bool = True) -> QuantizedWeight:
    """`quantize_weight` + `pack_quantized` (the kernels' layout), one slab of rows at a time.

    Packing makes several full-size temporaries (padded codes, the in-chunk reorder, the nibble
    interleave); done slab by slab into preallocated outputs, a 151,936-row embedding or lm_head adds
    tens of MB to the load's peak memory instead of over a GB.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_packed needs a 2-D weight, got shape {list(weight.shape)}")
    n, k = weight.shape
    size = k if group_size == -1 else group_size
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    out: QuantizedWeight | None = None
    for r in range(0, n, rows):
        slab = pack_quantized(*quantize_weight(weight[r : r + rows], bits, group_size, sym), bits, size)
        if out is None:
            out = QuantizedWeight(
                slab.qdata.new_empty((n, slab.qdata.shape[1])),
                slab.scales.new_empty((n, slab.scales.shape[1])),
                slab.zeros.new_empty((n, slab.zeros.shape[1])),
                bits,
                size,
                k,
            )
        out.qdata[r : r + rows], out.scales[r : r + rows], out.zeros[r : r + rows] = slab.qdata, slab.scales, slab.zeros
    if out is None:
        raise ValueError("quantize_packed needs a weight with at least one row")
    return out


def _quantize_groups(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scales [R, G] and zeros [R, G] for fp32 weights [R, G, group_size]."""
    maxq = 2**bits - 1
    if sym:
        scale = w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = torch.aminmax(w, dim=-1)
        lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / torch.where(scale > 0, scale, 1)).clamp_(0, maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    q = w.div_(scale[..., None]).round_().add_(zero[..., None]).clamp_(0, maxq)  # in place: w is a private copy
    return q.to(torch.uint8), scale, zero.to(torch.int32)
