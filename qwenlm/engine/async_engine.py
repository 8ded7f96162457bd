"""`AsyncEngine`: the `LLMEngine` step loop on one background thread that owns the model, with one
asyncio queue per request — the `EngineClient` the HTTP server talks to.

The event loop never waits for a model step: new requests and aborts go into a thread-safe inbox
that the engine thread drains between steps, and outputs come back through `call_soon_threadsafe`.

    engine = AsyncEngine(LLMEngine(model, tokenizer))
    async for out in engine.generate(prompt_ids, params, request_id="r1"):
        print(out.text, end="")
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
from collections.abc import AsyncIterator

from ..generation.params import SamplingParams
from .engine import LLMEngine
from .protocol import EngineStats, RequestOutput, TokenConstraint


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.generation_config = engine.model.generation_config
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", args) / ("abort", id), to the engine thread
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._queues_lock = threading.Lock()  # held only for dict updates, never during a step
        self._pending = 0  # requests in the inbox, counted against max_queue
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="qwenlm-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, logprobs: int | None = None,
        *, prompt_logprobs: int | None = None, constraint: TokenConstraint | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Stream a request's outputs; leaving the loop early (client gone) aborts it."""
        if self._error is not None or self._stopping:
            raise RuntimeError(f"the engine is not running ({self._error or 'shut down'})")
        self.engine.check_request(prompt_ids, params, queued=len(self.engine.waiting) + self._pending)
        out_queue: asyncio.Queue = asyncio.Queue()
        with self._queues_lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._queues[request_id] = (asyncio.get_running_loop(), out_queue)
            self._pending += 1
        extra = {"prompt_logprobs": prompt_logprobs, "constraint": constraint}
        self._inbox.put(("add", ((request_id, list(prompt_ids), params, logprobs), extra)))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await out_queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._abort_later(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_later(request_id)

    def _abort_later(self, request_id: str) -> None:
        with self._queues_lock:
            self._queues.pop(request_id, None)
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        """A snapshot taken by the engine thread after its last step."""
        return self._stats

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop; requests still running end with finish_reason "abort"."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput | None]) -> None:
        for out in outputs:
            if out is None:
                continue
            with self._queues_lock:
                target = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
            if target is not None:
                loop, out_queue = target
                try:
                    loop.call_soon_threadsafe(out_queue.put_nowait, out)
                except RuntimeError:  # that request's event loop is closed: nobody is listening
                    pass

    def _fail(self, request_id: str, err: BaseException) -> None:
        with self._queues_lock:
            target = self._queues.pop(request_id, None)
        if target is not None:
            target[0].call_soon_threadsafe(target[1].put_nowait, err)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._pending -= 1
                args, extra = payload
                try:
                    self.engine.add_request(*args, **extra)
                except Exception as err:  # raced past the up-front checks (e.g. the queue filled meanwhile)
                    self._fail(args[0], err)
            else:
                self._deliver([self.engine.abort(payload)])

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.engine.has_work():
                    self._deliver(self.engine.step())
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
                self._stats = copy.deepcopy(self.engine.stats())
        except BaseException as err:  # a bug or OOM: fail every waiting client, loudly
            self._error = err
            with self._queues_lock:
                targets, self._queues = list(self._queues.values()), {}
            for loop, out_queue in targets:
                loop.call_soon_threadsafe(out_queue.put_nowait, RuntimeError(f"the engine failed: {err}"))
            raise
        self._drain_inbox()
        self._deliver([self.engine.abort(request_id) for request_id in list(self.engine.requests)])
