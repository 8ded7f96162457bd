"""int8 KV cache (`use_cache_quantization`, spec 2.10): the quantisation formula, the cache's bookkeeping
in quantised mode, and the model, generation and engine running on it."""

from __future__ import annotations

import pytest
import torch
from token_ids import random_ids

from qwenlm.engine import EngineArgs, LLMEngine
from qwenlm.generation import SamplingParams, generate
from qwenlm.model import KVCache, load_model
from qwenlm.model.kv_cache import dequantize_kv, quantize_kv

STOPS = {"eos_token_ids": (151643,), "stop_words_ids": ((151645,), (151644,))}


@pytest.fixture(scope="module")
def int8_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch_dtype=torch.float32, progress=False, use_cache_quantization=True)


def _spec_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec 2.10 written out as the reference's shapes go: [B, n, 1] ranges, repeated to [B, n, S, 1],
    with 0-dim qmin/qmax tensors. (Per-head 0-dim scales would not do for bf16: torch divides by a
    one-element tensor as a multiply by its reciprocal, which rounds differently.)"""
    qmin, qmax = torch.tensor(0.0), torch.tensor(255.0)
    S = x.shape[2]
    flat = torch.flatten(x, 2)
    fmax, fmin = torch.amax(flat, dim=-1, keepdim=True), torch.amin(flat, dim=-1, keepdim=True)
    scale = (fmax - fmin) / (qmax - qmin)
    zero = qmin - fmin / scale
    scale, zero = scale.unsqueeze(-1).repeat(1, 1, S, 1), zero.unsqueeze(-1).repeat(1, 1, S, 1)
    codes = torch.clamp(x / scale + zero, qmin, qmax).to(torch.uint8)
    return codes, scale, zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kv_equals_the_spec_formula(dtype):
    x = (torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    codes, scale, zero = quantize_kv(x)
    want_codes, want_scale, want_zero = _spec_quantize(x)
    assert codes.dtype == torch.uint8 and scale.shape == zero.shape == (2, 3, 5, 1) and scale.dtype == dtype
    assert torch.equal(codes, want_codes)
    assert torch.equal(scale, want_scale) and torch.equal(zero, want_zero)
    # one (scale, zero) per (batch, head), repeated over the chunk's tokens
    assert torch.equal(scale, scale[:, :, :1].expand_as(scale)) and not torch.equal(scale[0, 0], scale[0, 1])
    torch.testing.assert_close(dequantize_kv(codes, scale, zero), scale * (codes.to(dtype) - zero), rtol=0, atol=0)


def test_quantize_kv_truncates_rather_than_rounds():
    x = torch.randn(1, 2, 8, 32, generator=torch.Generator().manual_seed(1))
    codes, scale, zero = quantize_kv(x)
    exact = (x / scale + zero).clamp(0, 255)
    assert torch.equal(codes, exact.floor().to(torch.uint8))
    assert (codes != exact.round().to(torch.uint8)).any()  # rounding would give other codes
    err = dequantize_kv(codes, scale, zero) - x
    step = scale.expand_as(x)
    assert bool((err <= 1e-5).all()) and bool((err >= -step * (1 + 1e-4) - 1e-6).all())  # within one step below
    assert codes.min() == 0 and codes.max() == 255  # the chunk's min and max span the whole range


def test_quantize_kv_constant_chunk_is_exact_not_nan():
    """The reference divides by zero when a chunk's values are all equal; that is guarded."""
    x = torch.full((1, 2, 1, 16), 0.75)
    x[0, 1] = -2.0
    codes, scale, zero = quantize_kv(x)
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()
    assert torch.equal(dequantize_kv(codes, scale, zero), x)


def test_int8_cache_nbytes_is_about_half_of_bf16():
    shape = dict(num_layers=2, batch_size=2, num_heads=16, head_dim=128, capacity=256, dtype=torch.bfloat16)
    float_bytes, int8_bytes = KVCache(**shape).nbytes(), KVCache(**shape, quantized=True).nbytes()
    assert int8_bytes / float_bytes == (128 + 2 + 2) / 256  # codes + bf16 scale + bf16 zero per token-head


def test_for_model_picks_int8_from_the_config(int8_model, tiny_model):
    cache = KVCache.for_model(int8_model, batch_size=1, capacity=8)
    assert cache.quantized and cache.keys[0].dtype == torch.uint8 and cache.key_scale[0].dtype == torch.float32
    assert not KVCache.for_model(tiny_model, batch_size=1, capacity=8).quantized
    assert KVCache.for_model(tiny_model, batch_size=1, capacity=8, quantized=True).quantized


def test_int8_cache_growth_keeps_contents():
    cache = KVCache(
        num_layers=1, batch_size=2, num_heads=2, head_dim=8, capacity=4, dtype=torch.float32, quantized=True
    )
    first = cache.capacity
    k, v = torch.randn(2, 2, first, 8), torch.randn(2, 2, first, 8)
    before = cache.update(0, k, v, 0)
    cache.length = first
    cache.reserve(first + 10)
    assert cache.capacity > first
    after = cache[0]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    torch.testing.assert_close(after[0], k, rtol=0, atol=float((k.amax() - k.amin()) / 255) * 2)


@pytest.mark.parametrize("quantized", [False, True])
def test_one_token_write_to_scattered_rows_and_positions(quantized):
    """A continuous batch's decode step writes one token per row at each row's own position, rows in any
    order (one scatter per buffer); it must store exactly what row-by-row chunk writes store."""
    shape = dict(num_layers=2, batch_size=5, num_heads=2, head_dim=8, capacity=16, dtype=torch.float32)
    fast, slow = KVCache(**shape, quantized=quantized), KVCache(**shape, quantized=quantized)
    k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
    rows, starts = [4, 0, 2], [7, 3, 11]
    fast.write(1, k, v, starts, rows)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        slow.write(1, k[i : i + 1], v[i : i + 1], [start], [row])
    for a, b in zip(fast._stores(), slow._stores(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert fast.keys[1].abs().sum() > 0 and fast.keys[0].abs().sum() == 0  # layer 1 only, something written


def test_int8_cache_decode_equals_one_grown_prefill(int8_model):
    """Growing mid-sequence changes nothing: the same chunks quantise the same way."""
    ids = random_ids(1, 300, seed=8)
    small = KVCache.for_model(int8_model, batch_size=1, capacity=16)
    big = KVCache.for_model(int8_model, batch_size=1, capacity=300)
    for cache in (small, big):
        int8_model(ids[:, :200], past_key_values=cache)
    assert small.capacity < 300 <= big.capacity
    grown = int8_model(ids[:, 200:], past_key_values=small).logits
    assert small.capacity >= 300
    torch.testing.assert_close(grown, int8_model(ids[:, 200:], past_key_values=big).logits, rtol=0, atol=0)


def test_int8_cache_select_rows_and_reset(int8_model):
    ids = random_ids(3, 9, seed=13)
    cache = int8_model(ids[:, :8]).past_key_values
    assert cache.quantized
    row2 = [t[2].clone() for t in cache[0]]
    cache.select_rows([2, 0])
    assert cache.batch_size == 2 and all(torch.equal(a[0], b) for a, b in zip(cache[0], row2, strict=True))
    step = int8_model(ids[[2, 0], 8:], past_key_values=cache).logits
    alone = int8_model(ids[2:3, 9 - 1 :], past_key_values=int8_model(ids[2:3, :8]).past_key_values).logits
    # Rows are quantised independently. Not bit-exact: batched matmuls round differently, and a value
    # sitting on a truncation boundary then moves one step; the float cache differs by < 1e-5 here.
    torch.testing.assert_close(step[:1], alone, rtol=0, atol=1e-3)
    cache.reset()
    again = int8_model(ids[[2, 0], :8], past_key_values=cache).logits
    torch.testing.assert_close(again[:1], int8_model(ids[2:3, :8]).logits, rtol=0, atol=1e-3)


def test_use_cache_false_quantises_as_the_reference_does(int8_model, tiny_model):
    """The reference round-trips K/V through int8 whenever the flag is on, with or without a cache."""
    ids = random_ids(1, 12, seed=2)
    no_cache = int8_model(ids, use_cache=False).logits
    cached = int8_model(ids, past_key_values=KVCache.for_model(int8_model, 1, 12)).logits
    torch.testing.assert_close(no_cache, cached, rtol=0, atol=1e-6)
    assert (no_cache - tiny_model(ids, use_cache=False).logits).abs().max() > 1e-4


def test_int8_cache_uses_the_manual_attention_path(int8_model):
    ids = random_ids(2, 10, seed=4)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    try:
        sdpa = int8_model(ids, attention_mask=mask).logits
        int8_model.set_attn_implementation("eager")
        eager = int8_model(ids, attention_mask=mask).logits
    finally:
        int8_model.set_attn_implementation("sdpa")
    assert torch.equal(sdpa, eager)


@torch.no_grad()
def _teacher_forced(model, ids: torch.Tensor, quantized: bool, steps: int) -> tuple[torch.Tensor, list[int]]:
    """Logits [steps+1, V] of a prompt and `steps` greedy continuations chosen by the float cache."""
    cache = KVCache.for_model(model, batch_size=1, capacity=ids.shape[1] + steps, quantized=quantized)
    logits = [model(ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps):
        logits.append(model(torch.tensor([[tokens[-1]]]), past_key_values=cache).logits[0, -1])
        tokens.append(int(logits[-1].argmax()))
    return torch.stack(logits), tokens


@pytest.mark.parametrize("model_name", ["tiny_model", "long_context_model"])
@torch.no_grad()
def test_int8_logits_stay_close_to_the_float_cache(model_name, request):
    """Prompt + 20 decode steps, the int8 run fed the float run's tokens. On these random models the
    logits spread only ~0.16 (std over the vocabulary); int8 moved them by at most ~0.011 over 10 seeds,
    with argmax agreement ~97% (tiny) / ~98% (long context: 40-token prompts, seq_length 16, so NTK
    alpha 7 and LogN are on)."""
    model = request.getfixturevalue(model_name)
    worst, agree = 0.0, []
    for seed in range(2):
        ids = random_ids(1, 40, seed=seed)
        ref, tokens = _teacher_forced(model, ids, quantized=False, steps=20)
        cache = KVCache.for_model(model, batch_size=1, capacity=61, quantized=True)
        got = [model(ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]]
        for token in tokens[:-1]:
            got.append(model(torch.tensor([[token]]), past_key_values=cache).logits[0, -1])
        got = torch.stack(got)
        worst = max(worst, float((got - ref).abs().max()))
        agree.append(float((got.argmax(-1) == ref.argmax(-1)).float().mean()))
    assert 1e-4 < worst < 0.03  # quantisation is on, and its error is small
    assert sum(agree) / len(agree) >= 0.85


def test_generate_with_int8_cache_is_greedy_over_the_int8_cache(int8_model, qwen_tokenizer):
    prompt = qwen_tokenizer.encode("Quantised caches halve the memory of long contexts")
    params = SamplingParams(max_new_tokens=12)
    result = generate(int8_model, qwen_tokenizer, prompt, params)
    assert result.finish_reason == "length" and len(result.token_ids) == 12
    _, tokens = _teacher_forced(int8_model, torch.tensor([prompt]), quantized=True, steps=11)
    assert result.token_ids == tokens  # generate() ran on the int8 cache, greedily


def test_generate_bf16_with_int8_cache(long_context_checkpoint, qwen_tokenizer):
    model = load_model(long_context_checkpoint, torch_dtype=torch.bfloat16, progress=False, use_cache_quantization=True)
    cache = KVCache.for_model(model, batch_size=1, capacity=8)
    assert cache.quantized and cache.key_scale[0].dtype == torch.bfloat16
    result = generate(model, qwen_tokenizer, random_ids(1, 30, seed=9)[0].tolist(), SamplingParams(max_new_tokens=8))
    assert len(result.token_ids) == 8


def test_engine_runs_on_an_int8_cache(int8_model, qwen_tokenizer):
    """Equal-length prompts prefill unpadded, so each request quantises exactly as generate() alone."""
    prompts = [random_ids(1, 7, seed=s)[0].tolist() for s in (1, 2, 3)]
    engine = LLMEngine(int8_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=128))
    assert engine.cache.quantized
    params = SamplingParams(max_new_tokens=6, **STOPS)
    outs = engine.generate_batch(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == generate(int8_model, qwen_tokenizer, prompt, params).token_ids
