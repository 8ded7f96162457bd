"""The contract between the serving engine and its callers (the HTTP server, offline batch jobs).

The server depends only on this file, never on torch or the model: it hands the engine prompt token
ids and `SamplingParams`, and reads back `RequestOutput`s as tokens are produced.

    async for out in engine.generate(prompt_ids, params, request_id="chatcmpl-1"):
        send(out.text)                       # new text since the previous output
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output, when asked: one per prompt
    # token, the first None (nothing predicts it)

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
    time_to_first_token_seconds: list[float] = field(default_factory=list)  # recent samples (for quantiles)
    time_to_first_token_sum: float = 0.0  # over every request so far (a Prometheus summary's _sum / _count)
    time_to_first_token_count: int = 0
    tokens_per_second: float = 0.0  # recent decode throughput
    kv_blocks_total: int = 0  # the paged KV cache: its blocks,
    kv_blocks_used: int = 0  # those held by requests,
    kv_blocks_cached: int = 0  # and those holding only cached prefixes (free for the taking, LRU)
    preemptions_total: int = 0  # requests sent back to the queue when blocks ran out (recomputed later)
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, found there

    def record_first_token(self, seconds: float, window: int = 256) -> None:
        """One request's time to first token: kept among the `window` most recent, and in the running totals."""
        self.time_to_first_token_seconds = [*self.time_to_first_token_seconds[-(window - 1) :], seconds]
        self.time_to_first_token_sum += seconds
        self.time_to_first_token_count += 1


class TokenConstraint(Protocol):
    """Per-request decoding constraint (a grammar): which tokens may come next, and the one that came.
    `qwenlm.generation.constrained.GrammarConstraint` is the implementation."""

    def mask_logits(self, logits: Any) -> Any:
        """logits [1, V] -> the same with forbidden tokens at -inf."""
        ...

    def advance(self, token_id: int) -> None: ...


class EngineBusyError(RuntimeError):
    """The waiting queue is full (max_queue): the server answers 503 (with Retry-After) and the client retries."""


def check_request_fits(prompt_ids: list[int], max_new_tokens: int, max_model_len: int, why: str = "") -> None:
    """The size rule every engine applies before queueing: a non-empty prompt that, with its completion, fits
    `max_model_len` (`why` names what sets that limit, when it is not the model).

    Raises:
        ValueError: the prompt is empty or too long; the server answers 400 with this message.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) + max_new_tokens > max_model_len:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} exceeds this "
            f"server's max_model_len of {max_model_len} tokens{why}"
        )


class EngineClient(Protocol):
    """What the HTTP layer needs from an engine."""

    model_name: str
    max_model_len: int  # prompt + completion tokens one request may use
    tokenizer: object  # qwenlm.tokenizer.QwenTokenizer

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, logprobs: int | None = None,
        *, prompt_logprobs: int | None = None, constraint: TokenConstraint | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Stream outputs for one request until one has `finish_reason` set.

        `logprobs`: None = none; N >= 0 = the chosen token's logprob plus the top N alternatives.
        `prompt_logprobs`: the same for the prompt tokens, delivered on the first output. `constraint`:
        a grammar the output must follow. Callers pass these two only when used, so an engine without
        them keeps serving everything else.
        Raises EngineBusyError (before yielding) when the queue is full and ValueError when the
        prompt plus max_new_tokens does not fit max_model_len. Cancelling the iteration (client gone)
        aborts the request and frees its slot.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...
