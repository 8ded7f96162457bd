"""Weight-only int8 / int6 / int4 weights in the CPU kernels' layout: packing, unpacking, dequantisation.

    qw = pack_quantized(q, scales, zeros, bits=4, group_size=128)   # q: uint8 codes [N, K]
    w = dequantize(qw, torch.bfloat16)                              # [N, K], for prefill or non-CPU devices

Layout (what the kernels in cpu_gemv.cpp read); each row is a sequence of 64-byte chunks:
  * K is zero-padded to a multiple of the chunk (64 weights for int8, 128 for int4 and int6) and of the group size;
    padded codes, scales and zeros are 0, so padded weights are exactly 0.
  * Within a chunk, weights are stored in "chunk order": the kernel reads a chunk as 4 vectors of E elements
    (E = 16 for int8, 32 for int4) and, when a chunk holds GC = 2 or 4 groups, wants lane p of every vector
    to belong to one group, so stored element e of vector v is chunk weight g*(e // per) + per*v + e % per
    (g = group size, per = E // GC). With one group or more per chunk the order is the natural one.
  * int8: qdata = uint8 [N, Kp], bytes in chunk order.
  * int4: qdata = uint8 [N, Kp / 2]; byte 16*L + 8*h + i of a chunk (L < 4, h < 2, i < 8) holds stored
    element 32*h + 8*L + i in its low nibble and 64 + 32*h + 8*L + i in its high nibble. That is the order
    AVX-512 byte unpacks (which work per 128-bit lane) produce, so one load gives four vectors without
    any permute.
  * int6: qdata = uint8 [N, Kp * 3 / 4], 96 bytes a chunk: the low four bits of each code as int4 stores its
    codes (64 bytes), then their top two bits (32 bytes). High byte i holds, from bit 0, the top bits of the
    codes in the low and high nibbles of nibble byte i, then of nibble byte i + 32 (pack_int6). The kernels
    (cpu_gemv.cpp, nibble_codes) rebuild a code with a few byte ops, so int6 runs int4's tiles.
  * scales fp32 [N, Gp], zeros int16 [N, Gp], one per kernel group (per-channel: one group of Kp).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .reference import dequantize_codes

_CHUNK = {8: 64, 6: 128, 4: 128}  # weights per chunk (64 bytes; int6: 96)
_BYTES_PER_WEIGHT = {8: (1, 1), 6: (3, 4), 4: (1, 2)}  # stored bytes per weight as (numerator, denominator)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight-only quantized [N, K] matrix in kernel layout (see the module docstring).

    Tensors can be registered as module buffers via to_tensors()/from_tensors(); to(device) moves it.
    """

    qdata: torch.Tensor  # uint8 [N, Kp] (8 bits), [N, Kp * 3 // 4] (6 bits) or [N, Kp // 2] (4 bits)
    scales: torch.Tensor  # fp32 [N, Gp]
    zeros: torch.Tensor  # int16 [N, Gp]
    bits: int
    group_size: int  # the logical group size (== in_features for per-channel)
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qdata.shape[0]

    @functools.cached_property
    def padded_in_features(self) -> int:
        num, den = _BYTES_PER_WEIGHT[self.bits]
        return self.qdata.shape[1] * den // num

    @functools.cached_property
    def kernel_group(self) -> int:
        """Group size in the padded layout (per-channel weights become one group of Kp)."""
        return self.padded_in_features // self.scales.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @functools.cached_property
    def kernel_compatible(self) -> bool:
        """Whether the CPU kernel can run this layout: groups of 1/4, 1/2 or a multiple of a chunk."""
        return _groups_per_chunk(self.bits, self.kernel_group) in (1, 2, 4)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows start..stop-1 (views: each row's codes, scales and zeros are its own)."""
        return QuantizedWeight(
            self.qdata[start:stop],
            self.scales[start:stop],
            self.zeros[start:stop],
            self.bits,
            self.group_size,
            self.in_features,
        )

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.qdata.to(device),
            self.scales.to(device),
            self.zeros.to(device),
            self.bits,
            self.group_size,
            self.in_features,
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors (the ints go in a small int64 `qmeta` tensor) for register_buffer / state dicts."""
        meta = torch.tensor([self.bits, self.group_size, self.in_features], dtype=torch.int64)
        return {"qdata": self.qdata, "scales": self.scales, "zeros": self.zeros, "qmeta": meta}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        bits, group_size, in_features = (int(v) for v in tensors["qmeta"].tolist())
        return cls(tensors["qdata"], tensors["scales"], tensors["zeros"], bits, group_size, in_features)


def _groups_per_chunk(bits: int, kernel_group: int) -> int:
    """GC: 1 when a group spans whole chunks, 2 or 4 for small groups, 0 when the kernel cannot run it."""
    chunk = _CHUNK[bits]
    if kernel_group % chunk == 0:
        return 1
    return chunk // kernel_group if chunk // kernel_group in (2, 4) and chunk % kernel_group == 0 else 0


def _chunk_order(bits: int, kernel_group: int) -> torch.Tensor:
    """Source index within a chunk of each stored element (identity unless GC is 2 or 4)."""
    chunk = _CHUNK[bits]
    gc = _groups_per_chunk(bits, kernel_group)
    if gc in (0, 1):
        return torch.arange(chunk)
    e_per_vec = chunk // 4
    per, g = e_per_vec // gc, chunk // gc
    v, e = torch.meshgrid(torch.arange(4), torch.arange(e_per_vec), indexing="ij")
    return (g * (e // per) + per * v + e % per).reshape(chunk)


def _padded_k(k: int, bits: int, group_size: int) -> tuple[int, int]:
    """(Kp, kernel group) for K input features."""
    chunk = _CHUNK[bits]
    if group_size == k:  # per-channel: a single group covering the padded row
        kp = -(-k // chunk) * chunk
        return kp, kp
    step = math.lcm(chunk, group_size)
    return -(-k // step) * step, group_size


def _validate(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> None:
    if bits not in _CHUNK:
        raise ValueError(f"bits must be 4, 6 or 8, got {bits}")
    if q.dim() != 2:
        raise ValueError(f"q must be [N, K], got shape {tuple(q.shape)}")
    n, k = q.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features {k}")
    g = k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, g):
            raise ValueError(f"{name} must be [{n}, {g}], got {tuple(t.shape)}")
    if q.is_floating_point() or q.is_complex():
        raise ValueError(f"q must be an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"q codes must lie in [0, {(1 << bits) - 1}]")
    if zeros.numel():
        zf = zeros.double()
        if not torch.equal(zf, zf.round()) or zf.abs().max() > 32767:
            raise ValueError("zeros must be integers that fit in int16")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, Kp] (Kp % 128 == 0, values < 16) -> kernel nibble layout [N, Kp // 2]."""
    n, kp = codes.shape
    c = codes.view(n, kp // _CHUNK[4], 2, 2, 4, 8)  # (n, chunk, nibble t, h, L, i): weight 64t + 32h + 8L + i
    c = c.permute(0, 1, 4, 3, 5, 2)  # (n, chunk, L, h, i, t): byte 16L + 8h + i, nibble t
    return (c[..., 0] | (c[..., 1] << 4)).reshape(n, kp // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [N, Kp // 2] -> uint8 codes [N, Kp]."""
    n, half = packed.shape
    b = packed.view(n, half // 64, 4, 2, 8)  # (n, chunk, L, h, i)
    c = torch.stack((b & 0x0F, b >> 4), dim=-1)  # (n, chunk, L, h, i, t)
    return c.permute(0, 1, 5, 3, 2, 4).reshape(n, half * 2)  # (n, chunk, t, h, L, i)


def pack_int6(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, Kp] (Kp % 128 == 0, values < 64) -> kernel layout [N, Kp * 3 // 4]: per chunk, the low
    nibbles as pack_int4 stores them, then the top two bits, four codes a byte (see the module docstring)."""
    n, kp = codes.shape
    chunks = kp // _CHUNK[6]
    nibbles = pack_int4(codes & 0x0F).view(n, chunks, 64)
    top = pack_int4(codes >> 4).view(n, chunks, 64)  # byte j: top bits of its low-nibble code | those of its high << 4
    per_byte = (top & 0x03) | ((top >> 4) << 2)  # four bits per nibble byte j
    high = per_byte[..., :32] | (per_byte[..., 32:] << 4)
    return torch.cat((nibbles, high), dim=-1).reshape(n, chunks * 96)


def unpack_int6(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int6: [N, Kp * 3 // 4] -> uint8 codes [N, Kp]."""
    n, size = packed.shape
    chunks = size // 96
    b = packed.view(n, chunks, 96)
    high = b[..., 64:]
    per_byte = torch.cat((high & 0x0F, high >> 4), dim=-1)  # [n, chunks, 64]: four top bits per nibble byte
    top = (per_byte & 0x03) | ((per_byte >> 2) << 4)
    low = unpack_int4(b[..., :64].reshape(n, chunks * 64))
    return low | (unpack_int4(top.reshape(n, chunks * 64)) << 4)


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, Kp] (Kp % 64 == 0) -> kernel byte layout: byte 4*p + v of a chunk is element p of vector v."""
    n, kp = codes.shape
    return codes.view(n, kp // 64, 4, 16).transpose(2, 3).reshape(n, kp).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int8."""
    n, kp = packed.shape
    return packed.view(n, kp // 64, 16, 4).transpose(2, 3).reshape(n, kp)


_PACK = {8: pack_int8, 6: pack_int6, 4: pack_int4}
_UNPACK = {8: unpack_int8, 6: unpack_int6, 4: unpack_int4}


def pack_quantized(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> QuantizedWeight:
    """Convert weight-only quantized codes to the kernel layout.

    Args:
        q: integer codes [N, K] in [0, 2**bits - 1] (uint8 or any integer dtype).
        scales: [N, K // group_size] float.
        zeros: [N, K // group_size] integer-valued (float or int), the code that maps to 0.
        bits: 8, 6 or 4.
        group_size: divides K; group_size == K means per-channel.

    Returns:
        A QuantizedWeight on q's device; dequantize(result) == (q - zeros) * scales per group, in fp32.

    Raises:
        ValueError: on bad shapes, codes out of range or non-integer zeros.
    """
    _validate(q, scales, zeros, bits, group_size)
    n, k = q.shape
    kp, kg = _padded_k(k, bits, group_size)
    gp = kp // kg
    codes = torch.zeros(n, kp, dtype=torch.uint8, device=q.device)
    codes[:, :k] = q.to(torch.uint8)
    s = torch.zeros(n, gp, dtype=torch.float32, device=q.device)
    z = torch.zeros(n, gp, dtype=torch.int16, device=q.device)
    g = k // group_size
    s[:, :g], z[:, :g] = scales.float(), zeros.double().round().to(torch.int16)
    chunk = _CHUNK[bits]
    order = _chunk_order(bits, kg).to(q.device)
    codes = codes.view(n, kp // chunk, chunk)[:, :, order].reshape(n, kp)
    return QuantizedWeight(_PACK[bits](codes), s, z, bits, group_size, k)


def unpack_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The padded codes [N, Kp] as uint8 in natural order (inverse of the packing)."""
    stored = _UNPACK[qw.bits](qw.qdata)
    n, kp = stored.shape
    chunk = _CHUNK[qw.bits]
    inverse = torch.argsort(_chunk_order(qw.bits, qw.kernel_group)).to(stored.device)
    return stored.view(n, kp // chunk, chunk)[:, :, inverse].reshape(n, kp)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantised weight [N, K] (fp32 math, then one rounding to dtype); works on any device."""
    w = dequantize_codes(unpack_codes(qw), qw.scales, qw.zeros, qw.kernel_group, dtype=torch.float32)
    return w[:, : qw.in_features].to(dtype)
