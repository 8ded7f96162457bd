"""`/v1/completions` (raw text in, text out) and the engine plumbing both OpenAI endpoints share.

Text completion is the primitive the chat endpoint builds on: both turn a request into one or more
engine requests (`n` choices, several prompts), run them concurrently, and either collect the
outputs or stream them as server-sent events. `EngineRequests` owns that part: starting the engine
requests (a full queue -> 429 before any byte is sent), merging their outputs, and aborting every
unfinished one the moment the client goes away. It depends only on the `EngineClient` protocol.

    serving = ServingCompletion(engine, "qwen"); result = await serving.create(request, raw_request)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from ..engine.protocol import EngineBusyError, EngineClient, RequestOutput, TokenLogprob
from ..generation.params import SamplingParams
from ..tokenizer import SPECIAL_START_ID
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    TokenizeRequest,
    UsageInfo,
    random_id,
    sse,
    to_sampling_params,
)

T = TypeVar("T")
logger = logging.getLogger("qwenlm.server")

BUSY_STATUS = 429  # the issue asks for 429 on a full queue; OpenAI clients retry it with backoff
USAGE_SCOPE_KEY = "qwenlm.usage"  # where a handler leaves (prompt, completion) tokens for the access log

# <|endoftext|>, <|im_start|>, <|im_end|>: the token that ends a reply is left out of logprobs, as
# OpenAI leaves out its own end token (it is counted in usage.completion_tokens).
STOP_TOKEN_IDS = frozenset(range(SPECIAL_START_ID, SPECIAL_START_ID + 3))

_background: set[asyncio.Task] = set()  # fire-and-forget aborts, referenced until done


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready; nobody is left to answer."""


def check_model(requested: str | None, served: str) -> None:
    """Raise a 404 `model_not_found` unless `requested` is the served model name (None = any)."""
    if requested is not None and requested != served:
        raise APIError(
            f"The model '{requested}' does not exist. This server serves '{served}'.",
            status_code=404,
            param="model",
            code="model_not_found",
        )


def record_usage(raw_request: Request | None, prompt_tokens: int, completion_tokens: int) -> None:
    if raw_request is not None:
        raw_request.scope[USAGE_SCOPE_KEY] = (prompt_tokens, completion_tokens)


async def _wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(raw_request: Request | None, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it and raise ClientDisconnected if the client hangs up first.

    Only for the part of a request before the response starts: once a StreamingResponse is
    running, Starlette listens for the disconnect itself and cancels the body iterator.
    """
    task = asyncio.ensure_future(work)
    if raw_request is None:
        return await task
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        raise ClientDisconnected()
    return task.result()


@dataclass
class EngineJob:
    """One engine request behind an API request: choice `index` of prompt `prompt_ids`."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    finished: bool = False
    first_at: float | None = None


class EngineRequests:
    """The engine requests of one API call, run concurrently and read as one merged stream.

    `start()` waits until every request has produced its first output (or failed), so a full queue
    or a rejected prompt becomes a proper HTTP error before any response header is sent. `outputs()`
    then yields `(choice index, RequestOutput)` in arrival order until every request has finished.
    `close()` is synchronous and safe to call from a cancelled task: it cancels the readers (which
    aborts the engine requests, per the EngineClient contract) and also asks the engine to abort
    explicitly.
    """

    def __init__(
        self,
        engine: EngineClient,
        jobs: Sequence[EngineJob],
        base_id: str,
        logprobs: int | None = None,
        metrics: ServerMetrics | None = None,
        arrival: float | None = None,
    ) -> None:
        self.engine = engine
        self.id = base_id  # the response id; engine request ids are derived from it
        self.jobs = list(jobs)
        self.logprobs = logprobs
        self.metrics = metrics
        self.started_at = arrival if arrival is not None else time.perf_counter()  # for time to first token
        for job in self.jobs:
            job.request_id = base_id if len(self.jobs) == 1 else f"{base_id}-{job.index}"
        self._queue: asyncio.Queue[tuple[EngineJob, RequestOutput | None, BaseException | None]] = asyncio.Queue()
        self._buffer: list[tuple[EngineJob, RequestOutput]] = []
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    async def _read(self, job: EngineJob) -> None:
        stream: Any = None
        try:
            stream = self.engine.generate(job.prompt_ids, job.params, job.request_id, logprobs=self.logprobs)
            async for out in stream:
                await self._queue.put((job, out, None))
                if out.finished:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as err:  # reported to the consumer, which turns it into an HTTP error
            await self._queue.put((job, None, err))
        finally:
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()

    async def start(self) -> None:
        """Start every engine request and wait for each one's first output.

        Raises:
            APIError: 429 when the engine's queue is full, 400 when it rejects the prompt.
        """
        self._tasks = [asyncio.ensure_future(self._read(job)) for job in self.jobs]
        waiting = {job.index for job in self.jobs}
        try:
            while waiting:
                job, out, err = await self._queue.get()
                if err is not None:
                    raise _engine_error(err)
                self._note_first(job)
                self._buffer.append((job, out))
                waiting.discard(job.index)
        except BaseException:
            self.close()
            raise

    def _note_first(self, job: EngineJob) -> None:
        if job.first_at is None:
            job.first_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.observe_time_to_first_token(job.first_at - self.started_at)

    async def outputs(self) -> AsyncIterator[tuple[EngineJob, RequestOutput]]:
        buffered, self._buffer = self._buffer, []
        for job, out in buffered:
            job.finished = job.finished or out.finished
            yield job, out
        pending = sum(not job.finished for job in self.jobs)
        while pending:
            job, out, err = await self._queue.get()
            if err is not None:
                raise _engine_error(err)
            if out.finished and not job.finished:
                job.finished = True
                pending -= 1
            yield job, out

    def close(self) -> None:
        """Abort every unfinished engine request (idempotent, never awaits)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for job in self.jobs:
            if not job.finished:
                abort = asyncio.ensure_future(self.engine.abort(job.request_id))
                _background.add(abort)
                abort.add_done_callback(_background.discard)


class EventStream:
    """The SSE strings of one streamed response, tied to its engine requests.

    Closing it aborts every unfinished engine request, even when the response never started (the
    client left between the first token and the first byte), where the generator's own `finally`
    would never run.
    """

    def __init__(self, events: AsyncGenerator[str, None], run: EngineRequests) -> None:
        self._events = events
        self._run = run

    def __aiter__(self) -> AsyncIterator[str]:
        return self._events

    async def aclose(self) -> None:
        self._run.close()
        await self._events.aclose()


def _engine_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, EngineBusyError):
        return APIError(
            f"The server is busy ({err}). Please retry shortly.",
            status_code=BUSY_STATUS,
            type="rate_limit_error",
            code="server_busy",
            headers={"Retry-After": "1"},
        )
    if isinstance(err, ValueError):  # the engine rejected the request itself (e.g. it does not fit)
        return APIError(f"Invalid request: {err}")
    logger.error("engine error", exc_info=err)
    return APIError("The engine failed while generating.", status_code=500, type="server_error", code="engine_error")


def abort_error() -> APIError:
    return APIError(
        "The request was cancelled by the server (it may be shutting down). Please retry.",
        status_code=503,
        type="server_error",
        code="request_aborted",
    )


def error_event(err: BaseException) -> str:
    """An error inside an already-started stream: OpenAI's error object as one more event."""
    if not isinstance(err, APIError):
        logger.error("error while streaming", exc_info=err)
        err = APIError("Internal server error while streaming.", status_code=500, type="server_error")
    return sse(err.to_response())


def token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """A token as (display string, raw bytes): invalid UTF-8 pieces shown as \\x escapes."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(token, str):  # a special token
        return token, list(token.encode("utf-8"))
    return token.decode("utf-8", errors="backslashreplace"), list(token)


def usage_of(last: dict[int, RequestOutput], jobs: Sequence[EngineJob], choices_per_prompt: int) -> UsageInfo:
    """Usage over every choice: each prompt counted once, every completion counted."""
    prompt = cached = completion = 0
    for job in jobs:
        out = last.get(job.index)
        prompt_tokens = out.prompt_tokens if out and out.prompt_tokens else len(job.prompt_ids)
        if job.index % choices_per_prompt == 0:
            prompt += prompt_tokens
            cached += out.cached_tokens if out else 0
        completion += out.completion_tokens if out else 0
    return UsageInfo.of(prompt, completion, cached)


# --------------------------------------------------------------------------------------------------
# /v1/completions


@dataclass
class _CompletionState:
    """What one choice has produced so far."""

    text: str = ""
    echo_chars: int = 0  # length of the echoed prompt, where the completion's text offsets start
    decoder: Any = None  # StreamingDecoder over the completion tokens, for text_offset
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    finish_reason: str | None = None


class ServingCompletion:
    """OpenAI text completions over an EngineClient (for base models; no chat template)."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer: Any = engine.tokenizer

    # ---- prompt handling -----------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | list[int], where: str) -> list[int]:
        if isinstance(prompt, str):
            # The client writes the whole prompt, so special-token text means the special tokens.
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            try:
                self.tokenizer.decode(ids)
            except (ValueError, TypeError) as err:
                raise APIError(f"Invalid request: {where}: {err}", param="prompt") from None
        # An empty prompt generates unconditionally, after <|endoftext|> (as OpenAI does).
        return ids or [self.tokenizer.eod_id]

    def _jobs(self, request: CompletionRequest) -> tuple[list[EngineJob], list[str]]:
        prompts = request.prompts()
        if not prompts:
            raise APIError("Invalid request: prompt must not be an empty list.", param="prompt")
        if request.suffix:
            raise APIError("suffix is not supported by this server.", param="suffix", code="unsupported_parameter")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(
                "best_of is not supported by this server (only best_of == n).",
                param="best_of",
                code="unsupported_parameter",
            )
        jobs, echoes = [], []
        gen = getattr(self.engine, "generation_config", None)
        for p, prompt in enumerate(prompts):
            ids = self._prompt_ids(prompt, f"prompt[{p}]" if len(prompts) > 1 else "prompt")
            echoes.append(prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt))
            for j in range(request.n):
                params = to_sampling_params(
                    request,
                    prompt_tokens=len(ids),
                    max_model_len=self.engine.max_model_len,
                    generation_config=gen,
                    choice_index=j,
                )
                jobs.append(EngineJob(p * request.n + j, ids, params))
        return jobs, echoes

    # ---- entry point ---------------------------------------------------------------------------
    async def create(
        self, request: CompletionRequest, raw_request: Request | None = None
    ) -> CompletionResponse | EventStream:
        """Run a completion request: a full response, or (stream=true) an iterator of SSE strings.

        Raises:
            APIError: unknown model, invalid prompt or options, context overflow, busy engine.
            ClientDisconnected: the client hung up before the response was ready.
        """
        arrival = time.perf_counter()
        check_model(request.model, self.model_name)
        jobs, echoes = self._jobs(request)
        run = EngineRequests(self.engine, jobs, random_id("cmpl-"), request.engine_logprobs(), self.metrics, arrival)
        return await respond(
            run, raw_request, request.stream,
            lambda: self._stream(request, run, echoes, raw_request),
            lambda: self._collect(request, run, echoes, raw_request),
        )  # fmt: skip

    def _states(self, request: CompletionRequest, jobs: Sequence[EngineJob], echoes: list[str]) -> dict:
        states = {}
        for job in jobs:
            state = _CompletionState()
            if request.echo:
                state.text = echoes[job.index // request.n]
                state.echo_chars = len(state.text)
                if request.logprobs is not None:
                    self._add_prompt_logprobs(state, job.prompt_ids)
            state.decoder = self.tokenizer.stream_decoder()
            states[job.index] = state
        return states

    def _add_prompt_logprobs(self, state: _CompletionState, prompt_ids: list[int]) -> None:
        """Echoed prompt tokens: listed with null logprobs (the engine computes none for the prompt)."""
        decoder, lp = self.tokenizer.stream_decoder(), state.logprobs
        for token_id in prompt_ids:
            lp.text_offset.append(len(decoder.text))
            lp.tokens.append(token_text(self.tokenizer, token_id)[0])
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            decoder.add(token_id)

    def _logprobs_of(self, state: _CompletionState, entries: list[TokenLogprob]) -> CompletionLogprobs:
        """OpenAI completion logprobs for new tokens; text offsets count characters of the decoded text."""
        out = CompletionLogprobs()
        for entry in entries:
            if entry.token_id in STOP_TOKEN_IDS:
                continue
            text, _ = token_text(self.tokenizer, entry.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append({token_text(self.tokenizer, t)[0]: lp for t, lp in entry.top})
            out.text_offset.append(state.echo_chars + len(state.decoder.text))
            state.decoder.add(entry.token_id)
        return out

    async def _collect(
        self, request: CompletionRequest, run: EngineRequests, echoes: list[str], raw_request: Request | None
    ) -> CompletionResponse:
        states = self._states(request, run.jobs, echoes)
        last: dict[int, RequestOutput] = {}
        async for job, out in run.outputs():
            state = states[job.index]
            state.text += out.text
            if out.logprobs and request.logprobs is not None:
                new = self._logprobs_of(state, out.logprobs)
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(state.logprobs, name).extend(getattr(new, name))
            if out.finished:
                state.finish_reason = out.finish_reason
                last[job.index] = out
        if any(s.finish_reason == "abort" for s in states.values()):
            raise abort_error()
        usage = usage_of(last, run.jobs, request.n)
        record_usage(raw_request, usage.prompt_tokens, usage.completion_tokens)
        choices = [
            CompletionChoice(
                index=i,
                text=s.text,
                logprobs=s.logprobs if request.logprobs is not None else None,
                finish_reason=s.finish_reason,
            )
            for i, s in sorted(states.items())
        ]
        return CompletionResponse(id=run.id, model=self.model_name, choices=choices, usage=usage)

    async def _stream(
        self, request: CompletionRequest, run: EngineRequests, echoes: list[str], raw_request: Request | None
    ) -> AsyncGenerator[str, None]:
        cid, created, with_usage = run.id, int(time.time()), request.include_usage
        states = self._states(request, run.jobs, echoes)
        last: dict[int, RequestOutput] = {}

        def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, reason: str | None) -> str:
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
            return sse(
                CompletionChunk(id=cid, created=created, model=self.model_name, choices=[choice]),
                include_usage=with_usage,
            )

        try:
            if request.echo:
                for index, state in sorted(states.items()):
                    yield chunk(index, state.text, state.logprobs if request.logprobs is not None else None, None)
            async for job, out in run.outputs():
                state = states[job.index]
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs_of(state, out.logprobs or [])
                if out.finished:
                    last[job.index] = out
                    if out.finish_reason == "abort":
                        yield error_event(abort_error())
                        break
                if out.text or (logprobs and logprobs.tokens) or out.finished:
                    yield chunk(job.index, out.text, logprobs, out.finish_reason)
            else:
                usage = usage_of(last, run.jobs, request.n)
                record_usage(raw_request, usage.prompt_tokens, usage.completion_tokens)
                if with_usage:
                    yield sse(CompletionChunk(id=cid, created=created, model=self.model_name, choices=[], usage=usage))
            yield sse("[DONE]")
        except Exception as err:  # headers are sent: the error can only be one more event
            yield error_event(err)
            yield sse("[DONE]")
        finally:
            run.close()

    # ---- /tokenize and /detokenize --------------------------------------------------------------
    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        """Count tokens of a raw prompt, or of chat messages rendered exactly as a chat request would be."""
        check_model(request.model, self.model_name)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("Invalid request: send exactly one of 'prompt' or 'messages'.")
        if request.prompt is not None:
            ids = self.tokenizer.encode(request.prompt)
        else:
            from .serving_chat import build_prompt  # chat builds on completion, not the other way

            ids = build_prompt(self.engine, request).token_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        check_model(request.model, self.model_name)
        try:
            return {"prompt": self.tokenizer.decode(request.tokens)}
        except ValueError as err:
            raise APIError(f"Invalid request: {err}", param="tokens") from None


async def respond(
    run: EngineRequests, raw_request: Request | None, stream: bool,
    make_stream: Callable[[], AsyncIterator[str]], make_collect: Callable[[], Awaitable[T]],
) -> T | EventStream:  # fmt: skip
    """What both endpoints do once their engine requests are built: start them (a full queue or bad
    prompt fails here, before any byte is sent), then stream SSE or collect one response."""
    await unless_disconnected(raw_request, run.start())
    if stream:
        return EventStream(make_stream(), run)
    try:
        return await unless_disconnected(raw_request, make_collect())
    finally:
        run.close()
