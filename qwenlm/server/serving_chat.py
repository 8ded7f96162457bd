"""`/v1/chat/completions`: OpenAI chat semantics over an EngineClient.

Messages become a Qwen ChatML prompt (tools and functions as ReAct text) in `server.prompting`; the
engine generates, under a grammar when the request asks for JSON (`response_format`) or forces a tool
call (`server.structured`); the reply goes back as one `chat.completion` or as `chat.completion.chunk`
events, with ReAct tool calls parsed back into `tool_calls` (or the legacy `function_call`), both when
streaming and not. A reply cut off by max_tokens is never a tool call: it ends with "length" and its text.

    serving = ServingChat(engine, "qwen"); result = await serving.create(request, raw_request)
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ..engine.protocol import EngineClient, RequestOutput, TokenLogprob
from .prompting import ChatPrompt, PromptError, build_chat_prompt
from .protocol import (
    APIError,
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    TokenizeRequest,
    TokenLogprobEntry,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    random_id,
    sse,
    to_sampling_params,
)
from .serving_engine import (
    STOP_TOKEN_IDS,
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
from .structured import reply_grammar, request_guided_grammar
from .tool_calls import ContentDelta, ToolCallEvent, ToolCallStreamParser, parse_tool_response

DEFAULT_MAX_WINDOW_SIZE = 6144  # history budget of make_context when the checkpoint sets none


def build_prompt(engine: EngineClient, request: ChatCompletionRequest | TokenizeRequest) -> ChatPrompt:
    """The Qwen prompt for a chat request (also used by /tokenize, so counts match exactly).

    Raises:
        APIError: (400) the messages or tool settings are invalid.
    """
    gen = getattr(engine, "generation_config", None)
    window = getattr(gen, "max_window_size", None) or DEFAULT_MAX_WINDOW_SIZE

    def dump(items: list[Any] | None) -> list[dict] | None:
        return None if items is None else [item.model_dump(exclude_none=True) for item in items]

    try:
        return build_chat_prompt(
            engine.tokenizer,
            dump(request.messages),
            tools=dump(request.tools),
            tool_choice=getattr(request, "tool_choice", None),
            functions=dump(request.functions),
            function_call=getattr(request, "function_call", None),
            max_window_size=window,
        )
    except PromptError as err:
        raise APIError(str(err), param="messages") from None


def _check_unsupported(request: ChatCompletionRequest) -> None:
    if request.top_logprobs and not request.logprobs:
        raise APIError("top_logprobs requires logprobs to be true.", param="top_logprobs")


@dataclass
class _ChoiceState:
    """What one choice has produced so far."""

    text: str = ""
    logprobs: list[TokenLogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    parser: ToolCallStreamParser | None = None
    tool_calls: int = 0  # streamed so far


class ServingChat(OpenAIServing):
    """OpenAI chat completions over an EngineClient (see `OpenAIServing` for the arguments)."""

    async def create(
        self, request: ChatCompletionRequest, raw_request: Request | None = None
    ) -> ChatCompletionResponse | EventStream:
        """Run a chat request: a full response, or (stream=true) an iterator of SSE strings.

        Raises:
            APIError: unknown model, invalid messages or options, context overflow, busy engine.
            ClientDisconnected: the client hung up before the response was ready.
        """
        prompt, run = await self.prepare(request, "chatcmpl-")
        return await respond(
            run, raw_request, request.stream,
            lambda: self._stream(request, prompt, run, raw_request),
            lambda: self._collect(request, prompt, run, raw_request),
        )  # fmt: skip

    async def prepare(self, request: ChatCompletionRequest, id_prefix: str) -> tuple[ChatPrompt, EngineRequests]:
        """The prompt and the (not yet started) engine requests of a chat request; the Responses API
        builds on this too.

        Raises:
            APIError: unknown model, invalid messages, options or schema, context overflow.
        """
        arrival = time.perf_counter()
        self.model.check(request.model)
        _check_unsupported(request)
        prompt = build_prompt(self.engine, request)
        gen = getattr(self.engine, "generation_config", None)
        params = [
            to_sampling_params(
                request,
                prompt_tokens=len(prompt.token_ids),
                max_model_len=self.engine.max_model_len,
                generation_config=gen,
                stop=prompt.stop,
                stop_token_ids=prompt.stop_token_ids,
                choice_index=i,
                vocab_size=len(self.tokenizer),
            )
            for i in range(request.n)
        ]
        grammar = reply_grammar(prompt, request.response_format)
        param = "tool_choice" if prompt.forced_tools else "response_format"
        guided = request_guided_grammar(request)  # vLLM's structured_outputs / guided_*
        if guided is not None:
            if grammar is not None or prompt.uses_tools:
                raise APIError(f"{guided[1]} cannot be combined with tools or a JSON response_format.",
                               param=guided[1])  # fmt: skip
            grammar, param = guided
        constraints = await self.structured.constraints(grammar, request.n, param)
        jobs = [EngineJob(i, prompt.token_ids, params[i], constraint=constraints[i]) for i in range(request.n)]
        run = EngineRequests(self.engine, jobs, random_id(id_prefix), request.engine_logprobs(), self.metrics, arrival)
        return prompt, run

    # ---- logprobs ------------------------------------------------------------------------------
    def _logprob_entries(self, entries: list[TokenLogprob] | None) -> list[TokenLogprobEntry]:
        """OpenAI chat logprobs for new tokens; the closing stop token is not part of the content."""
        out = []
        for entry in entries or []:
            if entry.token_id in STOP_TOKEN_IDS:
                continue
            token, raw = token_text(self.tokenizer, entry.token_id)
            top = []
            for token_id, logprob in entry.top:
                alt, alt_raw = token_text(self.tokenizer, token_id)
                top.append(TopLogprob(token=alt, logprob=logprob, bytes=alt_raw))
            out.append(TokenLogprobEntry(token=token, logprob=entry.logprob, bytes=raw, top_logprobs=top))
        return out

    # ---- full response -------------------------------------------------------------------------
    def message(self, prompt: ChatPrompt, text: str, reason: str | None) -> tuple[ChatResponseMessage, str | None]:
        """The assistant message and finish reason; ReAct output parsed into a tool call if there is one
        (never when the reply was cut off by max_tokens: that stays text, with reason "length")."""
        if not prompt.uses_tools:
            return ChatResponseMessage(content=text), reason
        parsed = parse_tool_response(text, truncated=reason == "length")
        if not parsed.tool_calls:
            return ChatResponseMessage(content=parsed.content), reason
        if prompt.legacy_functions:
            call = parsed.tool_calls[0]
            message = ChatResponseMessage(
                content=parsed.content, function_call=FunctionCall(name=call.name, arguments=call.arguments)
            )
            return message, "function_call"
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.tool_calls
        ]
        return ChatResponseMessage(content=parsed.content, tool_calls=calls), "tool_calls"

    async def _collect(
        self, request: ChatCompletionRequest, prompt: ChatPrompt, run: EngineRequests, raw_request: Request | None
    ) -> ChatCompletionResponse:
        states = {job.index: _ChoiceState() for job in run.jobs}
        last: dict[int, RequestOutput] = {}
        async for job, out in run.outputs():
            state = states[job.index]
            state.text += out.text
            if request.logprobs:
                state.logprobs += self._logprob_entries(out.logprobs)
            if out.finished:
                state.finish_reason = out.finish_reason
                last[job.index] = out
        if any(s.finish_reason == "abort" for s in states.values()):
            raise abort_error()
        usage = usage_of(last, run.jobs, request.n)
        record_usage(raw_request, usage.prompt_tokens, usage.completion_tokens)
        choices = []
        for index, state in sorted(states.items()):
            message, reason = self.message(prompt, state.text, state.finish_reason)
            logprobs = ChatChoiceLogprobs(content=state.logprobs) if request.logprobs else None
            choices.append(ChatCompletionChoice(index=index, message=message, logprobs=logprobs, finish_reason=reason))
        return ChatCompletionResponse(id=run.id, model=self.model_name, choices=choices, usage=usage)

    # ---- streaming -----------------------------------------------------------------------------
    def _tool_deltas(self, prompt: ChatPrompt, state: _ChoiceState, events: list[Any]) -> list[DeltaMessage]:
        """Stream-parser events -> deltas: answer text as content, each tool call as one delta."""
        deltas = []
        for event in events:
            if isinstance(event, ContentDelta):
                deltas.append(DeltaMessage(content=event.text))
            elif isinstance(event, ToolCallEvent):
                call = event.tool_call
                function = FunctionCallDelta(name=call.name, arguments=call.arguments)
                if prompt.legacy_functions:
                    deltas.append(DeltaMessage(function_call=function))
                else:
                    tool_call = ToolCallDelta(index=state.tool_calls, id=call.id, type="function", function=function)
                    deltas.append(DeltaMessage(tool_calls=[tool_call]))
                state.tool_calls += 1
        return deltas

    def _finish_reason(self, prompt: ChatPrompt, state: _ChoiceState, engine_reason: str | None) -> str | None:
        if state.tool_calls:
            return "function_call" if prompt.legacy_functions else "tool_calls"
        return engine_reason

    async def _stream(
        self, request: ChatCompletionRequest, prompt: ChatPrompt, run: EngineRequests, raw_request: Request | None
    ) -> AsyncGenerator[str, None]:
        cid, created, with_usage = run.id, int(time.time()), request.include_usage
        states = {
            job.index: _ChoiceState(parser=ToolCallStreamParser() if prompt.uses_tools else None) for job in run.jobs
        }
        last: dict[int, RequestOutput] = {}

        def chunk(
            index: int, delta: DeltaMessage, logprobs: list[TokenLogprobEntry] | None = None, reason: str | None = None
        ) -> str:
            lp = ChatChoiceLogprobs(content=logprobs) if logprobs is not None else None
            choice = ChatCompletionStreamChoice(index=index, delta=delta, logprobs=lp, finish_reason=reason)
            return sse(
                ChatCompletionChunk(id=cid, created=created, model=self.model_name, choices=[choice]),
                include_usage=with_usage,
            )

        try:
            for index in sorted(states):
                yield chunk(index, DeltaMessage(role="assistant", content=""))
            async for job, out in run.outputs():
                state = states[job.index]
                if out.finish_reason == "abort":
                    yield error_event(abort_error())
                    break
                logprobs = self._logprob_entries(out.logprobs) if request.logprobs else None
                if state.parser is None:
                    deltas = [DeltaMessage(content=out.text)] if out.text else []
                else:
                    events = state.parser.feed(out.text)
                    if out.finished:
                        events += state.parser.finish(truncated=out.finish_reason == "length")
                    deltas = self._tool_deltas(prompt, state, events)
                if logprobs and not deltas:
                    deltas = [DeltaMessage(content="")]
                for n, delta in enumerate(deltas):
                    yield chunk(job.index, delta, logprobs if n == 0 and request.logprobs else None)
                if out.finished:
                    last[job.index] = out
                    yield chunk(job.index, DeltaMessage(), None, self._finish_reason(prompt, state, out.finish_reason))
            else:
                usage = usage_of(last, run.jobs, request.n)
                record_usage(raw_request, usage.prompt_tokens, usage.completion_tokens)
                if with_usage:
                    yield sse(
                        ChatCompletionChunk(id=cid, created=created, model=self.model_name, choices=[], usage=usage)
                    )
            yield sse("[DONE]")
        except Exception as err:  # headers are sent: the error can only be one more event
            yield error_event(err)
            yield sse("[DONE]")
        finally:
            run.close()
