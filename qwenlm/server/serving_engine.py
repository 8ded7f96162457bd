"""The engine plumbing every OpenAI endpoint shares: engine requests in, outputs merged, clients watched.

Each endpoint turns its request into one or more engine requests (`n` choices, several prompts) and
then either collects the outputs or streams them as server-sent events. `EngineRequests` owns the
part in between: starting the engine requests (a full queue -> 503 before any byte is sent), merging
their outputs, and aborting every unfinished one the moment the client goes away. It depends only on
the `EngineClient` protocol.

    run = EngineRequests(engine, [EngineJob(0, prompt_ids, params)], random_id("cmpl-"))
    result = await respond(run, raw_request, stream, make_stream, make_collect)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from ..engine.protocol import EngineBusyError, EngineClient, RequestOutput, TokenConstraint
from ..generation.params import SamplingParams
from ..tokenizer import SPECIAL_START_ID
from .metrics import ServerMetrics
from .protocol import APIError, UsageInfo, sse
from .structured import StructuredOutput

T = TypeVar("T")
logger = logging.getLogger("qwenlm.server")

BUSY_STATUS = 503  # a full queue is an overloaded server (OpenAI's own status for it); OpenAI clients retry it
USAGE_SCOPE_KEY = "qwenlm.usage"  # where a handler leaves (prompt, completion) tokens for the access log

# <|endoftext|>, <|im_start|>, <|im_end|>: the tokens that end a reply. Chat logprobs leave them out (they
# are not content, and OpenAI's chat API does the same); text completions list every generated token.
STOP_TOKEN_IDS = frozenset(range(SPECIAL_START_ID, SPECIAL_START_ID + 3))

_background: set[asyncio.Task] = set()  # fire-and-forget aborts, referenced until done


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready; nobody is left to answer."""


@dataclass(frozen=True)
class ServedModel:
    """The one model this server serves, and whether requests must name it exactly.

    By default any `model` is accepted (the reference server's behaviour: clients written for it send
    "Qwen" or "gpt-3.5-turbo"); `strict` (`--strict-model-name`) answers other names with a 404.
    Either way the model is listed, and named in responses, by `name`.
    """

    name: str
    strict: bool = False

    def check(self, requested: str | None) -> None:
        if self.strict:
            check_model(requested, self.name)


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


class OpenAIServing:
    """What the chat and completion routes share: the engine, the served model, metrics, the tokenizer and the
    grammar compiler for structured output (one per server, so the vocabulary is indexed once; made here when
    None)."""

    def __init__(
        self,
        engine: EngineClient,
        model: ServedModel | str,
        metrics: ServerMetrics | None = None,
        structured: StructuredOutput | None = None,
    ) -> None:
        self.engine = engine
        self.model = model if isinstance(model, ServedModel) else ServedModel(model)
        self.model_name = self.model.name
        self.metrics = metrics
        self.tokenizer: Any = engine.tokenizer
        self.structured = structured or StructuredOutput(engine.tokenizer)


@dataclass
class EngineJob:
    """One engine request behind an API request: choice `index` of prompt `prompt_ids`."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    finished: bool = False
    first_at: float | None = None
    prompt_logprobs: int | None = None  # alternatives per prompt token (echo + logprobs)
    constraint: TokenConstraint | None = None  # the grammar this choice must follow (its own state)

    def engine_options(self) -> dict[str, Any]:
        """The optional `generate` arguments this job uses (only those: engines without them still serve)."""
        options: dict[str, Any] = {}
        if self.prompt_logprobs is not None:
            options["prompt_logprobs"] = self.prompt_logprobs
        if self.constraint is not None:
            options["constraint"] = self.constraint
        return options


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
            stream = self.engine.generate(
                job.prompt_ids, job.params, job.request_id, logprobs=self.logprobs, **job.engine_options()
            )
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
            APIError: 503 when the engine's queue is full, 400 when it rejects the prompt.
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
            type="server_error",
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
