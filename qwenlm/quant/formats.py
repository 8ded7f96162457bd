"""The AutoGPTQ tensor layout (spec 11.2), as pure functions: bit packing and the per-module tensors.

For a linear with K inputs, N outputs, b bits and G groups, a GPTQ checkpoint stores
`qweight` int32 [K*b/32, N] (input-major), `qzeros` int32 [G, N*b/32], `scales` fp16 [G, N],
`g_idx` int32 [K] and `bias` fp16 [N]. Values are packed LSB first: packed row r holds rows
r*pf .. r*pf+pf-1 at bit offsets 0, b, 2b, ... (pf = 32/b values per int32).

    tensors = gptq_tensors(q, scales, zeros, g_idx, bias, bits=4)          # write
    q, scales, zeros, g_idx = read_gptq(tensors, bits=4, group_size=128)   # read back
    w = dequantize_gptq(q, scales, zeros, g_idx)                            # [N, K] float32
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from .config import CHECKPOINT_FORMATS, SUPPORTED_BITS

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def check_bits(bits: int) -> int:
    """`bits` if qwenlm can pack it, else a clear error; returns the values per int32."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported: qwenlm packs 4- and 8-bit GPTQ weights "
            "(the 2- and 3-bit AutoGPTQ layouts are not implemented)"
        )
    return 32 // bits


def num_groups(in_features: int, group_size: int) -> int:
    """G for K inputs; group_size -1 means one group of all K. The group size must divide K."""
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return in_features // group_size


# --------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------
def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack integer codes [K, N] into int32 [K*bits/32, N] along dim 0 (LSB first)."""
    pf = check_bits(bits)
    if values.dim() != 2 or values.shape[0] % pf:
        raise ValueError(
            f"pack_rows needs a 2-D tensor whose row count is a multiple of {pf}, got {list(values.shape)}"
        )
    _check_range(values, bits, "values")
    rows, cols = values.shape
    v = values.to(torch.uint8).view(rows // pf, pf, cols).permute(0, 2, 1)  # [R, N, pf]: value j of each word
    if bits == 4:
        v = v[..., 0::2] | (v[..., 1::2] << 4)  # byte b holds values 2b (low nibble) and 2b+1 (high)
    return _words_from_bytes(v.contiguous())


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_rows`: int32 [R, N] -> uint8 codes [R*32/bits, N].

    The result is the transpose of a contiguous [N, K] tensor, the `nn.Linear` layout callers want.
    """
    pf = check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_rows needs a 2-D int32 tensor, got {packed.dtype} {list(packed.shape)}")
    rows, cols = packed.shape
    v = _values_from_words(packed, bits)  # [R, N, pf]
    return v.permute(1, 0, 2).reshape(cols, rows * pf).t()


def pack_cols(values: Tensor, bits: int) -> Tensor:
    """Pack integer codes [G, N] into int32 [G, N*bits/32] along dim 1 (the `qzeros` layout)."""
    pf = check_bits(bits)
    if values.dim() != 2 or values.shape[1] % pf:
        raise ValueError(
            f"pack_cols needs a 2-D tensor whose column count is a multiple of {pf}, got {list(values.shape)}"
        )
    _check_range(values, bits, "values")
    rows, cols = values.shape
    v = values.to(torch.uint8).reshape(rows, cols // pf, pf)
    if bits == 4:
        v = v[..., 0::2] | (v[..., 1::2] << 4)
    return _words_from_bytes(v.contiguous())


def unpack_cols(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_cols`: int32 [G, C] -> uint8 codes [G, C*32/bits]."""
    pf = check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_cols needs a 2-D int32 tensor, got {packed.dtype} {list(packed.shape)}")
    return _values_from_words(packed, bits).reshape(packed.shape[0], packed.shape[1] * pf)


# Bytes are handled as uint8 views of the int32 words (1 byte per weight of temporaries, not 8).
def _words_from_bytes(b: Tensor) -> Tensor:
    """uint8 [..., 4], least significant byte first -> int32 [...] with those bytes."""
    if sys.byteorder == "big":
        b = b.flip(-1)
    return b.reshape(-1, 4).contiguous().view(torch.int32).reshape(b.shape[:-1])


def _values_from_words(packed: Tensor, bits: int) -> Tensor:
    """int32 [R, C] -> uint8 [R, C, 32/bits]: value j of each word sits at bit offset bits*j."""
    b = packed.contiguous().view(torch.uint8).view(*packed.shape, 4)  # [R, C, 4]
    if sys.byteorder == "big":
        b = b.flip(-1)
    if bits == 4:
        b = torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)  # [R, C, 8]
    return b


def _check_range(values: Tensor, bits: int, what: str) -> None:
    if values.is_floating_point() or values.is_complex():
        raise ValueError(f"{what} must hold integers, got {values.dtype}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(
            f"{what} must lie in [0, {(1 << bits) - 1}] for bits={bits}, got [{int(values.min())}, {int(values.max())}]"
        )


# --------------------------------------------------------------------------------------------------
# Module tensors
# --------------------------------------------------------------------------------------------------
def default_g_idx(in_features: int, group_size: int) -> Tensor:
    """g_idx without act-order: input k belongs to group k // group_size."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // size


def gptq_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of each GPTQ tensor of one linear; raises when the layout cannot hold the linear."""
    pf = check_bits(bits)
    groups = num_groups(in_features, group_size)
    if in_features % pf or out_features % pf:
        raise ValueError(
            f"a {bits}-bit GPTQ linear needs in_features and out_features divisible by {pf}, "
            f"got {in_features} and {out_features}"
        )
    return {
        "qweight": (in_features // pf, out_features),
        "qzeros": (groups, out_features // pf),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
        "bias": (out_features,),
    }


def gptq_tensors(
    q: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor,
    bias: Tensor | None,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, Tensor]:
    """The checkpoint tensors of one quantized linear, W[n, k] = (q[n, k] - zeros[g, n]) * scales[g, n]
    with g = g_idx[k].

    Args:
        q: codes [N, K] in [0, 2^bits).
        scales: [G, N] (stored as fp16, as AutoGPTQ does).
        zeros: integer zero points [G, N]. The classic "gptq" format stores zero - 1, so it can hold
            zeros 1 .. 2^bits; "gptq_v2" stores them as they are (0 .. 2^bits - 1).
        g_idx: group of each input feature [K] (k // group_size unless act-order).
        bias: [N], or None (written as zeros: released checkpoints carry a bias for every linear).

    Returns:
        {"qweight", "qzeros", "scales", "g_idx", "bias"}.
    """
    check_bits(bits)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    n, k = q.shape
    groups = scales.shape[0]
    if tuple(scales.shape) != (groups, n) or tuple(zeros.shape) != (groups, n) or tuple(g_idx.shape) != (k,):
        raise ValueError(
            f"inconsistent shapes: q {list(q.shape)} [N, K], scales {list(scales.shape)} and zeros "
            f"{list(zeros.shape)} [G, N], g_idx {list(g_idx.shape)} [K]"
        )
    _check_g_idx(g_idx, groups, "g_idx")
    offset = 1 if checkpoint_format == "gptq" else 0
    if zeros.is_floating_point():
        raise ValueError(f"GPTQ zero points must be integers, got {zeros.dtype}")
    zeros = zeros.to(torch.int64)
    lo, hi = offset, (1 << bits) - 1 + offset
    if zeros.numel() and (int(zeros.min()) < lo or int(zeros.max()) > hi):
        raise ValueError(
            f"zero points must lie in [{lo}, {hi}] for bits={bits} in the {checkpoint_format!r} format "
            f"(got [{int(zeros.min())}, {int(zeros.max())}]); "
            + ("use checkpoint_format='gptq_v2' to store a zero point of 0" if offset else "")
        )
    half_scales = scales.to(torch.float16)
    if not torch.isfinite(half_scales).all():
        raise ValueError("scales do not fit in float16 (GPTQ checkpoints store fp16 scales)")
    return {
        "qweight": pack_rows(q.t(), bits),
        "qzeros": pack_cols(zeros - offset, bits),
        "scales": half_scales.contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
        "bias": (torch.zeros(n) if bias is None else bias).to(torch.float16).contiguous(),
    }


def read_gptq(
    tensors: dict[str, Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq", *, name: str = ""
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unpack one linear's GPTQ tensors (the inverse of `gptq_tensors`).

    `g_idx` may be absent (older AutoGPTQ files): then it is k // group_size. `name` (the module)
    prefixes the tensor names in error messages.

    Returns:
        q uint8 [N, K], scales [G, N] (as stored), zeros int32 [G, N] (the true zero points, after
        the classic format's +1), g_idx int32 [K].
    """
    pf = check_bits(bits)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    prefix = f"{name}." if name else ""
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise ValueError(f"GPTQ tensor {prefix}{key} is missing")
    for key in ("qweight", "qzeros") + (("g_idx",) if "g_idx" in tensors else ()):
        if tensors[key].dtype != torch.int32:
            raise ValueError(f"GPTQ tensor {prefix}{key} has dtype {tensors[key].dtype}; expected torch.int32")
    if not tensors["scales"].is_floating_point():
        raise ValueError(f"GPTQ tensor {prefix}scales has dtype {tensors['scales'].dtype}; expected floats")
    if tensors["qweight"].dim() != 2:
        raise ValueError(f"GPTQ tensor {prefix}qweight must be 2-D, got shape {list(tensors['qweight'].shape)}")
    k, n = tensors["qweight"].shape[0] * pf, tensors["qweight"].shape[1]
    try:
        expected = gptq_shapes(k, n, bits, group_size)
    except ValueError as err:
        raise ValueError(f"GPTQ tensor {prefix}qweight {list(tensors['qweight'].shape)}: {err}") from err
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"GPTQ tensor {prefix}{key} has shape {list(tensors[key].shape)}, but bits={bits}, "
                f"group_size={group_size} and qweight {list(tensors['qweight'].shape)} imply {list(shape)}"
            )
    groups = expected["scales"][0]
    g_idx = tensors["g_idx"] if "g_idx" in tensors else default_g_idx(k, group_size)
    _check_g_idx(g_idx, groups, f"{prefix}g_idx")
    zeros = unpack_cols(tensors["qzeros"], bits).to(torch.int32)
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # AutoGPTQ's off-by-one: the file holds zero - 1
    q = unpack_rows(tensors["qweight"], bits).t()  # contiguous [N, K]
    return q, tensors["scales"], zeros, g_idx.to(torch.int32)


def dequantize_gptq(q: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """The float32 weight [N, K]: W[n, k] = (q[n, k] - zeros[g_idx[k], n]) * scales[g_idx[k], n].

    The reference for the fast kernels; exact in float32 for fp16 scales (an 11-bit mantissa times a
    9-bit integer fits in 24 bits).
    """
    g = g_idx.long()
    return (q.float() - zeros.float()[g].t()) * scales.float()[g].t()


def _check_g_idx(g_idx: Tensor, groups: int, what: str) -> None:
    if g_idx.dim() != 1 or g_idx.is_floating_point():
        raise ValueError(f"{what} must be a 1-D integer tensor, got {g_idx.dtype} {list(g_idx.shape)}")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"{what} values must lie in [0, {groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
