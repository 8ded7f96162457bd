"""The engine over its paged KV cache: a memory budget instead of slots, preemption that changes no output,
prefix-cache hits that change no output, refusal of what can never fit, queueing of what must wait, no
leaked block, and the /metrics lines."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine import STOPS, _run, _tokens
from token_ids import random_ids

from qwenlm.engine import EngineArgs, EngineBusyError, LLMEngine
from qwenlm.engine.kv_budget import GIB, plan_kv_blocks
from qwenlm.generation import SamplingParams, generate
from qwenlm.model.paged_kv_cache import block_nbytes


def _budget(model, blocks: int) -> float:
    """kv_cache_memory (GiB) holding exactly `blocks` blocks of 16 tokens."""
    return blocks * block_nbytes(model.config, model.dtype) / GIB


def test_preempted_requests_give_the_same_tokens_as_unpreempted(tiny_model, qwen_tokenizer):
    """8 blocks for four requests that grow to 2-3 blocks each: the newest are preempted mid-decode and
    recomputed (prompt + output so far) when readmitted; greedy outputs equal generate() alone."""
    args = EngineArgs(max_num_seqs=4, max_model_len=64, kv_cache_memory=_budget(tiny_model, 8))
    engine = LLMEngine(tiny_model, qwen_tokenizer, args)
    assert engine.scheduler.allocator.num_blocks == 8
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 14, 20, 5)]
    params = SamplingParams(max_new_tokens=24, eos_token_ids=(), stop_words_ids=())
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs = _run(engine)
    stats = engine.stats()
    assert stats.preemptions_total > 0 and stats.kv_blocks_used == 0
    for i, prompt in enumerate(prompts):
        assert _tokens(outputs[f"r{i}"]) == generate(tiny_model, qwen_tokenizer, prompt, params).token_ids, i
        assert outputs[f"r{i}"][-1].finish_reason == "length"


def test_a_shared_prefix_is_read_from_the_cache_and_changes_nothing(tiny_model, qwen_tokenizer):
    system = qwen_tokenizer.encode("<|im_start|>system\nYou are a meticulous assistant who answers briefly."
                                   "<|im_end|>\n<|im_start|>user\n")  # fmt: skip
    params = SamplingParams(max_new_tokens=5, **STOPS)
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=256))
    first = system + qwen_tokenizer.encode("What is a block?")
    engine.add_request("first", first, params)
    assert _run(engine)["first"][-1].cached_tokens == 0
    questions = ["And a page?", "Why sixteen tokens?"]
    for i, question in enumerate(questions):
        engine.add_request(f"q{i}", system + qwen_tokenizer.encode(question), params)
    outs = _run(engine)
    for i, question in enumerate(questions):
        prompt = system + qwen_tokenizer.encode(question)
        assert outs[f"q{i}"][-1].cached_tokens == len(system) // 16 * 16 > 0
        assert _tokens(outs[f"q{i}"]) == generate(tiny_model, qwen_tokenizer, prompt, params).token_ids
    stats = engine.stats()
    assert stats.prefix_cache_hits_total == 2 * (len(system) // 16 * 16)
    assert stats.prefix_cache_queries_total == len(first) + sum(len(system) + len(qwen_tokenizer.encode(q))
                                                                for q in questions)  # fmt: skip


def test_a_request_larger_than_the_whole_cache_is_refused_naming_the_limits(tiny_model, qwen_tokenizer):
    """A budget of 4 blocks holds 64 tokens: max_model_len (not asked for) shrinks to that, and a longer
    request is refused (the server's 400) with both limits named."""
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, kv_cache_memory=_budget(tiny_model, 4)))
    assert engine.max_model_len == 64
    with pytest.raises(ValueError, match=r"max_model_len of 64 tokens, all its KV cache holds \(6.1e-05 GiB"):
        engine.add_request("big", [1] * 50, SamplingParams(max_new_tokens=20))
    engine.add_request("fits", [1] * 50, SamplingParams(max_new_tokens=14))  # 63 tokens stored: 4 blocks
    assert len(_run(engine)["fits"]) == 14


def test_kv_budget_against_max_model_len(tiny_model):
    block = block_nbytes(tiny_model.config, tiny_model.dtype)
    with pytest.raises(ValueError, match=r"holds 32 tokens of KV cache, fewer than one request of --max-model-len 100"):
        plan_kv_blocks(tiny_model, 16, 2 * block / GIB, 8, 100, max_model_len_given=True)
    assert plan_kv_blocks(tiny_model, 16, 2 * block / GIB, 8, 100, max_model_len_given=False) == (2, 32)
    with pytest.raises(ValueError, match="holds no KV block"):
        plan_kv_blocks(tiny_model, 16, block / 2 / GIB, 8, 100, max_model_len_given=False)
    # the default: no more than max_num_seqs full-length requests use, never less than one
    assert plan_kv_blocks(tiny_model, 16, None, 3, 100, max_model_len_given=False) == (21, 100)


def test_generate_batch_takes_text_or_token_ids(tiny_model, qwen_tokenizer):
    """Offline batches take raw text (encoded as it is) or ids; add_request says what it wants instead of
    failing inside torch on a string."""
    params = SamplingParams(max_new_tokens=4, **STOPS)
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=64))
    text, ids = engine.generate_batch(["Hello there", qwen_tokenizer.encode("Hello there")], params)
    assert text.token_ids == ids.token_ids == generate(tiny_model, qwen_tokenizer, "Hello there", params).token_ids
    with pytest.raises(TypeError, match="list of token ids"):
        engine.add_request("r", "Hello there", params)


def test_max_model_len_outside_the_models_context_is_refused(tiny_model, qwen_tokenizer):
    """An explicit --max-model-len is honoured or refused, never silently changed (0 is not 'unset')."""
    limit = tiny_model.config.max_context_length
    for bad in (0, -5, limit + 1):
        with pytest.raises(ValueError, match=rf"--max-model-len must be between 1 and .* {limit} tokens, got {bad}"):
            LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_model_len=bad, kv_cache_memory=0.01))
    assert LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_model_len=limit)).max_model_len == limit


def test_a_full_pool_queues_and_the_queue_has_a_limit(tiny_model, qwen_tokenizer):
    """Two requests each needing most of the pool run one after the other (the second waits for blocks,
    not for max_num_seqs); past max_queue waiting requests the engine says busy."""
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=8, max_model_len=64, max_queue=2,
                                                              kv_cache_memory=_budget(tiny_model, 4)))  # fmt: skip
    params = SamplingParams(max_new_tokens=4, eos_token_ids=(), stop_words_ids=())
    prompts = [random_ids(1, 40, seed=s)[0].tolist() for s in (1, 2)]
    engine.add_request("a", prompts[0], params)
    engine.add_request("b", prompts[1], params)
    with pytest.raises(EngineBusyError, match="queue is full"):
        engine.add_request("c", [1, 2], params)
    first = engine.step()
    assert [s.seq_id for s in engine.running] == ["a"] and [s.seq_id for s in engine.waiting] == ["b"]
    outs = _run(engine)
    outs["a"] = first + outs["a"]
    for name, prompt in zip("ab", prompts, strict=True):
        assert _tokens(outs[name]) == generate(tiny_model, qwen_tokenizer, prompt, params).token_ids


def test_no_block_leaks_over_many_requests_with_aborts(tiny_model, qwen_tokenizer):
    """The real engine, cheaply: 40 short requests (shared prefixes, random lengths, aborts while waiting
    and while running, a pool small enough to preempt); every block comes back."""
    rng = random.Random(0)
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=4, max_model_len=64, prefill_chunk=8,
                                                              kv_cache_memory=_budget(tiny_model, 5)))  # fmt: skip
    prefixes = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 5, 17)]
    finished: dict[str, str] = {}
    for i in range(40):
        prompt = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 6))]
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=rng.randrange(1, 24), eos_token_ids=(),
                                                          stop_words_ids=()))  # fmt: skip
        if rng.random() < 0.15:
            out = engine.abort(str(rng.randrange(i + 1)))
            if out is not None:
                finished[out.request_id] = out.finish_reason
        if i % 2:
            finished.update((o.request_id, o.finish_reason) for o in engine.step() if o.finished)
    finished.update((o.request_id, o.finish_reason) for outs in _run(engine).values() for o in outs if o.finished)
    assert len(finished) == 40 and "abort" in finished.values() and "length" in finished.values()
    stats = engine.stats()
    assert stats.preemptions_total > 0 and stats.prefix_cache_hits_total > 0
    allocator = engine.scheduler.allocator
    allocator.check()
    assert stats.kv_blocks_used == 0 and allocator.num_free == allocator.num_blocks and not engine.requests


def test_metrics_report_blocks_preemptions_and_prefix_hits(tiny_model, qwen_tokenizer):
    from qwenlm.server.metrics import ServerMetrics

    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=128))
    prompt = random_ids(1, 40, seed=4)[0].tolist()
    for name in ("a", "b"):
        engine.add_request(name, prompt, SamplingParams(max_new_tokens=2))
        _run(engine)
    text = ServerMetrics().render(engine.stats())
    blocks = engine.scheduler.allocator.num_blocks
    for line in (f"qwenlm_kv_cache_blocks_total {blocks}", "qwenlm_kv_cache_blocks_used 0",
                 f"qwenlm_kv_cache_blocks_free {blocks}", "qwenlm_kv_cache_blocks_cached 2",
                 "qwenlm_preemptions_total 0", "qwenlm_prefix_cache_queries_total 80",
                 "qwenlm_prefix_cache_hits_total 32", "qwenlm_prefix_cache_hit_rate 0.4"):  # fmt: skip
        assert line in text.splitlines(), line


def test_int8_kv_blocks_count_about_half(tiny_checkpoint):
    from qwenlm.model import load_model

    model = load_model(tiny_checkpoint, torch_dtype=torch.bfloat16, progress=False)
    plain = block_nbytes(model.config, torch.bfloat16)
    model.config.use_cache_quantization = True
    try:
        # per token and head: 16 bf16 values (32 bytes) against 16 codes + a bf16 scale and zero (20 bytes)
        assert plan_kv_blocks(model, 16, 10 * plain / GIB, 8, 16, max_model_len_given=True)[0] == 10 * 32 // 20
    finally:
        model.config.use_cache_quantization = False


def test_the_torch_path_without_kernels_gives_the_same_tokens(tiny_model, qwen_tokenizer, monkeypatch):
    """What a GPU runs (no CPU kernels): paged decode attention as gather + SDPA with each row's length as the
    mask. A continuous batch with rows at different positions equals each request alone."""
    from qwenlm.kernels import cpu

    monkeypatch.setattr(cpu, "kernels_available", lambda: False)
    monkeypatch.setattr(cpu, "layer_kernels_available", lambda: False)  # nor AVX2's, where they stand in
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=3, max_model_len=128, prefill_chunk=7))
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 23, 12)]
    params = SamplingParams(max_new_tokens=6, eos_token_ids=(), stop_words_ids=())
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outs = _run(engine)
    for i, prompt in enumerate(prompts):
        assert _tokens(outs[str(i)]) == generate(tiny_model, qwen_tokenizer, prompt, params).token_ids
