"""Sampling: each logits processor on hand-built distributions, transformers as the fidelity oracle,
seeded and empirical sampling, and SamplingParams validation / construction."""

from __future__ import annotations

import math

import pytest
import torch

from qwenlm.generation.params import SamplingParams
from qwenlm.generation.sampling import (
    apply_logit_bias,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
    process_logits,
    sample_next,
    token_logprobs,
)
from qwenlm.model.config import GenerationConfig

NEG_INF = float("-inf")


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()


def _kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


# --- top-p -------------------------------------------------------------------------------------


def test_top_p_keeps_smallest_nucleus():
    out = apply_top_p(_logits(0.5, 0.3, 0.15, 0.05), 0.8)
    assert _kept(out) == [[0, 1]]
    torch.testing.assert_close(out.softmax(-1), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_top_p_order_independent_of_position():
    out = apply_top_p(_logits(0.05, 0.3, 0.15, 0.5), 0.8)
    assert _kept(out) == [[1, 3]]


def test_top_p_one_is_noop():
    logits = torch.randn(3, 10)
    assert apply_top_p(logits, 1.0) is logits


def test_top_p_tiny_keeps_only_argmax():
    logits = torch.randn(4, 50)
    out = apply_top_p(logits, 1e-8)
    assert _kept(out) == [[i] for i in logits.argmax(-1).tolist()]


def test_top_p_mass_exactly_at_boundary_keeps_next_token():
    # Removed tokens have cumulative mass <= 1 - p; with p = 0.5 the tail [0.25, 0.25] sums to
    # exactly 0.5, so both go and only the top half stays (transformers does the same).
    out = apply_top_p(_logits(0.5, 0.25, 0.25), 0.5)
    assert _kept(out) == [[0]]


def test_top_p_ties_kept_together():
    # Three equal tokens of 0.3 straddle the cut at 0.5: all of them survive, not an arbitrary one.
    out = apply_top_p(_logits(0.3, 0.3, 0.3, 0.1), 0.5)
    assert _kept(out) == [[0, 1, 2]]


def test_top_p_rows_independent():
    logits = torch.cat([_logits(0.5, 0.3, 0.15, 0.05), _logits(0.05, 0.05, 0.1, 0.8)])
    assert _kept(apply_top_p(logits, 0.8)) == [[0, 1], [3]]


def test_top_p_ignores_already_removed_tokens():
    logits = torch.tensor([[0.0, NEG_INF, 0.0, NEG_INF]])
    assert _kept(apply_top_p(logits, 0.9)) == [[0, 2]]


# --- top-k -------------------------------------------------------------------------------------


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert _kept(out) == [[1, 3]]
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0


def test_top_k_ties_at_kth_value_kept():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0]])
    assert _kept(apply_top_k(logits, 2)) == [[0, 1, 2, 4]]


@pytest.mark.parametrize("k", [0, 5, 9])
def test_top_k_off_or_too_large_is_noop(k):
    logits = torch.randn(2, 5)
    assert apply_top_k(logits, k) is logits


def test_top_k_rows_independent():
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert _kept(apply_top_k(logits, 1)) == [[2], [0]]


# --- temperature -------------------------------------------------------------------------------


def test_temperature_scales_distribution():
    # p ∝ q**(1/T): at T = 0.5 the distribution [0.5, 0.25, 0.25] becomes [4, 1, 1] / 6.
    out = apply_temperature(_logits(0.5, 0.25, 0.25), 0.5).softmax(-1)
    torch.testing.assert_close(out, torch.tensor([[4 / 6, 1 / 6, 1 / 6]]))


def test_temperature_rejects_zero():
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(torch.zeros(1, 3), 0.0)


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_temperature_zero_is_greedy(temperature):
    params = SamplingParams(do_sample=True, temperature=temperature)
    assert params.is_greedy
    logits = torch.randn(6, 30)
    ids = sample_next(logits, params, generator=None)  # greedy needs no generator
    assert ids.tolist() == logits.argmax(-1).tolist()


def test_greedy_ignores_warpers():
    logits = torch.randn(2, 30)
    params = SamplingParams(do_sample=False, temperature=0.3, top_k=3, top_p=0.5)
    assert process_logits(logits, params) is logits


# --- repetition penalty ------------------------------------------------------------------------


def test_repetition_penalty_positive_and_negative_scores():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[0, 1, 1, 1]])  # id 1 three times: penalised once
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


def test_repetition_penalty_below_one_rewards():
    out = apply_repetition_penalty(torch.tensor([[2.0, -2.0]]), torch.tensor([[0, 1]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[4.0, -1.0]]))


def test_repetition_penalty_one_is_noop():
    logits = torch.randn(2, 5)
    assert apply_repetition_penalty(logits, torch.tensor([[0, 1], [2, 3]]), 1.0) is logits


def test_repetition_penalty_rows_independent_and_negative_ids_ignored():
    logits = torch.ones(2, 4)
    seen = torch.tensor([[0, -1, -1], [3, 3, 2]])
    out = apply_repetition_penalty(logits, seen, 4.0)
    torch.testing.assert_close(out, torch.tensor([[0.25, 1, 1, 1], [1, 1, 0.25, 0.25]]))


def test_process_logits_penalty_needs_token_ids():
    with pytest.raises(ValueError, match="token_ids"):
        process_logits(torch.zeros(1, 4), SamplingParams(repetition_penalty=1.1))


# --- transformers oracle -----------------------------------------------------------------------


def test_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(4, 64, generator=gen) * 3
        ids = torch.randint(0, 64, (4, 12), generator=gen)
        penalty = [0.7, 1.1, 1.3, 2.0][trial % 4]
        torch.testing.assert_close(
            apply_repetition_penalty(logits, ids, penalty),
            RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()),
            rtol=0,
            atol=0,
        )
        temperature = [0.3, 0.7, 1.5][trial % 3]
        torch.testing.assert_close(
            apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(ids, logits.clone())
        )
        k = [1, 5, 20, 63][trial % 4]
        torch.testing.assert_close(apply_top_k(logits, k), TopKLogitsWarper(k)(ids, logits.clone()), rtol=0, atol=0)
        p = [0.05, 0.5, 0.8, 0.95, 0.999][trial % 5]
        torch.testing.assert_close(apply_top_p(logits, p), TopPLogitsWarper(p)(ids, logits.clone()), rtol=0, atol=0)


def test_min_p_matches_transformers_and_keeps_the_top_token():
    from transformers.generation.logits_process import MinPLogitsWarper

    gen = torch.Generator().manual_seed(2)
    ids = torch.zeros(4, 1, dtype=torch.long)
    for min_p in (0.01, 0.1, 0.5, 1.0):
        logits = torch.randn(4, 256, generator=gen) * 3
        torch.testing.assert_close(
            apply_min_p(logits, min_p), MinPLogitsWarper(min_p)(ids, logits.clone()), rtol=0, atol=0
        )
    assert _kept(apply_min_p(_logits(0.5, 0.3, 0.15, 0.05), 0.2)) == [[0, 1, 2]]  # 0.05 < 0.2 * 0.5
    assert apply_min_p(_logits(0.5, 0.5), 0.0).equal(_logits(0.5, 0.5))
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked rows: the candidates' path; flat rows: the full sort
def test_top_p_on_a_full_vocabulary_matches_transformers(scale):
    """Qwen's 151,936-token rows: the nucleus found among the top candidates is transformers' exactly, and
    rows whose nucleus reaches past the candidates (flat ones) take the full sort."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from qwenlm.generation import sampling

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 151936, generator=gen) * scale
    ids = torch.zeros(3, 1, dtype=torch.long)
    for p in (0.05, 0.5, 0.8, 0.95):
        fast = sampling._top_p_threshold_from_candidates(logits, p)
        assert (fast is not None) == (scale > 1), "peaked rows must not sort the whole vocabulary"
        torch.testing.assert_close(apply_top_p(logits, p), TopPLogitsWarper(p)(ids, logits.clone()), rtol=0, atol=0)
    mixed = torch.cat([logits[:1] * 8 / scale, torch.zeros(1, 151936)])  # one flat row: all rows sort
    assert sampling._top_p_threshold_from_candidates(mixed, 0.8) is None
    assert _kept(apply_top_p(mixed, 0.8))[1] == list(range(151936))


def test_process_logits_matches_transformers_pipeline():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.1)
    hf = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.1),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.8),
            MinPLogitsWarper(0.05),
        ]
    )
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=gen) * 4
    ids = torch.randint(0, 100, (3, 30), generator=gen)
    torch.testing.assert_close(process_logits(logits, params, ids), hf(ids, logits.clone()))


# --- sampling ----------------------------------------------------------------------------------


def _draws(seed: int, steps: int = 5) -> list[list[int]]:
    generator = make_generator(seed, "cpu")  # one generator per request, reused across steps
    params = SamplingParams(do_sample=True)
    return [sample_next(torch.zeros(8, 1000), params, generator=generator).tolist() for _ in range(steps)]


def test_sample_next_seeded_reproducible():
    assert _draws(7) == _draws(7)
    assert _draws(7) != _draws(8)
    first = _draws(7)
    assert first[0] != first[1]  # the generator advances between steps


def test_make_generator_unseeded_differs():
    logits = torch.zeros(1, 1 << 20)
    params = SamplingParams(do_sample=True)
    draws = {sample_next(logits, params, generator=make_generator(None)).item() for _ in range(5)}
    assert len(draws) > 1


def test_sample_next_requires_generator_when_sampling():
    with pytest.raises(ValueError, match="Generator"):
        sample_next(torch.zeros(1, 4), SamplingParams(do_sample=True))


def test_sample_next_frequencies_match_processed_distribution():
    n = 4000
    base = _logits(0.4, 0.25, 0.15, 0.1, 0.06, 0.04)
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=4, top_p=0.9)
    expected = process_logits(base, params).softmax(-1)[0]
    assert expected[4:].sum() == 0  # top-k removed the tail
    # One batched call: rows are independent draws from the same distribution.
    ids = sample_next(base.expand(n, -1), params, generator=make_generator(123))
    counts = torch.bincount(ids, minlength=6).double()
    for tok in range(6):
        p = expected[tok].item()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[tok].item() - n * p) <= 4 * sigma + 1e-9, (tok, counts.tolist(), expected.tolist())


def test_sample_next_never_draws_neg_inf():
    logits = torch.full((2000, 8), NEG_INF)
    logits[:, 2] = 0.0
    logits[:, 5] = 10.0  # very unlikely tokens are still allowed, -inf ones never
    ids = sample_next(logits, SamplingParams(do_sample=True, temperature=5.0), generator=make_generator(0))
    assert set(ids.tolist()) <= {2, 5}
    assert set(ids.tolist()) == {2, 5}


def test_sample_next_greedy_uses_penalised_logits():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(repetition_penalty=1.5)
    assert sample_next(logits, params, torch.tensor([[0]])).tolist() == [1]


def test_token_logprobs_raw_distribution():
    logits = _logits(0.5, 0.3, 0.2)
    chosen, top = token_logprobs(logits, torch.tensor([1]), top_n=2)
    torch.testing.assert_close(chosen, torch.tensor([math.log(0.3)]))
    ids, lps = top
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(lps, torch.tensor([[math.log(0.5), math.log(0.3)]]))
    assert token_logprobs(logits, torch.tensor([0]))[1] is None


# --- SamplingParams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop_words_ids": [[]]}, "stop_words_ids"),
        ({"stop_words_ids": [1, 2]}, "stop_words_ids"),
        ({"stop_words_ids": [[1, -2]]}, "stop_words_ids"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"eos_token_ids": [-1]}, "eos_token_ids"),
    ],
)
def test_sampling_params_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalises_lists():
    params = SamplingParams(stop_words_ids=[[1, 2], [3]], eos_token_ids=[7], stop="Observation:")
    assert params.stop_words_ids == ((1, 2), (3,))
    assert params.eos_token_ids == (7,)
    assert params.stop == ("Observation:",)
    hash(params)  # frozen and fully hashable


def test_from_generation_config_qwen_chat():
    gen = GenerationConfig(
        do_sample=True, eos_token_id=151643, max_new_tokens=512, repetition_penalty=1.1, top_k=0, top_p=0.8
    )
    params = SamplingParams.from_generation_config(gen)
    assert params == SamplingParams(
        do_sample=True, top_k=0, top_p=0.8, repetition_penalty=1.1, eos_token_ids=(151643,), max_new_tokens=512
    )


def test_from_generation_config_base_keeps_eos_stop_word():
    gen = GenerationConfig(chat_format="raw", do_sample=True, eos_token_id=151643, stop_words_ids=[[151643]])
    assert SamplingParams.from_generation_config(gen).stop_words_ids == ((151643,),)


def test_from_generation_config_defaults_and_overrides():
    params = SamplingParams.from_generation_config(
        None,
        temperature=0.5,
        top_p=None,  # None = not given
        eos_token_id=[1, 2],
        stop_strings="END",
        pad_token_id=0,  # accepted, irrelevant to sampling
        max_length=100,
    )
    assert params.top_k == 50  # GenerationConfig's HF default
    assert params.top_p == 1.0
    assert params.temperature == 0.5
    assert params.eos_token_ids == (1, 2)
    assert params.stop == ("END",)
    assert params.max_new_tokens == 512


def test_from_generation_config_null_max_new_tokens():
    assert SamplingParams.from_generation_config(GenerationConfig(max_new_tokens=None)).max_new_tokens == 512


@pytest.mark.parametrize("key", ["top_q", "num_beams"])
def test_from_generation_config_unknown_key(key):
    with pytest.raises(ValueError, match=key) as err:
        SamplingParams.from_generation_config(None, **{key: 1})
    assert "top_p" in str(err.value)  # the message lists the known keys


def test_from_generation_config_alias_conflict():
    with pytest.raises(ValueError, match="eos_token_id"):
        SamplingParams.from_generation_config(None, eos_token_id=1, eos_token_ids=[2])


def test_from_generation_config_invalid_override_value():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config(None, top_p=0.0)


# ---- logit_bias (OpenAI semantics) --------------------------------------------------------------


def test_logit_bias_adds_bans_and_ignores_ids_past_the_vocabulary():
    logits = torch.zeros(2, 5)
    out = apply_logit_bias(logits, ((1, 2.5), (3, -100.0), (9, 50.0)))
    expected = torch.tensor([[0.0, 2.5, 0.0, NEG_INF, 0.0]] * 2)
    assert torch.equal(out, expected) and torch.equal(logits, torch.zeros(2, 5))  # pure
    assert apply_logit_bias(logits, ()) is logits


def test_logit_bias_applies_before_greedy_and_sampling():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    assert int(sample_next(logits, SamplingParams(logit_bias={0: -100}))[0]) == 1
    assert int(sample_next(logits, SamplingParams(logit_bias={2: 100}))[0]) == 2
    sampled = SamplingParams(do_sample=True, temperature=1.5, top_p=0.9, logit_bias={0: -100, 1: -100})
    assert all(int(sample_next(logits, sampled, generator=make_generator(s))[0]) == 2 for s in range(20))


@pytest.mark.parametrize("bias", [{-1: 1.0}, {1: 100.5}, {1: "x"}, "1:2", [(1, 2, 3)], {True: 1.0}])
def test_logit_bias_validation(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)
    assert SamplingParams(logit_bias={5: -100, 3: 2}).logit_bias == ((3, 2.0), (5, -100.0))
    assert SamplingParams(logit_bias=[(5, 1)]).logit_bias == ((5, 1.0),)


def test_token_logprobs_normalise_over_the_whole_output_vocabulary_and_pick_alternatives_below_the_limit():
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0]])  # id 3 stands for a padding row: no text, never an alternative
    chosen, (ids, values) = token_logprobs(logits, torch.tensor([0]), top_n=2, top_limit=3)
    full = logits.log_softmax(-1)[0]
    assert float(chosen[0]) == pytest.approx(float(full[0]))
    assert ids.tolist() == [[0, 1]] and values[0].tolist() == pytest.approx(full[:2].tolist())
