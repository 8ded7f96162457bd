"""The KV cache: preallocated per-layer key/value buffers, passed into `forward` and filled in place.

Layout is head-major `[B, n_heads, capacity, head_dim]` so attention reads a view with no
transpose. Keys are stored after RoPE, as in the reference. The buffers grow (doubling) when a
forward would overflow them, so callers that do not know the final length can still use one:

    cache = KVCache.for_model(model, batch_size=1, capacity=512)
    out = model(ids, past_key_values=cache)           # cache.length == ids.shape[1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ALIGN = 256  # capacity is rounded up to this so growth happens rarely


def _round_up(n: int, multiple: int = _ALIGN) -> int:
    return -(-n // multiple) * multiple


class KVCache:
    """Keys and values of every layer for the tokens seen so far, plus the prefill's NTK alphas."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        devices: torch.device | str | Sequence[torch.device | str] = "cpu",
    ) -> None:
        if isinstance(devices, (str, torch.device)):
            devices = [devices] * num_layers
        if len(devices) != num_layers:
            raise ValueError(f"KVCache: got {len(devices)} devices for {num_layers} layers")
        capacity = _round_up(max(capacity, 1))
        shape = (batch_size, num_heads, capacity, head_dim)
        # Zeroed, not empty: in a continuous batch a row reads (masked) slots past its own end, and
        # uninitialised memory may hold NaN, which an additive mask does not remove.
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.length = 0  # tokens already cached (the same for every row; padding is masked)
        # Dynamic-NTK alpha per row, fixed at prefill and reused while decoding (spec 2.5.4).
        self.ntk_alpha: Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, capacity: int) -> KVCache:
        """A cache shaped for `model`, each layer's buffers on that layer's device and dtype."""
        config = model.config
        layers = model.transformer.h
        weight = layers[0].attn.c_attn.weight
        return cls(
            num_layers=len(layers),
            batch_size=batch_size,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            capacity=capacity,
            dtype=weight.dtype if weight.is_floating_point() else torch.float32,
            devices=[layer.attn.c_attn.weight.device for layer in layers],
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
        """The filled part of layer `layer`: (keys, values), each [B, n, length, D]."""
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def reserve(self, total_length: int) -> None:
        """Make room for `total_length` tokens, copying what is cached into larger buffers."""
        if total_length <= self.capacity:
            return
        capacity = _round_up(max(total_length, 2 * self.capacity))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new

    def update(self, layer: int, k: Tensor, v: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """Write this chunk's k, v [B, n, S, D] at `start` (one int, or [B] per-row positions) and
        return all keys/values up to the furthest end."""
        S = k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        if isinstance(start, int):
            end = start + S
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            return keys[:, :, :end], values[:, :, :end]
        for row, row_start in enumerate(start.tolist()):  # rows of a continuous batch
            keys[row, :, row_start : row_start + S] = k[row]
            values[row, :, row_start : row_start + S] = v[row]
        end = int(start.max()) + S
        return keys[:, :, :end], values[:, :, :end]

    def select_rows(self, rows: Tensor | list[int]) -> None:
        """Keep only the batch rows `rows` (in that order): beam reordering, dropping finished rows."""
        index = torch.as_tensor(rows, dtype=torch.long)
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                store[i] = buf.index_select(0, index.to(buf.device))
        if self.ntk_alpha is not None:
            self.ntk_alpha = self.ntk_alpha.index_select(0, index.to(self.ntk_alpha.device))

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept for reuse)."""
        self.length = 0
        self.ntk_alpha = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
