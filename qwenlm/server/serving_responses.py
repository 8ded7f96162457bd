"""`/v1/responses`: OpenAI's Responses API as a view of chat completions.

The request's `instructions` and input items become chat messages (function calls and their outputs
become a ReAct round trip, as in chat), `ServingChat.prepare` builds the prompt, grammar and engine
requests, and the reply is rendered as a `response` object with `message` / `function_call` output
items, or streamed as the Responses events (`response.created`, `response.output_text.delta`,
`response.function_call_arguments.done`, ..., `response.completed`). Nothing is stored (see
`responses_protocol`).

    serving = ServingResponses(chat); result = await serving.create(request, raw_request)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from ..engine.protocol import RequestOutput
from .prompting import ChatPrompt
from .protocol import APIError, ChatCompletionRequest, JsonSchemaFormat, ResponseFormat
from .responses_protocol import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    response_event,
)
from .serving_chat import ServingChat
from .serving_engine import EngineRequests, EventStream, abort_error, record_usage, respond, usage_of
from .tool_calls import ContentDelta, ToolCallEvent, ToolCallStreamParser

logger = logging.getLogger("qwenlm.server")

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_SYSTEM_ROLES = frozenset({"system", "developer"})


def _refuse(message: str, param: str) -> APIError:
    return APIError(f"Invalid request: {message}", param=param)


def _text_of(content: Any, where: str) -> str:
    """Message content (a string or text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(f"{where} must be a string or a list of text parts.", where)
    texts = []
    for j, part in enumerate(content):
        if (
            not isinstance(part, Mapping)
            or part.get("type") not in _TEXT_PARTS
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise _refuse(f"{where}[{j}] of type {kind!r} is not supported; only text parts are.", f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def _function_call(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
        raise _refuse(f"{where} (a function_call) needs 'name' and 'call_id' strings.", where)
    arguments = item.get("arguments", "{}")
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": arguments}}


def to_chat_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """`instructions` + `input` as chat messages: instructions and leading system/developer messages form
    the system message; consecutive function_call items form one assistant turn with several calls.

    Raises:
        APIError: (400) an item type this server cannot take (item references need stored items).
    """
    items = [{"role": "user", "content": request.input}] if isinstance(request.input, str) else request.input
    system = [request.instructions] if request.instructions else []
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise _refuse(f"{where} must be an object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", *_SYSTEM_ROLES):
                raise _refuse(f"{where}.role must be user, assistant, system or developer, got {role!r}.", where)
            text = _text_of(item.get("content"), f"{where}.content")
            if role in _SYSTEM_ROLES and not messages:
                system.append(text)
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            continue  # our own outputs never hold reasoning items; a client may echo other models' ones back
        elif kind == "item_reference":
            raise _refuse(f"{where}: item references need stored items, and this server stores nothing.", where)
        else:
            raise _refuse(f"{where}: input items of type {kind!r} are not supported.", where)
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return messages


def _chat_tools(request: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Responses function tools ({type, name, description, parameters}) and tool_choice, chat-shaped."""
    tools = None
    if request.tools:
        tools = []
        for i, tool in enumerate(request.tools):
            if tool.get("type") != "function":
                raise APIError(
                    f"tools[{i}] of type {tool.get('type')!r} is not supported; only function tools are.",
                    param=f"tools[{i}]",
                    code="unsupported_parameter",
                )
            function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
            tools.append({"type": "function", "function": function})
    choice = request.tool_choice
    if isinstance(choice, Mapping):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _refuse('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}.',
                          "tool_choice")  # fmt: skip
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(request: ResponsesRequest) -> ResponseFormat | None:
    fmt = request.text.format if request.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.json_schema is None:
        raise _refuse('text.format of type "json_schema" needs a "schema".', "text.format")
    schema = JsonSchemaFormat.model_validate(
        {"name": fmt.name or "response", "schema": fmt.json_schema, "strict": fmt.strict}
    )
    return ResponseFormat(type="json_schema", json_schema=schema)


def to_chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that produces this response.

    Raises:
        APIError: (400) stored-state features (previous_response_id, background), unsupported items or
            tools, or values the chat endpoint refuses.
    """
    if request.previous_response_id is not None:
        raise APIError(
            "previous_response_id is not supported: this server does not store responses. Send the whole "
            "conversation in `input` (earlier outputs as items) instead.",
            param="previous_response_id",
            code="unsupported_parameter",
        )
    if request.background:
        raise APIError("background responses are not supported (nothing is stored).", param="background",
                       code="unsupported_parameter")  # fmt: skip
    tools, tool_choice = _chat_tools(request)
    fields = {
        "model": request.model,
        "messages": to_chat_messages(request),
        "tools": tools,
        "tool_choice": tool_choice,
        "max_tokens": request.max_output_tokens,
        "response_format": _response_format(request),
        **{k: getattr(request, k) for k in ("temperature", "top_p", "seed", "top_k", "repetition_penalty", "user")},
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        loc = first.get("loc", ()) or ("input",)
        where = _RESPONSES_NAMES.get(str(loc[0]), str(loc[0]))
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise _refuse(f"{where}: {message}.", where) from None


# The chat request's field names in errors -> what the Responses request calls them.
_RESPONSES_NAMES = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
}


def responses_error(err: APIError) -> APIError:
    """An error raised for the chat request behind a Responses request, in the Responses API's terms."""
    if err.param not in _RESPONSES_NAMES:
        return err
    err.param = _RESPONSES_NAMES[err.param]
    err.message = err.message.replace("the messages", "the input").replace("max_tokens", "max_output_tokens")
    return err


class _Builder:
    """The output items of one response, as they grow (shared by the full and the streamed forms)."""

    def __init__(self) -> None:
        self.output: list[OutputMessage | FunctionCallItem] = []
        self.message: OutputMessage | None = None

    def text(self, delta: str) -> tuple[bool, OutputMessage]:
        """Append text to the open message (opening one first); returns (opened now, message)."""
        opened = self.message is None
        if self.message is None:
            self.message = OutputMessage(status="in_progress", content=[OutputText(text="")])
            self.output.append(self.message)
        self.message.content[0].text += delta
        return opened, self.message

    def close_message(self, status: str = "completed") -> OutputMessage | None:
        message, self.message = self.message, None
        if message is not None:
            message.status = status
        return message

    def call(self, call_id: str, name: str, arguments: str) -> FunctionCallItem:
        self.close_message()
        item = FunctionCallItem(call_id=call_id, name=name, arguments=arguments)
        self.output.append(item)
        return item


class ServingResponses:
    """OpenAI Responses API over the chat machinery (one choice, nothing stored)."""

    def __init__(self, chat: ServingChat) -> None:
        self.chat = chat

    def _shell(self, request: ResponsesRequest, response_id: str) -> ResponseObject:
        """The response object without output: what the request asked for, echoed."""
        fmt = (
            request.text.format.model_dump(by_alias=True, exclude_none=True)
            if request.text and request.text.format
            else None
        )
        return ResponseObject(
            id=response_id, model=self.chat.model_name, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, temperature=request.temperature, top_p=request.top_p,
            tools=request.tools or [], tool_choice=request.tool_choice or "auto",
            parallel_tool_calls=True if request.parallel_tool_calls is None else request.parallel_tool_calls,
            text={"format": fmt or {"type": "text"}}, user=request.user, metadata=request.metadata or {},
        )  # fmt: skip

    async def create(
        self, request: ResponsesRequest, raw_request: Request | None = None
    ) -> ResponseObject | EventStream:
        """Run a Responses request: the response object, or (stream=true) its SSE events.

        Raises:
            APIError: invalid or unsupported input (400), unknown model under --strict-model-name (404),
                a busy engine (503).
        """
        chat_request = to_chat_request(request)
        try:
            prompt, run = await self.chat.prepare(chat_request, "resp_")
        except APIError as err:
            raise responses_error(err) from None
        shell = self._shell(request, run.id)
        return await respond(
            run, raw_request, request.stream,
            lambda: self._stream(shell, prompt, run, raw_request),
            lambda: self._collect(shell, prompt, run, raw_request),
        )  # fmt: skip

    def _finish(
        self, shell: ResponseObject, run: EngineRequests, last: dict[int, RequestOutput], reason: str | None
    ) -> ResponseObject:
        usage = usage_of(last, run.jobs, 1)
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        shell.usage = ResponseUsage(
            input_tokens=usage.prompt_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached),
            output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
        )  # fmt: skip
        if reason == "length":
            shell.status, shell.incomplete_details = "incomplete", IncompleteDetails()
        else:
            shell.status = "completed"
        return shell

    async def _collect(
        self, shell: ResponseObject, prompt: ChatPrompt, run: EngineRequests, raw_request: Request | None
    ) -> ResponseObject:
        text, reason, last = "", None, {}
        async for job, out in run.outputs():
            text += out.text
            if out.finished:
                reason, last[job.index] = out.finish_reason, out
        if reason == "abort":
            raise abort_error()
        message, finish = self.chat.message(prompt, text, reason)
        builder = _Builder()
        if message.content:
            builder.text(message.content)
            builder.close_message("incomplete" if finish == "length" else "completed")
        for call in message.tool_calls or []:
            builder.call(call.id, call.function.name, call.function.arguments)
        shell.output = builder.output
        response = self._finish(shell, run, last, reason)
        record_usage(raw_request, response.usage.input_tokens, response.usage.output_tokens)
        return response

    async def _stream(
        self, shell: ResponseObject, prompt: ChatPrompt, run: EngineRequests, raw_request: Request | None
    ) -> AsyncGenerator[str, None]:
        sequence = 0

        def event(event_type: str, **fields: Any) -> str:
            nonlocal sequence
            sequence += 1
            return response_event(event_type, sequence - 1, **fields)

        builder = _Builder()
        parser = ToolCallStreamParser() if prompt.uses_tools else None
        last: dict[int, RequestOutput] = {}

        def close_message(status: str = "completed") -> list[str]:
            message = builder.close_message(status)
            if message is None:
                return []
            index, part = builder.output.index(message), message.content[0]
            where = {"item_id": message.id, "output_index": index}
            return [
                event("response.output_text.done", **where, content_index=0, text=part.text, logprobs=[]),
                event("response.content_part.done", **where, content_index=0, part=part),
                event("response.output_item.done", output_index=index, item=message),
            ]

        try:
            yield event("response.created", response=shell)
            yield event("response.in_progress", response=shell)
            async for job, out in run.outputs():
                if out.finish_reason == "abort":
                    raise abort_error()
                if parser is None:
                    pieces: list[Any] = [ContentDelta(out.text)] if out.text else []
                else:
                    pieces = parser.feed(out.text)
                    if out.finished:
                        pieces += parser.finish(truncated=out.finish_reason == "length")
                for piece in pieces:
                    if isinstance(piece, ContentDelta):
                        opened, message = builder.text(piece.text)
                        index = builder.output.index(message)
                        if opened:
                            yield event("response.output_item.added", output_index=index,
                                        item=message.model_copy(update={"content": []}))  # fmt: skip
                            yield event("response.content_part.added", item_id=message.id, output_index=index,
                                        content_index=0, part=OutputText(text=""))  # fmt: skip
                        yield event("response.output_text.delta", item_id=message.id, output_index=index,
                                    content_index=0, delta=piece.text, logprobs=[])  # fmt: skip
                    elif isinstance(piece, ToolCallEvent):
                        for text in close_message():
                            yield text
                        call = piece.tool_call
                        item = builder.call(call.id, call.name, call.arguments)
                        index = builder.output.index(item)
                        started = item.model_copy(update={"arguments": "", "status": "in_progress"})
                        yield event("response.output_item.added", output_index=index, item=started)
                        yield event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                                    delta=item.arguments)  # fmt: skip
                        yield event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                    arguments=item.arguments)  # fmt: skip
                        yield event("response.output_item.done", output_index=index, item=item)
                if out.finished:
                    last[job.index] = out
                    for text in close_message("incomplete" if out.finish_reason == "length" else "completed"):
                        yield text
                    shell.output = builder.output
                    response = self._finish(shell, run, last, out.finish_reason)
                    record_usage(raw_request, response.usage.input_tokens, response.usage.output_tokens)
                    done = "response.incomplete" if response.status == "incomplete" else "response.completed"
                    yield event(done, response=response)
        except Exception as err:  # headers are sent: the error can only be one more event
            if not isinstance(err, APIError):
                logger.error("error while streaming a response", exc_info=err)
                err = APIError("Internal server error while streaming.", status_code=500, type="server_error")
            yield event("error", code=err.code or err.type, message=err.message, param=err.param)
        finally:
            run.close()
