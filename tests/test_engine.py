"""The serving engine: continuous batching equals running alone, prefix reuse, chunked prefill,
abort, backpressure, and the async wrapper."""

from __future__ import annotations

import asyncio

import pytest
import torch
from token_ids import random_ids

from qwenlm.engine import AsyncEngine, EngineArgs, EngineBusyError, LLMEngine
from qwenlm.generation import SamplingParams, generate

STOPS = {"eos_token_ids": (151643,), "stop_words_ids": ((151645,), (151644,))}


def _run(engine: LLMEngine) -> dict[str, list]:
    outputs: dict[str, list] = {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def _tokens(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.mark.parametrize("chunk", [3, 256])
def test_continuous_batch_equals_each_request_alone(tiny_model, qwen_tokenizer, chunk):
    prompts = [qwen_tokenizer.encode(t) for t in ["Hello there", "A much longer prompt, with many more tokens in it",
                                                  "你好", "a fourth request waits for a free slot", "5"]]  # fmt: skip
    params = [SamplingParams(max_new_tokens=n, **STOPS) for n in (9, 4, 12, 6, 7)]
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=3, prefill_chunk=chunk, max_model_len=512))
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    outputs = _run(engine)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        alone = generate(tiny_model, qwen_tokenizer, prompt, p)
        outs = outputs[f"r{i}"]
        assert _tokens(outs) == alone.token_ids
        assert "".join(o.text for o in outs) == alone.text
        assert outs[-1].finish_reason == alone.finish_reason and all(o.finish_reason is None for o in outs[:-1])
        assert outs[-1].completion_tokens == len(alone.token_ids) and outs[-1].prompt_tokens == len(prompt)


def test_seeded_sampling_in_a_batch_equals_alone(tiny_model, qwen_tokenizer):
    params = SamplingParams(max_new_tokens=8, do_sample=True, top_p=0.9, temperature=0.8, seed=5, **STOPS)
    prompt = qwen_tokenizer.encode("Sample me")
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=256))
    engine.add_request("a", prompt, params)
    engine.add_request("b", qwen_tokenizer.encode("another request beside it"), params)
    assert _tokens(_run(engine)["a"]) == generate(tiny_model, qwen_tokenizer, prompt, params).token_ids


def test_second_chat_turn_reuses_the_first_turns_cache(tiny_model, qwen_tokenizer):
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=512))
    params = SamplingParams(max_new_tokens=6, **STOPS)
    turn1 = qwen_tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi")
    engine.add_request("t1", turn1, params)
    reply = _tokens(_run(engine)["t1"])
    turn2 = turn1 + reply + qwen_tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd then?")
    engine.add_request("t2", turn2, params)
    outs = _run(engine)["t2"]
    # the full KV blocks of turn 1 and its reply, all but the never-fed last token
    assert outs[-1].cached_tokens == (len(turn1) + len(reply) - 1) // 16 * 16 > 0
    assert _tokens(outs) == generate(tiny_model, qwen_tokenizer, turn2, params).token_ids
    assert engine.stats().cached_prompt_tokens_total == outs[-1].cached_tokens


def test_prefix_is_not_reused_across_different_ntk_alphas(long_context_model, qwen_tokenizer):
    """seq_length 16: a 16-token prompt prefills with alpha 1, a 46-token one with alpha 7; keys cached
    under alpha 1 are not the keys a fresh alpha-7 prefill computes, so they must not be reused. A later
    alpha-7 prompt with the same start does reuse the alpha-7 blocks."""
    engine = LLMEngine(long_context_model, qwen_tokenizer, EngineArgs(max_num_seqs=1, max_model_len=256))
    params = SamplingParams(max_new_tokens=3, **STOPS)
    short = random_ids(1, 16, seed=1)[0].tolist()
    engine.add_request("short", short, params)
    _run(engine)
    longer = short + random_ids(1, 30, seed=2)[0].tolist()
    engine.add_request("long", longer, params)
    outs = _run(engine)["long"]
    assert outs[-1].cached_tokens == 0
    assert _tokens(outs) == generate(long_context_model, qwen_tokenizer, longer, params).token_ids
    again = longer[:40] + random_ids(1, 5, seed=3)[0].tolist()  # 45 tokens: alpha 7 too
    engine.add_request("again", again, params)
    outs = _run(engine)["again"]
    assert outs[-1].cached_tokens == 32
    assert _tokens(outs) == generate(long_context_model, qwen_tokenizer, again, params).token_ids


def test_abort_frees_the_blocks_and_stop_strings_hold_back(tiny_model, qwen_tokenizer):
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=1, max_model_len=256))
    engine.add_request("long", qwen_tokenizer.encode("go"), SamplingParams(max_new_tokens=100, **STOPS))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_used == 1
    out = engine.abort("long")
    assert out.finish_reason == "abort" and not engine.has_work() and engine.stats().kv_blocks_used == 0
    full = generate(tiny_model, qwen_tokenizer, "stop test", SamplingParams(max_new_tokens=12, **STOPS))
    stop = full.text[3:6]
    engine.add_request(
        "s", qwen_tokenizer.encode("stop test"), SamplingParams(max_new_tokens=12, stop=(stop,), **STOPS)
    )
    outs = _run(engine)["s"]
    assert "".join(o.text for o in outs) == full.text[: full.text.index(stop)] and outs[-1].finish_reason == "stop"


def test_bad_requests_and_backpressure(tiny_model, qwen_tokenizer):
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=1, max_model_len=64, max_queue=1))
    with pytest.raises(ValueError, match="max_model_len of 64"):
        engine.add_request("big", [1] * 60, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    engine.add_request("a", [1, 2], SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineBusyError, match="queue is full"):
        engine.add_request("b", [1, 2], SamplingParams(max_new_tokens=2))


def test_logprobs_are_returned_per_token(tiny_model, qwen_tokenizer):
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=1, max_model_len=128))
    engine.add_request("lp", qwen_tokenizer.encode("hi"), SamplingParams(max_new_tokens=3), logprobs=2)
    outs = _run(engine)["lp"]
    for out in outs:
        (lp,) = out.logprobs
        assert lp.token_id == out.token_ids[0] and lp.logprob <= 0 and len(lp.top) == 2
        assert lp.top[0][1] >= lp.top[1][1] and lp.top[0][1] >= lp.logprob  # greedy: chosen is the top one
        assert lp.top[0][0] == lp.token_id


def test_a_row_with_logprobs_leaves_the_next_rows_sampling_alone(tiny_model, qwen_tokenizer):
    """Rows sampled in one step each keep their own logits, whether or not an earlier row asked for logprobs;
    a lone greedy row (the fused step's own argmax) gives the same tokens as one sampled from its logits."""
    prompts = [qwen_tokenizer.encode(t) for t in ("first row", "second row", "third")]
    params = SamplingParams(max_new_tokens=5, **STOPS)
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=3, max_model_len=128))
    for i, (prompt, logprobs) in enumerate(zip(prompts, (2, None, None), strict=True)):
        engine.add_request(f"r{i}", prompt, params, logprobs=logprobs)
    outputs = _run(engine)
    for i, prompt in enumerate(prompts):
        assert _tokens(outputs[f"r{i}"]) == generate(tiny_model, qwen_tokenizer, prompt, params).token_ids
    engine.add_request("alone", prompts[1], params)
    assert _tokens(_run(engine)["alone"]) == _tokens(outputs["r1"])


def test_async_engine_streams_concurrent_requests_and_aborts_on_cancel(tiny_model, qwen_tokenizer):
    engine = AsyncEngine(LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=256)))
    params = SamplingParams(max_new_tokens=5, **STOPS)

    async def collect(request_id: str, prompt: str) -> list[int]:
        return [t async for out in engine.generate(qwen_tokenizer.encode(prompt), params, request_id)
                for t in out.token_ids]  # fmt: skip

    async def cancel_early() -> None:
        stream = engine.generate(qwen_tokenizer.encode("forever"), SamplingParams(max_new_tokens=200), "cancel")
        async for _ in stream:
            break
        await stream.aclose()

    async def main():
        return await asyncio.gather(collect("x", "Hello"), collect("y", "你好"), cancel_early())

    try:
        x, y, _ = asyncio.run(main())
        assert x == generate(tiny_model, qwen_tokenizer, "Hello", params).token_ids
        assert y == generate(tiny_model, qwen_tokenizer, "你好", params).token_ids
        assert engine.stats().requests_running == 0 and "cancel" not in engine.engine.requests
        assert engine.stats().kv_blocks_used == 0  # the cancelled request's blocks are back
    finally:
        engine.shutdown()


def test_per_row_cache_positions_equal_rows_alone(tiny_model):
    """The model side of continuous batching: rows at different positions in one forward."""
    from qwenlm.model import KVCache

    prompts = [random_ids(1, n, seed=n)[0] for n in (5, 11)]
    cache = KVCache.for_model(tiny_model, batch_size=2, capacity=32)
    for row, p in enumerate(prompts):  # prefill each row alone into its own cache row
        one = KVCache.for_model(tiny_model, batch_size=1, capacity=32)
        tiny_model(p[None], past_key_values=one)
        for layer in range(len(cache)):
            cache.keys[layer][row, :, : len(p)] = one.keys[layer][0, :, : len(p)]
            cache.values[layer][row, :, : len(p)] = one.values[layer][0, :, : len(p)]
    cache.ntk_alpha = torch.ones(2)
    nxt = torch.tensor([[7], [9]])
    logits = tiny_model(nxt, past_key_values=cache, cache_positions=[5, 11]).logits
    for row, p in enumerate(prompts):
        alone = tiny_model(torch.cat([p, nxt[row]])[None], use_cache=False).logits[0, -1]
        torch.testing.assert_close(logits[row, -1], alone, rtol=0, atol=1e-4)


# ---- OpenAI-compatibility hooks: prompt logprobs, logit bias, grammar constraints ---------------


def _direct_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[p] | ids[:p]) for p >= 1, from one plain forward over the whole prompt."""
    logits = model(torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [4, 256])
def test_prompt_logprobs_come_from_the_prefill_and_equal_a_direct_forward(tiny_model, qwen_tokenizer, chunk):
    """Chunked or not, batched beside other newcomers, and never read from the prefix cache."""
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=3, prefill_chunk=chunk, max_model_len=256))
    scored = qwen_tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over")
    engine.add_request("warm", scored[:9], SamplingParams(max_new_tokens=2, **STOPS))  # leaves a cached prefix
    _run(engine)
    engine.add_request(
        "plain", qwen_tokenizer.encode("a neighbour in the same prefill"), SamplingParams(max_new_tokens=3)
    )
    engine.add_request("scored", scored, SamplingParams(max_new_tokens=2, **STOPS), logprobs=1, prompt_logprobs=2)
    outs = _run(engine)
    first = outs["scored"][0]
    entries = first.prompt_logprobs
    assert first.cached_tokens == 0 and len(entries) == len(scored) and entries[0] is None
    assert all(o.prompt_logprobs is None for o in outs["scored"][1:] + outs["plain"])
    assert [e.token_id for e in entries[1:]] == scored[1:]
    direct = _direct_prompt_logprobs(tiny_model, scored)
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries[1:]]), direct, rtol=0, atol=1e-4)
    for e in entries[1:]:
        assert len(e.top) == 2 and e.top[0][1] >= e.top[1][1] and e.logprob <= e.top[0][1] + 1e-6
    # the generated tokens are those of a request without prompt logprobs
    assert (
        _tokens(outs["scored"])
        == generate(tiny_model, qwen_tokenizer, scored, SamplingParams(max_new_tokens=2, **STOPS)).token_ids
    )


def test_logit_bias_bans_and_forces_tokens(tiny_model, qwen_tokenizer):
    prompt = qwen_tokenizer.encode("Bias me")
    free = generate(tiny_model, qwen_tokenizer, prompt, SamplingParams(max_new_tokens=4)).token_ids
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=128))
    engine.add_request("ban", prompt, SamplingParams(max_new_tokens=4, logit_bias={free[0]: -100}))
    engine.add_request("force", prompt, SamplingParams(max_new_tokens=4, logit_bias={42: 100}))
    outs = _run(engine)
    assert _tokens(outs["ban"])[0] != free[0]
    assert _tokens(outs["force"]) == [42] * 4


def test_grammar_constraint_holds_per_row_in_a_continuous_batch(tiny_model, qwen_tokenizer):
    import json

    from qwenlm.generation.constrained import GrammarCompiler, json_schema_grammar

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    compiler = GrammarCompiler(qwen_tokenizer, end_token_ids=[151643, 151645, 151644])
    engine = LLMEngine(tiny_model, qwen_tokenizer, EngineArgs(max_num_seqs=3, max_model_len=256))
    params = SamplingParams(max_new_tokens=40, **STOPS)
    sampled = SamplingParams(max_new_tokens=40, do_sample=True, temperature=1.5, seed=3, **STOPS)
    plain_prompt = qwen_tokenizer.encode("unconstrained neighbour")
    engine.add_request("g1", qwen_tokenizer.encode("Answer in JSON"), params,
                       constraint=compiler.compile(json_schema_grammar(schema)))  # fmt: skip
    engine.add_request("plain", plain_prompt, params)
    engine.add_request("g2", qwen_tokenizer.encode("Another"), sampled,
                       constraint=compiler.compile(json_schema_grammar(schema)))  # fmt: skip
    outs = _run(engine)
    for name in ("g1", "g2"):
        text = "".join(o.text for o in outs[name])
        value = json.loads(text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
        assert outs[name][-1].finish_reason == "stop"
    assert _tokens(outs["plain"]) == generate(tiny_model, qwen_tokenizer, plain_prompt, params).token_ids


def test_time_to_first_token_totals_are_cumulative_while_the_window_slides():
    """Prometheus reads a summary's _sum and _count as counters: they never fall, whatever the window keeps."""
    from qwenlm.engine import EngineStats

    stats = EngineStats()
    for i in range(300):
        stats.record_first_token(0.5 + i % 3)
    assert len(stats.time_to_first_token_seconds) == 256 and stats.time_to_first_token_seconds[-1] == 0.5 + 299 % 3
    assert stats.time_to_first_token_count == 300
    assert stats.time_to_first_token_sum == sum(0.5 + i % 3 for i in range(300))
