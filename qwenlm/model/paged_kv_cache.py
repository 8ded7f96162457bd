"""The paged KV cache of the serving engine: fixed-size blocks of tokens in one pool per layer, each sequence
reaching its tokens through a block table (vLLM's PagedAttention layout), so memory follows the tokens that
requests actually hold instead of `batch x max_model_len`.

    pool = PagedKVCache.for_model(model, num_blocks=1024)              # [1024, n, 16, D] per layer, K and V
    view = pool.batch(block_tables=[[3, 7], [5]], starts=[20, 3], lengths=[1, 1], alphas=torch.ones(2))
    logits = model(ids, past_key_values=view, cache_positions=[20, 3]).logits

A `PagedBatch` is the cache one forward sees (it duck-types `KVCache`): `update` writes each row's new
keys/values into its blocks and returns the rows' keys/values gathered contiguous (chunked prefill runs SDPA
on them), and `decode_attention` serves one-token rows straight from the blocks with the CPU kernel (no
gather). Which blocks a sequence owns is the engine's business (`qwenlm.engine.block_manager`); this module
only stores and reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import kernels
from .kv_cache import dequantize_kv, encode_kv, kv_buffers

DEFAULT_BLOCK_SIZE = 16


def block_nbytes(config, dtype: torch.dtype, block_size: int = DEFAULT_BLOCK_SIZE, quantized: bool = False) -> int:
    """Bytes one block takes over all layers (keys and values): the unit of the KV memory budget. int8 stores a
    uint8 code per value plus a scale and a zero-point per token and head (about half of bf16 at head_dim 128)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_head_token = config.head_dim + 2 * itemsize if quantized else config.head_dim * itemsize
    return 2 * config.num_hidden_layers * config.num_attention_heads * block_size * per_head_token


class PagedKVCache:
    """Per-layer pools of KV blocks: keys/values [num_blocks, n_heads, block_size, head_dim], keys after RoPE.

    Quantized mode (config.use_cache_quantization) holds uint8 codes and [num_blocks, n, block_size, 1] scales
    and zero-points in `dtype`, as `KVCache` does; reads hand back dequantised tensors.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        block_size: int = DEFAULT_BLOCK_SIZE,
        devices: torch.device | str | Sequence[torch.device | str] = "cpu",
        quantized: bool = False,
    ) -> None:
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if num_blocks < 1:
            raise ValueError(f"a paged KV cache needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_size, self.dtype, self.quantized = num_blocks, block_size, dtype, quantized
        # Stored head-major, [n, num_blocks, block_size, D], and seen as [num_blocks, n, ...]: one head's blocks
        # then follow each other in memory, so a sequence whose blocks were allocated in order is read as one
        # stream per head, as a contiguous cache is. Zeroed, which also makes the whole budget resident now.
        buffers = kv_buffers((num_heads, num_blocks, block_size, head_dim), dtype, devices, num_layers, quantized)
        self.keys, self.values, self.key_scale, self.key_zero, self.value_scale, self.value_zero = (
            [t.transpose(0, 1) for t in store] for store in buffers
        )

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        quantized: bool | None = None,
    ) -> PagedKVCache:
        """Pools shaped for `model`, each layer's on that layer's device, in the model dtype; int8 when
        `quantized`, by default when `model.config.use_cache_quantization` is set."""
        config, layers = model.config, model.transformer.h
        return cls(
            num_layers=len(layers),
            num_blocks=num_blocks,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            dtype=layers[0].ln_1.weight.dtype,  # a norm: quantized linears hold no float weight
            block_size=block_size,
            devices=[layer.ln_1.weight.device for layer in layers],
            quantized=config.use_cache_quantization if quantized is None else quantized,
        )

    def __len__(self) -> int:
        return len(self.keys)

    def stores(self, layer: int) -> list[Tensor]:
        """Layer `layer`'s pools, in the order `kv_cache.encode_kv` returns a chunk's parts."""
        if not self.quantized:
            return [self.keys[layer], self.values[layer]]
        return [self.keys[layer], self.values[layer], self.key_scale[layer], self.key_zero[layer],
                self.value_scale[layer], self.value_zero[layer]]  # fmt: skip

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in range(len(self)) for t in self.stores(layer))

    def batch(self, block_tables: Sequence[Sequence[int]], starts: Sequence[int], lengths: Sequence[int],
              alphas: Tensor) -> PagedBatch:  # fmt: skip
        """The cache of one forward over rows whose new tokens are [starts[i], starts[i] + lengths[i]) of the
        sequence whose blocks are block_tables[i] (chunks right-padded to max(lengths); padding is never written)."""
        return PagedBatch(self, block_tables, starts, lengths, alphas)


class PagedBatch:
    """The paged cache as one forward sees it; stands where a `KVCache` goes (`past_key_values`).

    Row i's new tokens go to positions [starts[i], starts[i] + lengths[i]) of its sequence, token p living in
    slot p % block_size of block block_tables[i][p // block_size]. Every block a write reaches must already be
    in the table (the engine allocates before the step).
    """

    paged = True

    def __init__(self, pool: PagedKVCache, block_tables: Sequence[Sequence[int]], starts: Sequence[int],
                 lengths: Sequence[int], alphas: Tensor) -> None:  # fmt: skip
        if not len(block_tables) == len(starts) == len(lengths) == len(alphas):
            raise ValueError("block_tables, starts, lengths and alphas need one entry per row")
        bs = pool.block_size
        for row, (table, start, n) in enumerate(zip(block_tables, starts, lengths, strict=True)):
            if n < 1 or start < 0 or start + n > len(table) * bs:
                raise ValueError(f"row {row}: tokens [{start}, {start + n}) do not fit its {len(table)} blocks of {bs}")
        self.pool, self.starts, self.lengths = pool, list(starts), list(lengths)
        self.ntk_alpha = alphas
        self.quantized = pool.quantized
        width = max(self.lengths)
        self.end = max(s + width for s in self.starts)  # keys/values `update` returns: [0, end) of every row
        columns = -(-self.end // bs)
        # Table columns past a row's own blocks point at block 0: only padded queries can read them, masked.
        self.tables = torch.tensor([list(t[:columns]) + [0] * (columns - len(t[:columns])) for t in block_tables],
                                   dtype=torch.int32)  # fmt: skip
        blocks, slots, rows, positions = [], [], [], []  # where each real new token goes, and where it comes from
        for row, (table, start, n) in enumerate(zip(block_tables, self.starts, self.lengths, strict=True)):
            blocks += [table[p // bs] for p in range(start, start + n)]
            slots += [p % bs for p in range(start, start + n)]
            rows += [row] * n
            positions += range(n)
        self._write = tuple(torch.tensor(x) for x in (blocks, slots, rows, positions))
        self._decode = width == 1
        self._on: dict[torch.device, tuple[Tensor, ...]] = {}  # index tensors per device (layers may be spread)

    @property
    def batch_size(self) -> int:
        return len(self.starts)

    def reserve(self, total_length: int) -> None:
        """Nothing to grow: the blocks were allocated by the engine (checked per row at construction)."""

    def _indices(self, device: torch.device) -> tuple[Tensor, ...]:
        if device not in self._on:
            lens = torch.as_tensor([s + n for s, n in zip(self.starts, self.lengths, strict=True)], dtype=torch.int32)
            self._on[device] = tuple(t.to(device) for t in (*self._write, self.tables, lens))
        return self._on[device]

    def _store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        blocks, slots, rows, positions, tables, lens = self._indices(k.device)
        stores = self.pool.stores(layer)
        if self.quantized:  # per row over its real tokens only, as a row prefilled alone is quantised
            coded = [encode_kv(k[i : i + 1, :, :n], v[i : i + 1, :, :n], True) for i, n in enumerate(self.lengths)]
            parts = [torch.cat([c[j][0].transpose(0, 1) for c in coded]) for j in range(len(stores))]
        elif self._decode:  # one new token per row: [B, n, D] views, no gather
            parts = [k[:, :, 0], v[:, :, 0]]
        else:
            parts = [k[rows, :, positions], v[rows, :, positions]]
        for store, part in zip(stores, parts, strict=True):
            store[blocks, :, slots] = part  # [tokens, n, D] into (block, :, slot)
        return tables, lens

    def update(self, layer: int, k: Tensor, v: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values k, v [B, n, S, D] of every row into its blocks; return keys and values
        [B, n, end, D] of positions [0, end), end = max(starts) + S (dequantised when quantized)."""
        tables, _ = self._store(layer, k, v)
        if not self.quantized and not any(self.starts):
            return k, v  # first chunks of fresh prompts: the cache holds exactly these
        stores = [kernels.gather_blocks(s, tables)[:, :, : self.end] for s in self.pool.stores(layer)]
        if not self.quantized:
            return stores[0], stores[1]
        codes_k, codes_v, scale_k, zero_k, scale_v, zero_v = stores
        return dequantize_kv(codes_k, scale_k, zero_k), dequantize_kv(codes_v, scale_v, zero_v)

    def decode_attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One query per row (q [B, n, 1, D], LogN already applied): write k, v, then attend over each row's
        tokens read through its block table (the CPU kernel; gather + SDPA elsewhere). Float pools only."""
        tables, lens = self._store(layer, k, v)
        return kernels.paged_decode_attention(q, self.pool.keys[layer], self.pool.values[layer], tables, lens)
