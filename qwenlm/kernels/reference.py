"""Pure-torch definitions of what the CPU kernels compute: the fallbacks and the oracle the tests use.

y = linear_reference(x, w, bias)                       # fp32 math, output in x.dtype
w = dequantize_codes(q, scales, zeros, group_size)     # W = (q - zeros) * scales, per group, fp32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias computed in fp32 whatever the input dtypes, returned in x's dtype.

    This is the exact meaning of every kernel mode ("bf16 x bf16" is bf16 products accumulated in fp32,
    which fp32 math on the same bf16 values reproduces up to summation order).
    """
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def dequantize_codes(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Weight-only dequantisation of integer codes: W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g].

    Args:
        q: integer codes [N, K] (any integer or float dtype holding integers).
        scales: [N, K // group_size].
        zeros: [N, K // group_size], integer-valued (float or int dtype).
        group_size: g, with K % g == 0 (g == K means one scale per output channel).
        dtype: result dtype; the arithmetic is always fp32, then one rounding to dtype.

    Returns:
        The dequantised weight [N, K].
    """
    n, k = q.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}")
    g = k // group_size
    w = q.float().view(n, g, group_size) - zeros.float().view(n, g, 1)
    return (w * scales.float().view(n, g, 1)).view(n, k).to(dtype)


def linear_quantized_reference(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantise in fp32, then linear_reference: the oracle for the quantized kernels."""
    return linear_reference(x, dequantize_codes(q, scales, zeros, group_size), bias)


def gather_blocks(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The tokens of paged-cache rows, laid out as a contiguous cache: pool [num_blocks, n, block_size, X] read
    through block_tables [B, M] (block ids) -> [B, n, M * block_size, X], contiguous, in one copy.

    One index_select of whole blocks per row (memcpy speed on a head-major pool; advanced indexing over
    (row, head) pairs was ~10x slower)."""
    B, M = block_tables.shape
    n, bs, X = pool.shape[1:]
    heads_first = pool.transpose(0, 1)  # (n, num_blocks, bs, X): the storage order of PagedKVCache's pools
    out = pool.new_empty(B, n, M, bs, X)
    ids = block_tables.to(device=pool.device, dtype=torch.long)
    for row in range(B):
        torch.index_select(heads_first, 1, ids[row], out=out[row])
    return out.view(B, n, M * bs, X)


def paged_decode_attention_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for one query per row, over row b's first context_lens[b] tokens of a paged
    cache (what the paged kernel computes): gather the blocks, mask each row's tail, SDPA."""
    T = int(context_lens.max())
    columns = -(-T // k_pool.shape[2])
    tables = block_tables[:, :columns]
    k = gather_blocks(k_pool, tables)[:, :, :T]
    v = gather_blocks(v_pool, tables)[:, :, :T]
    allowed = torch.arange(T, device=q.device) < context_lens.to(q.device).long()[:, None]  # (B, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])
