"""The contract between the serving engine and its callers (the HTTP server, offline batch jobs).

The server depends only on this file, never on torch or the model: it hands the engine prompt token
ids and `SamplingParams`, and reads back `RequestOutput`s as tokens are produced.

    async for out in engine.generate(prompt_ids, params, request_id="chatcmpl-1"):
        send(out.text)                       # new text since the previous output
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from ..generation.params import SamplingParams


@dataclass
class TokenLogprob:
    """Log-probability of a produced token under the model (before sampling processors)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one request gained at one engine step (deltas, not cumulative)."""

    request_id: str
    token_ids: list[int]  # tokens produced since the previous output
    text: str  # text produced since the previous output; stop strings are held back and never sent
    finish_reason: str | None = None  # None while running; then "stop", "length" or "abort"
    logprobs: list[TokenLogprob] | None = None  # one per token in `token_ids` when requested
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Counters and gauges for /metrics."""

    requests_total: int = 0
    requests_running: int = 0
    requests_waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0
    time_to_first_token_seconds: list[float] = field(default_factory=list)  # recent samples
    tokens_per_second: float = 0.0  # recent decode throughput


class EngineBusyError(RuntimeError):
    """The waiting queue is full (max_queue): the server answers 503 / 429 and the client retries."""


class EngineClient(Protocol):
    """What the HTTP layer needs from an engine."""

    model_name: str
    max_model_len: int  # prompt + completion tokens one request may use
    tokenizer: object  # qwenlm.tokenizer.QwenTokenizer

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, logprobs: int | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs for one request until one has `finish_reason` set.

        `logprobs`: None = none; N >= 0 = the chosen token's logprob plus the top N alternatives.
        Raises EngineBusyError (before yielding) when the queue is full and ValueError when the
        prompt plus max_new_tokens does not fit max_model_len. Cancelling the iteration (client gone)
        aborts the request and frees its slot.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...
