"""The paged KV cache computes the same attention as the contiguous one: the one-token kernel read through block
tables, the gather for chunked prefill, int8 pools, and whole model forwards over mixed batches (rows at
different positions, with different NTK alphas)."""

from __future__ import annotations

import pytest
import torch
from token_ids import random_ids

from qwenlm import kernels
from qwenlm.kernels import cpu as kcpu
from qwenlm.model import KVCache, load_model
from qwenlm.model.paged_kv_cache import PagedKVCache, block_nbytes


def _pool_and_tables(lengths: list[int], block_size: int, n: int, D: int, dtype, seed: int):
    """A head-major pool (as PagedKVCache stores it) filled with random K/V, and block tables: even rows' blocks
    scattered (shuffled ids), odd rows' in order (the kernel reads them as one stream per head), the longest of
    those with an out-of-order block in the middle."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-t // block_size) for t in lengths]
    ids = torch.randperm(sum(need) + 3, generator=gen).tolist()
    tables, at = [], 0
    for row, m in enumerate(need):
        tables.append(ids[at : at + m] if row % 2 == 0 else list(range(at, at + m)))
        at += m
    longest = max(range(1, len(need), 2), key=lambda row: need[row], default=None)
    if longest is not None and need[longest] > 2:
        tables[longest][need[longest] // 2] = len(ids)  # a jump in the middle of consecutive blocks
    total = len(ids) + 1
    k_pool = torch.randn(n, total, block_size, D, generator=gen).to(dtype).transpose(0, 1)
    v_pool = torch.randn(n, total, block_size, D, generator=gen).to(dtype).transpose(0, 1)
    width = max(need)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_pool, v_pool, table, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("block_size", [16, 8])
def test_paged_decode_attention_equals_the_contiguous_kernel(dtype, head_dim, block_size):
    """Rows of lengths on and off block and 16-token boundaries: each row's output equals decode_attention over
    the same tokens laid out contiguously, bit for bit where the kernels run (same arithmetic; the torch
    fallback pads the rows to one length, so there only closely), and the torch reference closely."""
    lengths = [1, 15, 16, 17, 70, 300]
    k_pool, v_pool, table, gen = _pool_and_tables(lengths, block_size, 4, head_dim, dtype, seed=head_dim + block_size)
    q = (3 * torch.randn(len(lengths), 4, 1, head_dim, generator=gen)).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    with torch.inference_mode():
        paged = kernels.paged_decode_attention(q, k_pool, v_pool, table, lens)
        reference = kernels.paged_decode_attention_reference(q.float(), k_pool.float(), v_pool.float(), table, lens)
        k_all, v_all = kernels.gather_blocks(k_pool, table), kernels.gather_blocks(v_pool, table)
        for row, t in enumerate(lengths):
            alone = kernels.decode_attention(q[row : row + 1], k_all[row : row + 1, :, :t], v_all[row : row + 1, :, :t])
            if kernels.layer_kernels_available():
                assert torch.equal(paged[row : row + 1], alone), f"row {row} ({t} tokens)"
            else:
                torch.testing.assert_close(paged[row : row + 1], alone, msg=f"row {row} ({t} tokens)")
    assert paged.dtype == dtype and paged.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(paged.float(), reference, rtol=tol, atol=tol)


def test_paged_decode_attention_rejects_a_row_longer_than_its_table():
    if not kernels.layer_kernels_available():
        pytest.skip(f"CPU kernels unavailable here: {kernels.kernels_status()}")
    k_pool, v_pool, table, _ = _pool_and_tables([20], 16, 2, 64, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="context length 40"):
        kcpu._layer_op("paged_decode_attention")(
            torch.randn(1, 2, 1, 64), k_pool, v_pool, table, torch.tensor([40], dtype=torch.int32), 0.125
        )


def test_block_nbytes_counts_int8_about_half():
    from qwenlm.testing import preset_config

    config = preset_config("1.8b")
    bf16 = block_nbytes(config, torch.bfloat16)
    assert bf16 == 2 * 24 * 16 * 16 * 128 * 2  # K and V, 24 layers, 16 heads, 16 tokens, 128 dims, 2 bytes
    assert block_nbytes(config, torch.bfloat16, quantized=True) == 2 * 24 * 16 * 16 * (128 + 4)
    pool = PagedKVCache(num_layers=2, num_blocks=3, num_heads=4, head_dim=16, dtype=torch.float32)
    assert pool.nbytes() == 3 * block_nbytes(preset_config("tiny"), torch.float32)


# --------------------------------------------------------------------------------------------------
# Whole forwards: a paged batch against a contiguous KVCache holding the same keys and values
# --------------------------------------------------------------------------------------------------
def _prefilled(model, prompts: list[torch.Tensor], alphas: torch.Tensor, block_size: int, quantized: bool):
    """A contiguous cache (one row per prompt) and a paged pool with the same K/V, plus each row's block table
    (blocks interleaved across rows, with room for 40 more tokens)."""
    capacity = max(len(p) for p in prompts) + 40
    cache = KVCache.for_model(model, batch_size=len(prompts), capacity=capacity, quantized=quantized)
    need = -(-capacity // block_size)
    pool = PagedKVCache.for_model(model, num_blocks=need * len(prompts) + 1, block_size=block_size, quantized=quantized)
    tables = [[1 + row + len(prompts) * j for j in range(need)] for row in range(len(prompts))]
    for row, p in enumerate(prompts):  # prefill each row alone (its own alpha), then copy its K/V into both
        one = KVCache.for_model(model, batch_size=1, capacity=capacity, quantized=quantized)
        one.ntk_alpha = alphas[row : row + 1]
        model(p[None], past_key_values=one)
        for layer in range(len(cache)):
            for mine, theirs, paged in zip(cache._stores(), one._stores(), pool.stores(layer), strict=True):
                mine[layer][row, :, : len(p)] = theirs[layer][0, :, : len(p)]
                for t in range(len(p)):
                    paged[tables[row][t // block_size], :, t % block_size] = theirs[layer][0, :, t]
    cache.ntk_alpha = alphas
    return cache, pool, tables


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def ntk_model(request, long_context_checkpoint):
    """seq_length 16: rows of 10 and 40 tokens prefill with alphas 1 and 7, and LogN acts past 16."""
    return load_model(long_context_checkpoint, torch_dtype=request.param, progress=False)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("chunk", [1, 5], ids=["decode", "prefill-chunk"])
def test_mixed_batch_forward_equals_the_contiguous_cache(ntk_model, quantized, chunk):
    """Rows at positions 10, 40 and 23 (alphas 1, 7 and 3), feeding `chunk` new tokens each (the prefill case
    right-pads one row to a shorter real chunk): the paged forward's logits are the contiguous cache's logits —
    identical in fp32 (the same arithmetic), close in bf16 — and stay so for the following decode step."""
    from qwenlm.model.blocks import ntk_alpha

    model = ntk_model
    prompts = [random_ids(1, n, seed=n)[0] for n in (10, 40, 23)]
    alphas = torch.tensor([float(ntk_alpha(len(p), 16)) for p in prompts])
    assert alphas.tolist() == [1.0, 7.0, 3.0]
    cache, pool, tables = _prefilled(model, prompts, alphas, block_size=8, quantized=quantized)
    starts = [len(p) for p in prompts]
    lengths = [chunk, chunk, max(1, chunk - 2)]  # the last row's chunk is shorter: right-padded
    new = random_ids(3, chunk, seed=99)
    with torch.inference_mode():
        view = pool.batch(tables, starts, lengths, alphas)
        paged = model(new, past_key_values=view, cache_positions=starts).logits
        contiguous = model(new, past_key_values=cache, cache_positions=starts).logits
        starts2 = [s + n for s, n in zip(starts, lengths, strict=True)]
        nxt = random_ids(3, 1, seed=7)
        paged2 = model(nxt, past_key_values=pool.batch(tables, starts2, [1, 1, 1], alphas), cache_positions=starts2)
        contiguous2 = model(nxt, past_key_values=cache, cache_positions=starts2)
    for row, n in enumerate(lengths):  # positions past a row's real chunk are padding: not compared
        # (int8: the contiguous cache quantises a padded row's chunk with its padding, the paged one without)
        if model.dtype == torch.float32 and not (quantized and n < chunk):
            assert torch.equal(paged[row, :n], contiguous[row, :n])
            assert torch.equal(paged2.logits[row], contiguous2.logits[row])
        else:
            torch.testing.assert_close(paged[row, :n].float(), contiguous[row, :n].float(), rtol=0, atol=3e-2)
            torch.testing.assert_close(paged2.logits[row].float(), contiguous2.logits[row].float(), rtol=0, atol=3e-2)


def test_first_chunks_of_fresh_prompts_need_no_gather(tiny_model):
    """Rows that start at 0 attend over their own new keys; the pool still receives them for later steps."""
    pool = PagedKVCache.for_model(tiny_model, num_blocks=6, block_size=16)
    ids = random_ids(2, 20, seed=3)
    with torch.inference_mode():
        view = pool.batch([[4, 2], [5, 1]], [0, 0], [20, 13], torch.ones(2))
        logits = tiny_model(ids, past_key_values=view, cache_positions=[0, 0]).logits
        alone = tiny_model(ids[1:, :13], use_cache=False).logits
    torch.testing.assert_close(logits[1, :13], alone[0], rtol=0, atol=1e-5)
    one = KVCache.for_model(tiny_model, batch_size=1, capacity=20)
    with torch.inference_mode():
        tiny_model(ids[:1], past_key_values=one)
    torch.testing.assert_close(pool.keys[0][4], one.keys[0][0, :, :16], rtol=0, atol=1e-6)
    torch.testing.assert_close(pool.keys[0][2, :, :4], one.keys[0][0, :, 16:20], rtol=0, atol=1e-6)
    assert pool.keys[0][5, :, 13:].abs().sum() == 0 and pool.keys[0][1].abs().sum() == 0  # row 1's padding: unwritten


def test_a_batch_refuses_tokens_past_its_blocks(tiny_model):
    pool = PagedKVCache.for_model(tiny_model, num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match=r"row 0: tokens \[30, 34\) do not fit its 2 blocks of 16"):
        pool.batch([[0, 1]], [30], [4], torch.ones(1))
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache.for_model(tiny_model, num_blocks=4, block_size=12)
