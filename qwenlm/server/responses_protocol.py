"""The wire format of OpenAI's Responses API (`POST /v1/responses`): the request, the response object and
its output items, usage, and the streaming events.

What is served: text and message input (input_text / output_text parts), `instructions`, function
tools (`function_call` / `function_call_output` items carry a tool round trip), `tool_choice`,
`text.format` (text, json_object, json_schema), `max_output_tokens`, `temperature`, `top_p`, and
`stream=true`. Nothing is stored: `previous_response_id`, item references and background runs are
refused with a 400 that says so, and every response reports `store: false`.

    request = ResponsesRequest.model_validate({"model": "qwen", "input": "Hi"})
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from .protocol import _Request, _Wire, random_id


class TextFormat(_Request):
    """`text.format`: {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "name", "schema", ...}."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None


class ResponsesRequest(_Request):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool = False
    store: bool | None = None  # accepted; nothing is ever stored (see the module docstring)
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Extensions beyond the OpenAI API (as in chat completions).
    seed: int | None = None
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0)


# --------------------------------------------------------------------------------------------------
# Output


class OutputText(_Wire):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(_Wire):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: random_id("msg_"))
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallItem(_Wire):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: random_id("fc_"))
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class InputTokensDetails(_Wire):
    cached_tokens: int = 0


class OutputTokensDetails(_Wire):
    reasoning_tokens: int = 0


class ResponseUsage(_Wire):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(_Wire):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(_Wire):
    """The `response` object; `output_text` is the SDK's convenience property, computed client-side."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage | FunctionCallItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


def response_event(event_type: str, sequence_number: int, **fields: Any) -> str:
    """One Responses streaming event as SSE: `event: <type>` plus its JSON (models are dumped)."""
    data = {"type": event_type, "sequence_number": sequence_number}
    for key, value in fields.items():
        data[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return f"event: {event_type}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
