"""A deterministic stand-in for the serving engine: the real tokenizer, a scripted reply, no model.

It implements `qwenlm.engine.protocol.EngineClient` the way the real engine behaves at its edges
(token-by-token deltas, stop tokens and stop strings with held-back text, max_new_tokens -> "length",
logprobs and prompt logprobs on the first output, abort, backpressure), so the HTTP layer can be tested
in-process and end to end in a fraction of a second per request. A grammar `constraint` is recorded,
not followed (the script is the reply); the real engine's tests cover decoding under a grammar.

    engine = FakeEngine(reply="Hello there!"); app = create_app(engine)
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from qwenlm.assets import qwen_tiktoken_path
from qwenlm.engine.protocol import EngineBusyError, EngineStats, RequestOutput, TokenLogprob, check_request_fits
from qwenlm.generation.params import SamplingParams
from qwenlm.generation.stopping import StopStringMatcher, ends_with_stop_words
from qwenlm.tokenizer import IMEND, SPECIAL_START_ID, SPECIAL_TOKEN_IDS, QwenTokenizer

_TOKENIZER: QwenTokenizer | None = None


def shared_tokenizer() -> QwenTokenizer:
    """The real Qwen tokenizer, loaded once per test session."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = QwenTokenizer(vocab_file=str(qwen_tiktoken_path()))
    return _TOKENIZER


Reply = str | Callable[[list[int], SamplingParams], str]


@dataclass
class RecordedRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None
    prompt_logprobs: int | None = None
    constraint: object | None = None
    outputs: list[RequestOutput] = field(default_factory=list)
    finish_reason: str | None = None


class FakeEngine:
    """Generates `reply` (then <|im_end|>) one token per `delay` seconds, honouring the SamplingParams.

    Args:
        reply: the scripted text, or a function (prompt_ids, params) -> text, e.g. to vary with the seed.
        max_model_len: context size reported to the server and enforced like the real engine.
        delay: seconds slept between tokens (so streams really interleave and can be cut off).
        generation_config: exposed as `engine.generation_config` when given (the server's defaults rule).
        end_token: appended to the reply's tokens ("<|im_end|>" by default; None = run out of script).
    """

    def __init__(
        self,
        reply: Reply = "Hello! How can I help you today?",
        *,
        model_name: str = "qwen-fake",
        max_model_len: int = 2048,
        delay: float = 0.002,
        generation_config: object | None = None,
        end_token: str | None = IMEND,
    ) -> None:
        self.reply = reply
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = shared_tokenizer()
        self.delay = delay
        self.end_token = end_token
        if generation_config is not None:
            self.generation_config = generation_config
        self.busy = False  # True: every generate() raises EngineBusyError (a full queue)
        self.requests: list[RecordedRequest] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self._abort_flags: set[str] = set()
        self._stats = EngineStats()

    # ---- what tests look at ----------------------------------------------------------------------
    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    @property
    def last_params(self) -> SamplingParams:
        return self.requests[-1].params

    @property
    def last_prompt(self) -> str:
        return self.tokenizer.decode(self.requests[-1].prompt_ids)

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no request is running (an aborted stream is finalised asynchronously)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.running and loop.time() < deadline:
            await asyncio.sleep(0.01)

    # ---- EngineClient ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        self._stats.requests_running = len(self.running)
        self._stats.requests_waiting = 0
        return self._stats

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self._abort_flags.add(request_id)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, logprobs: int | None = None,
        *, prompt_logprobs: int | None = None, constraint: object | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        return self._generate(list(prompt_ids), params, request_id, logprobs, prompt_logprobs, constraint)

    async def _generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, logprobs: int | None,
        prompt_logprobs: int | None, constraint: object | None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        self._admit(prompt_ids, params, request_id)
        record = RecordedRequest(request_id, prompt_ids, params, logprobs, prompt_logprobs, constraint)
        self.requests.append(record)
        cached = self._cached_prefix(prompt_ids)
        self._stats.cached_prompt_tokens_total += cached
        script = self._script(prompt_ids, params)
        decoder = self.tokenizer.stream_decoder()
        matcher = StopStringMatcher(params.stop)
        produced: list[int] = []
        try:
            await asyncio.sleep(self.delay)  # "prefill"
            for step, token in enumerate(script):
                if request_id in self._abort_flags:
                    yield self._output(record, [], "", "abort", None, cached)
                    return
                produced.append(token)
                self._stats.generation_tokens_total += 1
                if step == 0:
                    self._stats.record_first_token(self.delay)
                text, reason = self._advance(token, produced, prompt_ids, params, decoder, matcher)
                out = self._output(record, [token], text, reason, self._logprobs(token, step, logprobs), cached)
                if step == 0 and prompt_logprobs is not None:
                    out.prompt_logprobs = [None] + [
                        self._logprobs(t, p, prompt_logprobs)[0] for p, t in enumerate(prompt_ids[1:], 1)
                    ]
                yield out
                if reason is not None:
                    return
                await asyncio.sleep(self.delay)
            # The script ran out without a stop token: finish like an eos.
            tail = decoder.finish()
            text, _ = matcher.feed(tail) if tail else ("", False)
            yield self._output(
                record, [], text + (matcher.flush() if not matcher.stopped else ""), "stop", None, cached
            )
        finally:
            self.running.discard(request_id)
            self._abort_flags.discard(request_id)
            if record.finish_reason is None:  # cancelled by the consumer (client gone)
                record.finish_reason = "abort"
                self.aborted.append(request_id)

    # ---- internals -------------------------------------------------------------------------------
    def _admit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> None:
        if self.busy:
            raise EngineBusyError("the queue is full (fake engine); retry later")
        check_request_fits(prompt_ids, params.max_new_tokens, self.max_model_len)
        if request_id in self.running:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.running.add(request_id)
        self._stats.requests_total += 1
        self._stats.prompt_tokens_total += len(prompt_ids)

    def _cached_prefix(self, prompt_ids: list[int]) -> int:
        """Longest prefix shared with an earlier prompt (at most all but one token), like prefix caching."""
        best = 0
        for earlier in self.requests[:-1]:
            n = 0
            for a, b in zip(earlier.prompt_ids, prompt_ids, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(prompt_ids) - 1)

    def _script(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        text = self.reply(prompt_ids, params) if callable(self.reply) else self.reply
        ids = self.tokenizer.encode(text)
        if self.end_token is not None:
            ids.append(SPECIAL_TOKEN_IDS[self.end_token])
        return ids

    def _advance(self, token, produced, prompt_ids, params, decoder, matcher) -> tuple[str, str | None]:
        """Text released by one more token and the finish reason it causes (as the real engine does)."""
        is_stop_token = token in params.eos_token_ids or ends_with_stop_words(
            prompt_ids + produced, params.stop_words_ids, len(produced)
        )
        text, hit = "", False
        if token < SPECIAL_START_ID:  # regular tokens become text; special ones do not
            text, hit = matcher.feed(decoder.add(token))
        if hit:
            return text, "stop"
        if is_stop_token or len(produced) >= params.max_new_tokens:
            tail = decoder.finish()
            more, hit = matcher.feed(tail) if tail else ("", False)
            text += more + ("" if hit else matcher.flush())
            return text, "stop" if is_stop_token or hit else "length"
        return text, None

    @staticmethod
    def _logprobs(token: int, step: int, n: int | None) -> list[TokenLogprob] | None:
        """Fake but well-formed: the chosen token is the most likely; alternatives are its neighbours."""
        if n is None:
            return None
        chosen = -0.05 * (step % 7) - 0.01
        top = [(token, chosen)] + [((token + k) % 151643, chosen - k) for k in range(1, n)] if n > 0 else []
        assert all(math.isfinite(lp) for _, lp in top)
        return [TokenLogprob(token, chosen, top)]

    def _output(self, record, token_ids, text, reason, logprobs, cached) -> RequestOutput:
        produced = sum(len(o.token_ids) for o in record.outputs) + len(token_ids)
        out = RequestOutput(
            request_id=record.request_id,
            token_ids=token_ids,
            text=text,
            finish_reason=reason,
            logprobs=logprobs,
            prompt_tokens=len(record.prompt_ids),
            completion_tokens=produced,
            cached_tokens=cached,
        )
        record.outputs.append(out)
        if reason is not None:
            record.finish_reason = reason
            if reason == "abort":
                self.aborted.append(record.request_id)
        return out
