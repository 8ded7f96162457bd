"""Stop conditions: Qwen's token-level stop words and an incremental stop-string matcher.

if ends_with_stop_words(prompt_ids + new_ids, params.stop_words_ids, len(new_ids)): ...
tail = StopWordTail(params.stop_words_ids, prompt_ids); stopped = tail.push(token)   # the same, incrementally
matcher = StopStringMatcher(params.stop); text, stopped = matcher.feed(delta)
"""

from __future__ import annotations

from collections.abc import Sequence


def ends_with_stop_words(token_ids: Sequence[int], stop_words_ids: Sequence[Sequence[int]], num_generated: int) -> bool:
    """True when the sequence now ends with a stop-word sequence that a generated token completes.

    Qwen's `StopWordsLogitsProcessor` (spec 4.3) tests whether the *whole* sequence, prompt
    included, ends with a stop sequence. We keep that, so a multi-token stop sequence may start in
    the prompt and be completed by the first generated token. We differ in one way: the match must
    end on a generated token (`num_generated >= 1`). The reference also fires when the prompt
    itself ends with a stop sequence, which ends generation before it starts (one forced eos);
    since a match always ends at the last token, our rule is simply "never before the first
    generated token".

    Args:
        token_ids: prompt + generated ids (a list, tuple or 1-D tensor).
        stop_words_ids: the stop sequences, e.g. ((151645,), (151644,)) for ChatML.
        num_generated: how many of the trailing `token_ids` were generated.
    """
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if not 0 <= num_generated <= len(token_ids):
        raise ValueError(f"num_generated must be in [0, {len(token_ids)}], got {num_generated}")
    if num_generated == 0:
        return False
    for stop in stop_words_ids:
        n = len(stop)
        if 0 < n <= len(token_ids) and list(token_ids[-n:]) == list(stop):
            return True
    return False


class StopWordTail:
    """One sequence's last few ids, enough to tell whether it now ends with a Qwen stop word: the one
    stop-word check that `generate` (per batch row) and the serving engine (per request) both run.

        tail = StopWordTail(params.stop_words_ids, prompt_ids)
        if tail.push(token): ...                     # a generated token completed a stop word
    """

    def __init__(self, stop_words_ids: Sequence[Sequence[int]], prompt_ids: Sequence[int]) -> None:
        """prompt_ids: what precedes the first generated token (a match may start there); padding given as
        ids no stop word holds (e.g. -1)."""
        self.stop_words_ids = stop_words_ids
        self.longest = max((len(seq) for seq in stop_words_ids), default=0)
        self.tail = list(prompt_ids)[-self.longest :] if self.longest else []
        self.generated = 0

    def push(self, token: int) -> bool:
        """Add a generated token; True if the sequence now ends with a stop word (see `ends_with_stop_words`)."""
        self.generated += 1
        if not self.longest:
            return False
        self.tail.append(token)
        del self.tail[: -self.longest]
        return ends_with_stop_words(self.tail, self.stop_words_ids, min(self.generated, len(self.tail)))


class StopStringMatcher:
    """Streams text through, cutting it before the first stop string and holding back partial matches.

    `feed` emits everything that can no longer become part of a stop string; the longest pending
    suffix that is a prefix of some stop string is held back until it is resolved. When a stop
    string completes, the text before it is emitted, `matched` is set and the matcher is done.

    "First" means the first occurrence to *complete* reading left to right (smallest end index);
    among stop strings completing at the same character the longest, i.e. earliest-starting, wins.
    A streaming consumer must stop the moment a stop string completes, so this is the only choice
    that gives the same output however the text is chunked. It differs from "earliest-starting
    occurrence" only when a stop string lies strictly inside a longer one that would complete later
    (stops "bc" and "abcd" on "abcd" give "a").
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = (stops,)
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))  # dedupe, keep order
        # Every proper prefix of a stop string: the suffixes worth holding back.
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._pending = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    @property
    def held_back(self) -> str:
        """Text received but not yet emitted because it may begin a stop string."""
        return self._pending

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add newly decoded text; return (text safe to emit now, whether a stop string matched).

        Raises:
            RuntimeError: if called again after a stop string matched.
        """
        if self.matched is not None:
            raise RuntimeError(f"StopStringMatcher already stopped on {self.matched!r}; feed() must not be called")
        if not self.stops:
            return delta, False
        text = self._pending + delta
        # The pending text holds no complete stop, so every occurrence found ends inside `delta`.
        best: tuple[int, int, str] | None = None  # (end, start, stop) of the first completed occurrence
        for stop in self.stops:
            start = text.find(stop)  # a stop's first occurrence is also its earliest-ending one
            if start < 0:
                continue
            end = start + len(stop)
            if best is None or end < best[0] or (end == best[0] and start < best[1]):
                best = (end, start, stop)
        if best is not None:
            _, start, self.matched = best
            self._pending = ""
            return text[:start], True
        hold = self._hold_length(text)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Release the held-back text at the natural end of generation ("" after a stop)."""
        out, self._pending = self._pending, ""
        return out

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._max_hold), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
