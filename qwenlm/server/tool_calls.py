"""Qwen function calling the ReAct way: tool schemas -> instruction text, model output -> tool calls.

Qwen-Chat was never trained on a JSON tool-call format; it was trained on ReAct transcripts
(`Thought:` / `Action:` / `Action Input:` / `Observation:` / `Final Answer:`, spec 5.5 and 8). This
module owns both directions of that text protocol and nothing else (no HTTP, no tokenizer):

- `normalize_tools` + `react_instruction`: OpenAI `tools`, legacy `functions` and Qwen plugin dicts ->
  the instruction that `server.prompting` puts in front of the user's question;
- `parse_tool_response`: a finished generation -> content and/or one `ToolCall` (spec 5.4); a generation
  cut off by max_tokens never yields a call (its arguments may be incomplete), only its text;
- `ToolCallStreamParser`: the same parse done incrementally, for `stream=true`.

    parsed = parse_tool_response('Thought: look it up\\nAction: search\\nAction Input: {"q": "qwen"}')
    parsed.tool_calls[0].name == "search"; parsed.finish_reason_hint == "tool_calls"

Only one call is parsed per generation: the server stops on "Observation:", so a generation holds at
most one Action. A malformed call (no name, arguments that are not a JSON object even after a light
repair) is never an error: the text comes back as plain content.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ACTION = "\nAction:"
ACTION_INPUT = "\nAction Input:"
OBSERVATION = "\nObservation:"
FINAL_ANSWER = "\nFinal Answer:"
THOUGHT = "Thought:"

_CODE_FENCE = re.compile(r"^```[\w+-]*\s*(.*?)\s*(?:```\s*)?$", re.DOTALL)

_INSTRUCTION_TEMPLATE = """Answer the following questions as best you can. You have access to the following APIs:

{tool_lines}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

_TOOL_LINE_TEMPLATE = (
    "{name}: Call this tool to interact with the {human_name} API. What is the {human_name} API useful for? "
    "{description} Parameters: {parameters}"
)


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for; `arguments` is the model's JSON object text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedResponse:
    """A generation split into what the client sees: content (None only beside a tool call) and calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason_hint: Literal["tool_calls", "stop"] = "stop"


@dataclass(frozen=True)
class ContentDelta:
    """A piece of answer text that can be streamed to the client now."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A complete tool call (only known once the generation has finished)."""

    tool_call: ToolCall


StreamEvent = ContentDelta | ToolCallEvent
IdFactory = Callable[[], str]


def new_tool_call_id() -> str:
    """An OpenAI-looking call id: "call_" + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


# --------------------------------------------------------------------------------------------------
# Tool schemas -> instruction


def _normalize_function(obj: Any, where: str) -> dict[str, Any]:
    """One function description (OpenAI, legacy or Qwen plugin keys) -> the uniform dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} must be an object, got {type(obj).__name__}")
    name = obj.get("name_for_model") or obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} has no name")
    human_name = obj.get("name_for_human") or name
    description = obj.get("description_for_model") or obj.get("description") or ""
    if not isinstance(human_name, str) or not isinstance(description, str):
        raise ValueError(f"{where}: name_for_human and description must be strings")
    # OpenAI lets `parameters` be omitted (a function without arguments); the reference required it.
    parameters = obj.get("parameters")
    return {
        "name": name,
        "name_for_human": human_name,
        "description": description,
        "parameters": {} if parameters is None else parameters,
    }


def normalize_tools(
    tools: Sequence[Mapping[str, Any]] | None, functions: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """OpenAI tool objects and legacy/Qwen function objects -> `[{name, name_for_human, description, parameters}]`.

    `tools` entries are `{"type": "function", "function": {...}}`; `functions` entries are the function
    objects themselves. Inside a function, Qwen's `name_for_model` / `name_for_human` /
    `description_for_model` win over `name` / `description` (spec 5.5). The result is accepted again by
    `normalize_tools(None, result)` unchanged.

    Raises:
        ValueError: a list is not a list, an entry is not an object, a tool is not of type "function",
            a function has no name, or two functions share a name.
    """
    out: list[dict[str, Any]] = []
    for key, entries in (("tools", tools), ("functions", functions)):
        if entries is None:
            continue
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
            raise ValueError(f"{key} must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            where = f"{key}[{i}]"
            if key == "tools":
                if not isinstance(entry, Mapping):
                    raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
                if entry.get("type", "function") != "function" or "function" not in entry:
                    raise ValueError(f'{where} must be {{"type": "function", "function": {{...}}}}')
                entry, where = entry["function"], f"{where}.function"
            out.append(_normalize_function(entry, where))
    names = [f["name"] for f in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate tool name(s): {', '.join(duplicates)}")
    return out


def react_instruction(functions: Sequence[Mapping[str, Any]]) -> str:
    """The server's ReAct instruction (spec 5.5, exact text), without the trailing "\\n\\nQuestion: ...".

    Accepts normalized dicts (from `normalize_tools`) or raw function objects.

    Raises:
        ValueError: a function has no name (see `normalize_tools`).
    """
    normalized = [_normalize_function(f, f"functions[{i}]") for i, f in enumerate(functions)]
    lines = [
        _TOOL_LINE_TEMPLATE.format(
            name=f["name"],
            human_name=f["name_for_human"],
            description=f["description"],
            parameters=json.dumps(f["parameters"], ensure_ascii=False),
        )
        for f in normalized
    ]
    names = ", ".join(f["name"] for f in normalized)
    return _INSTRUCTION_TEMPLATE.format(tool_lines="\n\n".join(lines), names=names)


# --------------------------------------------------------------------------------------------------
# Model output -> tool calls


def _strip_code_fence(text: str) -> str:
    """Drop a Markdown code fence around the arguments (```json ... ```); other text is unchanged."""
    match = _CODE_FENCE.match(text)
    return match.group(1) if match else text


def repair_arguments(raw: str) -> str | None:
    """The model's Action Input as a JSON-object string, or None when it is not one.

    Valid JSON objects are returned verbatim (the model's own string). Light repairs only: empty input
    becomes "{}" (a call without arguments), a Markdown code fence is removed, and text after the
    object's closing brace is dropped. Anything else (bare strings, lists, json5, code) is malformed:
    OpenAI clients `json.loads` the arguments and expect an object.
    """
    text = _strip_code_fence(raw.strip())
    if not text:
        return "{}"
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return text[:end] if isinstance(value, dict) else None


def _parse_action(text: str) -> tuple[str, str, str] | None:
    """(thought, name, arguments) of the first Action in `text`, or None if there is no valid one.

    Spec 5.4 positions: first "\\nAction:", then "\\nAction Input:" after it, then the arguments run to
    the next "\\nObservation:" or, when the stop word was trimmed off, to the end. A "\\n" is put in front
    so output that starts straight with "Action:" is found too.
    """
    padded = "\n" + text
    i = padded.find(ACTION)
    if i < 0:
        return None
    j = padded.find(ACTION_INPUT, i + len(ACTION))
    if j < 0:
        return None
    name = padded[i + len(ACTION) : j].strip()
    k = padded.find(OBSERVATION, j + len(ACTION_INPUT))
    arguments = repair_arguments(padded[j + len(ACTION_INPUT) : k if k >= 0 else len(padded)])
    if not name or arguments is None:
        return None
    thought = padded[:i]
    t = thought.find(THOUGHT)
    if t >= 0:
        thought = thought[t + len(THOUGHT) :]
    return thought.strip(), name, arguments


def _answer_text(text: str) -> str:
    """Plain content: after the last "Final Answer:" if there is one, else the whole text; stripped."""
    padded = "\n" + text
    z = padded.rfind(FINAL_ANSWER)
    return (padded[z + len(FINAL_ANSWER) :] if z >= 0 else text).strip()


def parse_tool_response(
    text: str, id_factory: IdFactory = new_tool_call_id, *, truncated: bool = False
) -> ParsedResponse:
    """Split a finished generation (stop words already cut) into content and at most one tool call.

    - A valid Action -> one `ToolCall`, content = the thought before it ("Thought:" prefix removed;
      None when empty), hint "tool_calls".
    - Otherwise -> content = the text after the last "Final Answer:", or the whole text when there is
      none (a malformed Action lands here too: the client sees the raw text), hint "stop".
    - `truncated` (the generation hit max_tokens): never a call, even one that looks complete, since
      the model had not ended it ("Action Input:" with nothing after it is not a call without
      arguments); the client gets the text, with finish_reason "length".

    Never raises on model output.
    """
    action = None if truncated else _parse_action(text)
    if action is None:
        return ParsedResponse(content=_answer_text(text), tool_calls=[], finish_reason_hint="stop")
    thought, name, arguments = action
    call = ToolCall(id=id_factory(), name=name, arguments=arguments)
    return ParsedResponse(content=thought or None, tool_calls=[call], finish_reason_hint="tool_calls")


def _events_of(parsed: ParsedResponse) -> list[StreamEvent]:
    events: list[StreamEvent] = [ContentDelta(parsed.content)] if parsed.content else []
    return events + [ToolCallEvent(call) for call in parsed.tool_calls]


class ToolCallStreamParser:
    """`parse_tool_response` done incrementally over text deltas (stream=true with tools).

    The first marker decides the mode:

    - until "Final Answer:" or "Action:" shows up, everything is held back: text before the scaffolding
      may turn out to be a thought (dropped, or the content beside a tool call) or the whole answer;
    - after "Final Answer:" the answer streams as it arrives (leading whitespace skipped, trailing
      whitespace held until more text follows, so the result is stripped like the non-stream one);
    - after "Action:" everything is buffered and `finish()` emits the parsed call (or, if malformed,
      the plain content).

    For outputs with at most one "Final Answer:" and no Action after it (what Qwen emits), the deltas
    joined plus the calls equal `parse_tool_response(whole_text)` for every chunking. A stream cannot
    take back text already sent, so after "Final Answer:" it commits: a second "Final Answer:" or a late
    Action is kept as answer text, where the non-stream parse would pick the last answer / the call.

        parser = ToolCallStreamParser()
        for delta in deltas: send(parser.feed(delta))
        send(parser.finish())
    """

    _LOOKBACK = max(len(ACTION), len(FINAL_ANSWER)) - 1  # a marker may straddle two deltas

    def __init__(self, id_factory: IdFactory = new_tool_call_id) -> None:
        self._id_factory = id_factory
        self._text = ""
        self._mode: Literal["pending", "answer", "action"] = "pending"
        self._scanned = 0  # chars of self._text already searched for markers (minus the lookback)
        self._answer_started = False
        self._held_space = ""
        self._finished = False

    def feed(self, delta: str) -> list[StreamEvent]:
        """Take the next piece of generated text; return what can be sent now."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._text += delta
        if self._mode == "pending":
            answer_start = self._detect_mode()
            return self._answer(self._text[answer_start:]) if self._mode == "answer" else []
        if self._mode == "answer":
            return self._answer(delta)
        return []

    def finish(self, truncated: bool = False) -> list[StreamEvent]:
        """End of generation: flush what was held back (the answer's trailing whitespace is dropped).
        `truncated`: the generation hit max_tokens, so a pending call comes out as text (see
        `parse_tool_response`)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._mode == "answer":
            return []
        return _events_of(parse_tool_response(self._text, self._id_factory, truncated=truncated))

    def _detect_mode(self) -> int:
        """Look for the first complete marker; switch mode; return where the answer starts in the text."""
        padded = "\n" + self._text
        start = max(0, self._scanned - self._LOOKBACK)
        self._scanned = len(padded)
        a = padded.find(ACTION, start)
        f = padded.find(FINAL_ANSWER, start)
        if a >= 0 and (f < 0 or a < f):
            self._mode = "action"
        elif f >= 0:
            self._mode = "answer"
            return f + len(FINAL_ANSWER) - 1  # -1: undo the padding
        return len(self._text)

    def _answer(self, piece: str) -> list[StreamEvent]:
        if not self._answer_started:
            piece = piece.lstrip()
            if not piece:
                return []
            self._answer_started = True
        piece = self._held_space + piece
        body = piece.rstrip()
        self._held_space = piece[len(body) :]
        return [ContentDelta(body)] if body else []
