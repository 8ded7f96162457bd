"""`/v1/completions`: raw text (or token ids) in, text out, for base models; no chat template.

`echo` with `logprobs` scores the prompt: every prompt token after the first gets its logprob, computed by
the engine in the prefill itself, and `max_tokens=0` returns only that (what lm-evaluation-harness and
other scorers send). Logprobs list every returned token, the end token included when it was generated,
so `token_logprobs[len(prompt):]` lines up with the completion tokens.

    serving = ServingCompletion(engine, "qwen"); result = await serving.create(request, raw_request)
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ..engine.protocol import RequestOutput, TokenLogprob
from .protocol import (
    APIError,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
    sse,
    to_sampling_params,
)
from .serving_engine import (
    EngineJob,
    EngineRequests,
    EventStream,
    OpenAIServing,
    abort_error,
    error_event,
    record_usage,
    respond,
    token_text,
    usage_of,
)
from .structured import request_guided_grammar

# --------------------------------------------------------------------------------------------------
# /v1/completions


@dataclass
class _CompletionState:
    """What one choice has produced so far."""

    text: str = ""
    echoed: bool = False  # the prompt (and its logprobs) is in `text` / `logprobs` already
    echo_chars: int = 0  # length of the echoed prompt, where the completion's text offsets start
    decoder: Any = None  # StreamingDecoder over the completion tokens, for text_offset
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    finish_reason: str | None = None


def _extend(logprobs: CompletionLogprobs, more: CompletionLogprobs) -> None:
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        getattr(logprobs, name).extend(getattr(more, name))


class ServingCompletion(OpenAIServing):
    """OpenAI text completions over an EngineClient (for base models; no chat template)."""

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
                    vocab_size=len(self.tokenizer),
                )
                jobs.append(EngineJob(p * request.n + j, ids, params, prompt_logprobs=request.prompt_logprobs()))
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
        self.model.check(request.model)
        jobs, echoes = self._jobs(request)
        guided = request_guided_grammar(request)  # vLLM's structured_outputs / guided_*: each choice its own state
        if guided is not None:
            constraints = await self.structured.constraints(guided[0], len(jobs), guided[1])
            for job, constraint in zip(jobs, constraints, strict=True):
                job.constraint = constraint
        run = EngineRequests(self.engine, jobs, random_id("cmpl-"), request.engine_logprobs(), self.metrics, arrival)
        return await respond(
            run, raw_request, request.stream,
            lambda: self._stream(request, run, echoes, raw_request),
            lambda: self._collect(request, run, echoes, raw_request),
        )  # fmt: skip

    # ---- one engine output -> text and logprobs -------------------------------------------------
    def _prompt_logprobs(self, prompt_ids: list[int], entries: list[TokenLogprob | None] | None) -> CompletionLogprobs:
        """The echoed prompt's logprobs: null for the first token (and for all of them when the engine
        computed none), `{token: logprob}` alternatives for the rest."""
        decoder, out = self.tokenizer.stream_decoder(), CompletionLogprobs()
        for i, token_id in enumerate(prompt_ids):
            entry = entries[i] if entries is not None and i < len(entries) else None
            out.text_offset.append(len(decoder.text))
            out.tokens.append(token_text(self.tokenizer, token_id)[0])
            out.token_logprobs.append(entry.logprob if entry is not None else None)
            out.top_logprobs.append(self._top(entry) if entry is not None else None)
            decoder.add(token_id)
        return out

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        return {token_text(self.tokenizer, t)[0]: lp for t, lp in entry.top}

    def _logprobs_of(self, state: _CompletionState, entries: list[TokenLogprob]) -> CompletionLogprobs:
        """OpenAI completion logprobs for new tokens, the end token included; text offsets count
        characters of the decoded text (an end token sits at the end: it has no text)."""
        out = CompletionLogprobs()
        for entry in entries:
            out.tokens.append(token_text(self.tokenizer, entry.token_id)[0])
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append(self._top(entry))
            out.text_offset.append(state.echo_chars + len(state.decoder.text))
            state.decoder.add(entry.token_id)
        return out

    def _advance(
        self, request: CompletionRequest, state: _CompletionState, job: EngineJob, out: RequestOutput, echo: str
    ) -> tuple[str, CompletionLogprobs | None]:
        """Fold one engine output into the choice; return the text and logprobs it adds."""
        text, logprobs = "", CompletionLogprobs() if request.logprobs is not None else None
        if request.echo and not state.echoed:
            state.echoed, state.echo_chars, text = True, len(echo), echo
            if logprobs is not None:
                _extend(logprobs, self._prompt_logprobs(job.prompt_ids, out.prompt_logprobs))
        if not request.echo_only:  # echo-only drops the one token the engine had to sample
            text += out.text
            if logprobs is not None and out.logprobs:
                _extend(logprobs, self._logprobs_of(state, out.logprobs))
        if out.finished:
            state.finish_reason = "length" if request.echo_only and out.finish_reason != "abort" else out.finish_reason
        state.text += text
        if logprobs is not None:
            _extend(state.logprobs, logprobs)
        return text, logprobs

    def _states(self, jobs: Sequence[EngineJob]) -> dict[int, _CompletionState]:
        return {job.index: _CompletionState(decoder=self.tokenizer.stream_decoder()) for job in jobs}

    def _usage(self, request: CompletionRequest, run: EngineRequests, last: dict[int, RequestOutput]) -> UsageInfo:
        usage = usage_of(last, run.jobs, request.n)
        if not request.echo_only:
            return usage
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        return UsageInfo.of(usage.prompt_tokens, 0, cached)  # the sampled token was dropped

    async def _collect(
        self, request: CompletionRequest, run: EngineRequests, echoes: list[str], raw_request: Request | None
    ) -> CompletionResponse:
        states = self._states(run.jobs)
        last: dict[int, RequestOutput] = {}
        async for job, out in run.outputs():
            self._advance(request, states[job.index], job, out, echoes[job.index // request.n])
            if out.finished:
                last[job.index] = out
        if any(s.finish_reason == "abort" for s in states.values()):
            raise abort_error()
        usage = self._usage(request, run, last)
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
        states = self._states(run.jobs)
        last: dict[int, RequestOutput] = {}

        def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, reason: str | None) -> str:
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
            return sse(
                CompletionChunk(id=cid, created=created, model=self.model_name, choices=[choice]),
                include_usage=with_usage,
            )

        try:
            async for job, out in run.outputs():
                state = states[job.index]
                if out.finish_reason == "abort":
                    yield error_event(abort_error())
                    break
                text, logprobs = self._advance(request, state, job, out, echoes[job.index // request.n])
                if out.finished:
                    last[job.index] = out
                if text or (logprobs and logprobs.tokens) or out.finished:
                    yield chunk(job.index, text, logprobs, state.finish_reason if out.finished else None)
            else:
                usage = self._usage(request, run, last)
                record_usage(raw_request, usage.prompt_tokens, usage.completion_tokens)
                if with_usage:
                    yield sse(CompletionChunk(id=cid, created=created, model=self.model_name, choices=[], usage=usage))
            yield sse("[DONE]")
        except Exception as err:  # headers are sent: the error can only be one more event
            yield error_event(err)
            yield sse("[DONE]")
        finally:
            run.close()
