"""Stopping: Qwen stop-word sequences over token ids, and the incremental stop-string matcher."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenlm.generation.stopping import StopStringMatcher, StopWordTail, ends_with_stop_words

IM_END, IM_START, EOD = 151645, 151644, 151643
CHATML_STOPS = ((IM_END,), (IM_START,))
RAW_STOPS = ((33975, 25), (EOD,))  # "Human:" and <|endoftext|>


# --- ends_with_stop_words ----------------------------------------------------------------------


def test_stop_words_single_token():
    assert ends_with_stop_words([1, 2, 3, IM_END], CHATML_STOPS, num_generated=2)
    assert ends_with_stop_words([1, 2, IM_START], CHATML_STOPS, num_generated=1)
    assert not ends_with_stop_words([1, 2, IM_END, 5], CHATML_STOPS, num_generated=2)  # only the end counts


def test_stop_words_multi_token():
    assert ends_with_stop_words([1, 2, 33975, 25], RAW_STOPS, num_generated=2)
    assert not ends_with_stop_words([1, 2, 33975], RAW_STOPS, num_generated=1)
    assert not ends_with_stop_words([1, 25], RAW_STOPS, num_generated=1)


def test_stop_words_straddle_prompt_boundary():
    # "Human" ends the prompt, the first generated token ":" completes the stop sequence.
    assert ends_with_stop_words([1, 33975, 25], RAW_STOPS, num_generated=1)


def test_stop_words_prompt_ending_with_stop_does_not_fire():
    assert not ends_with_stop_words([1, 2, IM_END], CHATML_STOPS, num_generated=0)
    assert not ends_with_stop_words([1, 33975, 25], RAW_STOPS, num_generated=0)


def test_stop_words_empty_and_short_sequences():
    assert not ends_with_stop_words([5], RAW_STOPS, num_generated=1)
    assert not ends_with_stop_words([], CHATML_STOPS, num_generated=0)
    assert not ends_with_stop_words([1, 2, 3], (), num_generated=3)


def test_stop_words_eos_as_stop_word_and_tensor_input():
    assert ends_with_stop_words(torch.tensor([7, EOD]), [[EOD]], num_generated=1)


@pytest.mark.parametrize("num_generated", [-1, 4])
def test_stop_words_bad_num_generated(num_generated):
    with pytest.raises(ValueError, match="num_generated"):
        ends_with_stop_words([1, 2, 3], CHATML_STOPS, num_generated)


def test_stop_word_tail_equals_the_whole_sequence_check():
    """The incremental tail (generate's rows, the engine's requests) answers as the check on the whole sequence:
    a match may straddle the prompt, a prompt that ends with a stop word does not fire, short prompts work."""
    for prompt, generated in (([1, 33975], [25]), ([1, 33975, 25], [4, 33975, 25]), ([33975], [7, 25, IM_END]),
                              ([], [25, 33975, 25]), ([-1, -1], [33975, 25])):  # fmt: skip
        tail = StopWordTail(RAW_STOPS, prompt)
        for i, token in enumerate(generated):
            whole = ends_with_stop_words(prompt + generated[: i + 1], RAW_STOPS, num_generated=i + 1)
            assert tail.push(token) == whole, (prompt, generated, i)
    assert not StopWordTail((), [1, 2]).push(IM_END)


# --- StopStringMatcher: deterministic cases ----------------------------------------------------


def _run(stops, chunks):
    matcher = StopStringMatcher(stops)
    pieces = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        pieces.append(text)
        if stopped:
            return pieces, matcher
    pieces.append(matcher.flush())
    return pieces, matcher


def test_matcher_holds_back_partial_match_then_releases():
    matcher = StopStringMatcher(["Observation:"])
    assert matcher.feed("Thought: go\nObs") == ("Thought: go\n", False)
    assert matcher.feed("cure") == ("Obscure", False)
    assert matcher.feed(" Obser") == (" ", False)
    assert matcher.flush() == "Obser"
    assert matcher.matched is None


def test_matcher_stops_mid_chunk():
    matcher = StopStringMatcher(["Observation:"])
    assert matcher.feed("Action: x\nObserv") == ("Action: x\n", False)
    assert matcher.feed("ation: result") == ("", True)
    assert matcher.matched == "Observation:"
    assert matcher.stopped
    assert matcher.flush() == ""


def test_matcher_feed_after_stop_raises():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("abxcd") == ("ab", True)
    with pytest.raises(RuntimeError, match="stopped"):
        matcher.feed("more")


def test_matcher_without_stops_is_passthrough():
    matcher = StopStringMatcher([])
    assert matcher.feed("Obs") == ("Obs", False)
    assert matcher.flush() == ""


def test_matcher_earliest_starting_among_completed():
    # Both complete in the same chunk; the one starting first wins.
    pieces, matcher = _run(["cd", "bcd"], ["abcde"])
    assert "".join(pieces) == "a" and matcher.matched == "bcd"


def test_matcher_prefix_stops_same_end_longest_wins():
    pieces, matcher = _run(["b", "ab"], ["a", "b"])
    assert "".join(pieces) == "" and matcher.matched == "ab"


def test_matcher_first_completed_wins_over_longer_pending():
    # "bc" completes before "abcd" could, so the stream stops there, whatever the chunking.
    for chunks in (["abcd"], ["abc", "d"], ["a", "b", "c", "d"]):
        pieces, matcher = _run(["abcd", "bc"], chunks)
        assert "".join(pieces) == "a" and matcher.matched == "bc"


def test_matcher_cjk_stop():
    pieces, matcher = _run(["观察："], ["思考：好", "的\n观", "察：结果"])
    assert pieces == ["思考：好", "的\n", ""] and matcher.matched == "观察："


def test_matcher_rejects_empty_stop():
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(["ok", ""])


# --- StopStringMatcher: property ---------------------------------------------------------------


def _expected(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Reference: cut before the first stop occurrence to complete (ties: earliest start)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    _, start, stop = min(found)
    return text[:start], stop


ALPHABET = "ab观察:"
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=0, max_size=4)


@settings(max_examples=400, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 40), max_size=12))
def test_matcher_any_chunking_equals_truncation(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    pieces, matcher = _run(stops, chunks)
    expected_text, expected_stop = _expected(text, stops)
    assert "".join(pieces) == expected_text
    assert matcher.matched == expected_stop


@settings(max_examples=200, deadline=None)
@given(text=texts, stops=stop_lists)
def test_matcher_emits_eagerly(text, stops):
    """Nothing is held back beyond a suffix that could still begin a stop string."""
    matcher = StopStringMatcher(stops)
    emitted = ""
    for ch in text:
        out, stopped = matcher.feed(ch)
        emitted += out
        if stopped:
            return
        held = matcher.held_back
        assert emitted + held == text[: len(emitted) + len(held)]
        assert not held or any(s.startswith(held) for s in stops)
