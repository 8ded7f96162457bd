"""The KV cache: preallocated per-layer key/value buffers, passed into `forward` and filled in place.

Layout is head-major `[B, n_heads, capacity, head_dim]` so attention reads a view with no
transpose. Keys are stored after RoPE, as in the reference. The buffers grow (doubling) when a
forward would overflow them, so callers that do not know the final length can still use one:

    cache = KVCache.for_model(model, batch_size=1, capacity=512)
    out = model(ids, past_key_values=cache)           # cache.length == ids.shape[1]

With `quantized=True` (what `for_model` picks when `config.use_cache_quantization` is set, spec
2.10) keys and values are stored as uint8 codes with a per-token scale and zero-point, about half
the bytes of a bf16 cache; reads hand back dequantised tensors in the compute dtype, so attention
sees ordinary float keys/values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import huge_pages

_ALIGN = 256  # capacity is rounded up to this so growth happens rarely
_QMAX = 255  # uint8 codes span [0, 255]


def _round_up(n: int, multiple: int = _ALIGN) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------------------------------
# int8 quantisation (spec 2.10)
# --------------------------------------------------------------------------------------------------
def quantize_kv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise one chunk x [B, n, S, D] to uint8, one (scale, zero) per (batch, head) over the chunk.

    Follows the reference: `scale = (max - min) / 255`, `zero = -min / scale`,
    `q = clamp(x / scale + zero, 0, 255)` cast to uint8, which truncates rather than rounds. The
    (scale, zero) pair is repeated for each of the S tokens, so every cached token carries its own.
    The arithmetic runs in x's dtype, as the reference's does (in bf16, `x / scale + zero` is rounded
    to bf16 before the truncation). A chunk whose values are all equal (the reference divides by zero
    there) gets scale 1, which stores it exactly: q = 0, zero = -min.

    Returns:
        codes uint8 [B, n, S, D], scale and zero [B, n, S, 1] in x's dtype.
    """
    B, n, S, _ = x.shape
    flat = x.reshape(B, n, -1)  # (B, n, S*D): one range per (batch, head) over the whole chunk
    fmin = flat.amin(-1)[..., None, None]  # (B, n, 1, 1)
    fmax = flat.amax(-1)[..., None, None]
    scale = (fmax - fmin) / _QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # degenerate chunk: no division by 0
    zero = -fmin / scale
    codes = (x / scale + zero).clamp_(0, _QMAX).to(torch.uint8)  # float -> uint8 truncates toward 0
    return codes, scale.expand(B, n, S, 1), zero.expand(B, n, S, 1)


def encode_kv(k: Tensor, v: Tensor, quantized: bool) -> tuple[Tensor, ...]:
    """A chunk's k, v [B, n, S, D] as a cache stores them: (k, v), or when quantized (codes_k, codes_v, scale_k,
    zero_k, scale_v, zero_v), each quantised over the chunk as `quantize_kv` does."""
    if not quantized:
        return k, v
    qk, sk, zk = quantize_kv(k)
    qv, sv, zv = quantize_kv(v)
    return qk, qv, sk, zk, sv, zv


def dequantize_kv(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """x ~= scale * (codes - zero), in the dtype of scale/zero (the reference's order of operations)."""
    return scale * (codes.to(scale.dtype) - zero)


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------
def kv_buffers(shape: tuple[int, ...], dtype: torch.dtype, devices: torch.device | str | Sequence[torch.device | str],
               num_layers: int, quantized: bool) -> tuple[list[Tensor], ...]:  # fmt: skip
    """Zeroed per-layer buffers (keys, values, key_scale, key_zero, value_scale, value_zero) of `shape`
    [..., D], each layer's on its device; uint8 codes plus [..., 1] scales and zero-points in `dtype` when
    quantized (the last four are empty lists otherwise).

    Zeroed, not empty: attention reads (masked) slots nobody wrote (a continuous batch's rows past their own
    end, a padded prefill row's tail), and uninitialised memory may hold NaN, which an additive mask does
    not remove.
    """
    if isinstance(devices, (str, torch.device)):
        devices = [devices] * num_layers
    if len(devices) != num_layers:
        raise ValueError(f"KV cache: got {len(devices)} devices for {num_layers} layers")
    store_dtype = torch.uint8 if quantized else dtype
    keys = [huge_pages.zeros(shape, store_dtype, d) for d in devices]
    values = [huge_pages.zeros(shape, store_dtype, d) for d in devices]
    per_token = (*shape[:-1], 1)
    scales = ([huge_pages.zeros(per_token, dtype, d) for d in devices] if quantized else [] for _ in range(4))
    return keys, values, *scales


class KVCache:
    """Keys and values of every layer for the tokens seen so far, plus the prefill's NTK alphas.

    Float mode: `keys`/`values` hold the tensors in `dtype`. Quantized mode: they hold uint8 codes and
    `key_scale`, `key_zero`, `value_scale`, `value_zero` hold [B, n, capacity, 1] per layer in `dtype`
    (the model dtype, as in the reference): at head_dim 128 and bf16, 128 + 4 bytes per token and head
    against 256. fp32 scale/zero would cost 4 bytes more and buy no accuracy: truncation dominates the
    error, and bf16's rounding of `x / scale + zero` even turns part of it into rounding.
    """

    paged = False  # the serving engine's cache is paged (paged_kv_cache.PagedBatch); this one is contiguous

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        devices: torch.device | str | Sequence[torch.device | str] = "cpu",
        quantized: bool = False,
    ) -> None:
        capacity = _round_up(max(capacity, 1))
        shape = (batch_size, num_heads, capacity, head_dim)
        self.dtype = dtype  # what reads return (and the storage dtype when not quantized)
        self.quantized = quantized
        # Quantised mode: per-token scale and zero-point of the keys and of the values, [B, n, capacity, 1].
        self.keys, self.values, self.key_scale, self.key_zero, self.value_scale, self.value_zero = kv_buffers(
            shape, dtype, devices, num_layers, quantized
        )
        self.length = 0  # tokens already cached (the same for every row; padding is masked)
        # Dynamic-NTK alpha per row, fixed at prefill and reused while decoding (spec 2.5.4).
        self.ntk_alpha: Tensor | None = None

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, batch_size: int, capacity: int, quantized: bool | None = None
    ) -> KVCache:
        """A cache shaped for `model`, each layer's buffers on that layer's device and dtype; int8
        when `quantized`, by default when `model.config.use_cache_quantization` is set."""
        config = model.config
        layers = model.transformer.h
        norm = layers[0].ln_1.weight  # a norm, not c_attn: a quantized linear holds no float weight
        return cls(
            num_layers=len(layers),
            batch_size=batch_size,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            capacity=capacity,
            dtype=norm.dtype,
            devices=[layer.ln_1.weight.device for layer in layers],
            quantized=config.use_cache_quantization if quantized is None else quantized,
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int) -> tuple[Tensor, Tensor]:
        """The filled part of layer `layer`: (keys, values), each [B, n, length, D] in `dtype`."""
        return self.read(layer, self.length)

    def _stores(self) -> list[list[Tensor]]:
        """Every per-layer buffer list, in the order `_encode` returns a chunk's parts."""
        if not self.quantized:
            return [self.keys, self.values]
        return [self.keys, self.values, self.key_scale, self.key_zero, self.value_scale, self.value_zero]

    def _encode(self, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        """A chunk's k, v [B, n, S, D] as the tensors the stores hold, in `_stores` order."""
        return encode_kv(k, v, self.quantized)

    def reserve(self, total_length: int) -> None:
        """Make room for `total_length` tokens, copying what is cached into larger buffers."""
        if total_length <= self.capacity:
            return
        capacity = _round_up(max(total_length, 2 * self.capacity))
        for store in self._stores():
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new

    def write(self, layer: int, k: Tensor, v: Tensor, starts: Sequence[int], rows: Sequence[int] | None = None) -> None:
        """Store chunk row i of k, v [B, n, S, D] at positions [starts[i], starts[i]+S) of cache row
        rows[i] (default: row i). Quantised mode quantises the chunk first (per batch row and head)."""
        rows = range(k.shape[0]) if rows is None else rows
        S = k.shape[2]
        if S == 1 and len(rows) > 1:  # a decode step of a continuous batch: one scatter per buffer, not B copies
            device = self.keys[layer].device
            row_index = torch.as_tensor(list(rows), device=device)
            pos_index = torch.as_tensor(list(starts), device=device)
            for store, part in zip(self._stores(), self._encode(k, v), strict=True):
                store[layer][row_index, :, pos_index] = part[:, :, 0]  # [B, n, D] into (row, :, position)
            return
        for store, part in zip(self._stores(), self._encode(k, v), strict=True):
            buf = store[layer]
            for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
                buf[row, :, start : start + S] = part[i]

    def read(self, layer: int, end: int, rows: slice | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values [rows, n, end, D] of layer `layer` in `dtype`: a view in float mode (for all
        rows or a slice of them), dequantised from the codes in quantised mode. `rows` is a slice or an
        index tensor of cache rows, default all."""

        def take(store: list[Tensor]) -> Tensor:
            buf = store[layer][:, :, :end]  # slice first: a gather then copies only [:end]
            if rows is None:
                return buf
            return buf[rows] if isinstance(rows, slice) else buf.index_select(0, rows.to(buf.device))

        if not self.quantized:
            return take(self.keys), take(self.values)
        keys = dequantize_kv(take(self.keys), take(self.key_scale), take(self.key_zero))
        values = dequantize_kv(take(self.values), take(self.value_scale), take(self.value_zero))
        return keys, values

    def update(self, layer: int, k: Tensor, v: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """Write this chunk's k, v [B, n, S, D] at `start` (one int, or [B] per-row positions) and
        return all keys/values up to the furthest end (dequantised in quantised mode)."""
        S = k.shape[2]
        if isinstance(start, int):
            end = start + S
            for store, part in zip(self._stores(), self._encode(k, v), strict=True):
                store[layer][:, :, start:end] = part  # all rows at once
        else:  # rows of a continuous batch, each at its own position
            starts = start.tolist()
            self.write(layer, k, v, starts)
            end = max(starts) + S
        return self.read(layer, end)

    def select_rows(self, rows: Tensor | list[int]) -> None:
        """Keep only the batch rows `rows` (in that order): beam reordering, dropping finished rows."""
        index = torch.as_tensor(rows, dtype=torch.long)
        for store in self._stores():
            for i, buf in enumerate(store):
                store[i] = buf.index_select(0, index.to(buf.device))
        if self.ntk_alpha is not None:
            self.ntk_alpha = self.ntk_alpha.index_select(0, index.to(self.ntk_alpha.device))

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept for reuse)."""
        self.length = 0
        self.ntk_alpha = None

    def nbytes(self) -> int:
        """Bytes held by every buffer (codes plus scales/zeros when quantised)."""
        return sum(t.numel() * t.element_size() for store in self._stores() for t in store)
