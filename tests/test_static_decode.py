"""The static decode loop (fixed-shape cache, device-side positions/RoPE/LogN/mask/sampling, torch.compile)
computes what the eager loop computes: same logits within fp32 tolerance, same tokens, same stops."""

from __future__ import annotations

import dataclasses
import importlib
import logging

import pytest
import torch
from token_ids import random_ids

from qwenlm.generation import static
from qwenlm.generation.generate import StopTracker, compile_requested, generate_steps, left_pad
from qwenlm.generation.params import SamplingParams
from qwenlm.generation.sampling import draw, sample_next, sample_next_on_device, seen_mask
from qwenlm.model import KVCache, load_model

generate_module = importlib.import_module("qwenlm.generation.generate")  # the package re-exports a function so named

# Max |logit difference| relative to the logits' spread. fp32: the static step attends over the whole
# (masked) capacity with SDPA where the eager one reads only the filled slots (often with qwenlm's CPU
# kernel), so only the summation order differs. bf16: a layer output's rounding can flip.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
GREEDY = SamplingParams(max_new_tokens=12)  # no eos, no stop words: exactly 12 tokens per row
SAMPLED = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=40, top_p=0.9,
                         repetition_penalty=1.3, seed=11)  # fmt: skip


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    return [random_ids(1, n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]


def _model_decode(model, ids: torch.Tensor, mask: torch.Tensor | None, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode with the model's forward on a KVCache: logits [B, steps, V] (fp32) and tokens [B, steps]."""
    B, T = ids.shape
    cache = KVCache.for_model(model, batch_size=B, capacity=T + steps)
    logits = [model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1].float()]
    tokens = [logits[-1].argmax(-1)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1) if mask is not None else None
        logits.append(model(tokens[-1][:, None], attention_mask=mask, past_key_values=cache).logits[:, -1].float())
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(logits, dim=1), torch.stack(tokens, dim=1)


def _static_decode(decoder: static.StaticDecoder, ids: torch.Tensor, mask: torch.Tensor | None,
                   tokens: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Logits [B, steps, V] of the static decoder fed `tokens` [B, steps] (the last one is not fed)."""
    logits = [decoder.prefill(ids, mask)]
    for j in range(tokens.shape[1] - 1):
        decoder.input_ids.copy_(tokens[:, j : j + 1])
        logits.append(decoder.step().clone())
        decoder.position.add_(1)
    return torch.stack(logits, dim=1)


def _assert_logits_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    spread = expected.std().item()
    assert spread > 0
    assert (got - expected).abs().max().item() <= TOLERANCE[dtype] * max(spread, 1.0)


def _steps(model, prompts, params: SamplingParams, **kwargs) -> list[tuple[list[int], list[bool], list]]:
    return [(s.token_ids, s.finished, s.finish_reasons) for s in generate_steps(model, prompts, params, **kwargs)]


@pytest.fixture(scope="module")
def bf16_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch_dtype=torch.bfloat16, progress=False)


@pytest.fixture(scope="module")
def compiled_model(tiny_model):
    """tiny_model with its decode step compiled once for this module's shape (batch 2, capacity 256):
    every compiled test below uses that shape, so none of them recompiles."""
    with torch.no_grad():
        _steps(tiny_model, _prompts(0, (9, 5)), SamplingParams(max_new_tokens=2), compile=True)
    decoder = getattr(tiny_model, static._DECODER_ATTR)
    assert decoder.compiled and decoder.capacity == 256, "torch.compile failed: see the logged warning"
    yield tiny_model
    static.release_decoder(tiny_model)


# --------------------------------------------------------------------------------------------------
# The step itself, eager, against the model's forward
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_static_step_equals_model_decode_on_a_left_padded_batch(tiny_model, bf16_model, dtype):
    model = tiny_model if dtype == torch.float32 else bf16_model
    ids, mask = left_pad(_prompts(1, (11, 4, 7)))
    with torch.no_grad():
        expected, tokens = _model_decode(model, ids, mask, steps=10)
        got = _static_decode(static.StaticDecoder(model, 3, capacity=256), ids, mask, tokens)
    _assert_logits_close(got, expected, dtype)
    if dtype == torch.float32:
        assert torch.equal(got.argmax(-1), tokens)


def test_static_step_equals_model_decode_past_seq_length_with_ntk_and_logn(long_context_model):
    """seq_length=16: prompts of 40 and 12 tokens (left-padded to 40), decoded to 56, so the rows get different
    dynamic-NTK alphas (from their unpadded lengths: 7 and 1) and every step uses LogN (position + 1 > 16)."""
    config = long_context_model.config
    assert config.use_dynamic_ntk and config.use_logn_attn and config.seq_length == 16
    ids, mask = left_pad(_prompts(2, (40, 12)))
    with torch.no_grad():
        expected, tokens = _model_decode(long_context_model, ids, mask, steps=16)
        decoder = static.StaticDecoder(long_context_model, 2, capacity=256)
        got = _static_decode(decoder, ids, mask, tokens)
    alphas = decoder.cache.ntk_alpha.tolist()
    assert alphas == [7.0, 1.0]
    _assert_logits_close(got, expected, torch.float32)
    assert torch.equal(got.argmax(-1), tokens)


def test_static_loop_reads_tokens_in_chunks_with_and_without_running_ahead(tiny_model):
    """The token loop's bookkeeping (chunked host reads, the step queued ahead of a read as on CUDA) gives
    exactly the eager loop's tokens, whatever the chunking."""
    prompts = _prompts(3, (6, 10))
    ids, mask = left_pad(prompts)
    expected = [step[0] for step in _steps(tiny_model, prompts, GREEDY, compile=False)]
    decoder = static.StaticDecoder(tiny_model, 2, capacity=256)
    with torch.no_grad():
        for sync_every, run_ahead in [(1, False), (5, False), (1, True), (5, True), (12, True), (50, False)]:
            got = list(decoder.token_steps(ids, mask, GREEDY, None, None, sync_every, run_ahead))
            assert got == expected, (sync_every, run_ahead)


def test_static_loop_respects_vocab_limit_and_repetition_penalty(tiny_model):
    params = SamplingParams(max_new_tokens=10, repetition_penalty=3.0)  # greedy with a strong penalty
    prompts = _prompts(4, (8, 3))
    ids, mask = left_pad(prompts)
    expected = [step[0] for step in _steps(tiny_model, prompts, params, vocab_limit=1000, compile=False)]
    with torch.no_grad():
        got = list(static.StaticDecoder(tiny_model, 2, 256).token_steps(ids, mask, params, 1000, None, 4))
    assert got == expected
    assert all(t < 1000 for row in got for t in row)


# --------------------------------------------------------------------------------------------------
# Compiled (CPU: inductor) against eager
# --------------------------------------------------------------------------------------------------
def test_compiled_step_logits_equal_the_eager_step(compiled_model):
    ids, mask = left_pad(_prompts(5, (12, 7)))
    with torch.no_grad():
        _, tokens = _model_decode(compiled_model, ids, mask, steps=8)
        decoder = static.acquire_decoder(compiled_model, 2, 12 + 8, compiled=True)
        try:
            assert decoder.compiled and decoder.capacity == 256
            compiled = _static_decode(decoder, ids, mask, tokens)
        finally:
            decoder.release()
        eager = _static_decode(static.StaticDecoder(compiled_model, 2, 256), ids, mask, tokens)
    _assert_logits_close(compiled, eager, torch.float32)
    assert torch.equal(compiled.argmax(-1), tokens)


def test_compiled_greedy_decode_equals_eager_decode(compiled_model):
    prompts = _prompts(6, (15, 9))
    assert _steps(compiled_model, prompts, GREEDY, compile=True) == _steps(compiled_model, prompts, GREEDY,
                                                                          compile=False)  # fmt: skip


def test_compiled_seeded_sampling_equals_eager_sampling(compiled_model):
    """Temperature, top-k, top-p and repetition penalty, drawn on the device without multinomial's host
    sync: the same tokens as the eager loop for the same seed."""
    prompts = _prompts(7, (10, 13))
    eager = _steps(compiled_model, prompts, SAMPLED, compile=False)
    assert _steps(compiled_model, prompts, SAMPLED, compile=True) == eager
    other_seed = dataclasses.replace(SAMPLED, seed=12)
    assert _steps(compiled_model, prompts, other_seed, compile=True) != eager


@pytest.mark.parametrize("sync_every", [1, 3])
def test_eos_mid_batch_finishes_that_row_only(compiled_model, sync_every):
    """Row 0 samples the eos id at step 4 (chosen from its greedy output); row 1 goes on to the length
    limit. The finished row reports its pad id afterwards and never a sampled token, as in the eager loop."""
    prompts = _prompts(8, (9, 14))
    greedy = [step[0] for step in _steps(compiled_model, prompts, GREEDY, compile=False)]
    eos = greedy[3][0]
    if eos in [step[1] for step in greedy]:
        pytest.skip("the chosen eos id also appears in row 1")  # not with these seeds
    params = SamplingParams(max_new_tokens=12, eos_token_ids=(eos,))
    expected = _steps(compiled_model, prompts, params, compile=False)
    got = _steps(compiled_model, prompts, params, compile=True, sync_every=sync_every)
    assert got == expected
    assert got[3][1:] == ([True, False], ["stop", None])
    assert all(tokens[0] == eos and finished[0] for tokens, finished, _ in got[4:])  # eos doubles as pad
    assert got[-1][1:] == ([True, True], [None, "length"]) and len(got) == 12


def test_stop_words_and_all_rows_done_end_the_loop_early(compiled_model):
    prompts = _prompts(9, (5, 8))
    greedy = [step[0] for step in _steps(compiled_model, prompts, GREEDY, compile=False)]
    words = ((greedy[2][0], greedy[3][0]), (greedy[5][1],))  # row 0 stops at step 4, row 1 at step 6 at the latest
    params = SamplingParams(max_new_tokens=12, stop_words_ids=words)
    expected = _steps(compiled_model, prompts, params, compile=False)
    assert _steps(compiled_model, prompts, params, compile=True, sync_every=4) == expected
    assert len(expected) <= 6 and all(expected[-1][1])


# --------------------------------------------------------------------------------------------------
# Choosing the path
# --------------------------------------------------------------------------------------------------
def test_unsupported_models_fall_back_to_the_eager_loop_with_a_log_message(tiny_checkpoint, caplog, monkeypatch):
    model = load_model(tiny_checkpoint, torch_dtype=torch.float32, progress=False, use_cache_quantization=True)
    monkeypatch.setattr(generate_module, "_logged", set())
    prompts = _prompts(10, (6,))
    with caplog.at_level(logging.INFO, logger="qwenlm.generation.generate"):
        got = _steps(model, prompts, GREEDY, compile=True)
    assert "decoding with the eager loop: the int8 KV cache" in caplog.text
    assert got == _steps(model, prompts, GREEDY, compile=False)
    assert getattr(model, static._DECODER_ATTR, None) is None
    model.config.use_cache_quantization = False
    model.set_attn_implementation("eager")
    assert static.unsupported_reason(model) == "the eager attention implementation was selected"


def test_a_busy_decoder_sends_a_second_generation_to_the_eager_loop(compiled_model, caplog, monkeypatch):
    monkeypatch.setattr(generate_module, "_logged", set())
    prompts = _prompts(11, (7, 4))
    expected = _steps(compiled_model, prompts, GREEDY, compile=False)
    first = generate_steps(compiled_model, prompts, GREEDY, compile=True)
    steps = [next(first)]  # holds the model's static decoder
    with caplog.at_level(logging.INFO, logger="qwenlm.generation.generate"):
        assert _steps(compiled_model, prompts, GREEDY, compile=True) == expected
    assert "in use by another generation" in caplog.text
    steps += list(first)
    assert [(s.token_ids, s.finished, s.finish_reasons) for s in steps] == expected
    decoder = static.acquire_decoder(compiled_model, 2, 30, compiled=True)  # released by both
    assert decoder is not None
    decoder.release()


def test_compile_is_chosen_by_argument_then_environment_then_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("QWENLM_COMPILE", raising=False)
    assert not compile_requested(None, cpu) and compile_requested(None, cuda)
    assert compile_requested(True, cpu) and not compile_requested(False, cuda)
    monkeypatch.setenv("QWENLM_COMPILE", "1")
    assert compile_requested(None, cpu) and not compile_requested(False, cpu)
    monkeypatch.setenv("QWENLM_COMPILE", "0")
    assert not compile_requested(None, cuda)
    monkeypatch.setenv("QWENLM_COMPILE", "maybe")
    with pytest.raises(ValueError, match="QWENLM_COMPILE"):
        compile_requested(None, cpu)


def test_capacity_is_a_power_of_two_within_the_context():
    assert static.capacity_for(1, 8192) == 256
    assert static.capacity_for(257, 8192) == 512
    assert static.capacity_for(640, 8192) == 1024
    assert static.capacity_for(5000, 6000) == 6144  # the context (rounded up to 256) caps it
    assert static.capacity_for(7000, 2048) == 7168  # never below what is asked


def test_stop_tracker_pads_finished_rows():
    params = SamplingParams(max_new_tokens=3, eos_token_ids=(7,), stop_words_ids=((5, 6),))
    tracker = StopTracker(params, torch.tensor([[-1, 5], [1, 2]]))
    first = tracker.push([6, 7])  # row 0: prompt's 5 + 6 is a stop word; row 1: eos
    assert (first.token_ids, first.finished, first.finish_reasons) == ([6, 7], [True, True], ["stop", "stop"])
    assert tracker.push([3, 4]).token_ids == [7, 7]


# --------------------------------------------------------------------------------------------------
# Sync-free sampling
# --------------------------------------------------------------------------------------------------
def test_draw_picks_what_multinomial_picks_for_the_same_generator():
    probs = (torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * 3).softmax(-1)
    probs[1, 100:] = 0  # zero-probability ids are never drawn
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(20):
        expected = torch.multinomial(probs, 1, generator=a).squeeze(-1)
        assert torch.equal(draw(probs, b), expected)
        assert expected[1] < 100


def test_sample_next_on_device_equals_sample_next():
    logits = torch.randn(2, 3000, generator=torch.Generator().manual_seed(2)) * 4
    history = torch.tensor([[-1, 5, 17, 5], [9, 2999, 0, 1]])
    for params in (SAMPLED, SamplingParams(repetition_penalty=2.0)):
        a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        seen = seen_mask(history, 3000)
        assert torch.equal(sample_next_on_device(logits, params, seen, b), sample_next(logits, params, history, a))


def test_bench_times_the_compiled_loop_when_asked(compiled_model):
    from qwenlm.bench import BenchSettings, run_qwenlm, uses_compiled_loop
    from qwenlm.cli import build_parser

    ids = random_ids(2, 9, seed=12)
    assert run_qwenlm(compiled_model, ids, 6, compile=True).token_ids == run_qwenlm(compiled_model, ids, 6).token_ids
    args = build_parser().parse_args(["bench", "--compile"])
    assert args.compile is True and uses_compiled_loop(BenchSettings(compile=args.compile))
    assert build_parser().parse_args(["bench"]).compile is None
