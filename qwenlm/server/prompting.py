"""OpenAI chat messages -> the Qwen prompt (token ids + stop rules) the engine generates from.

Owns the request-side rules of the reference `openai_api.py` (spec 5.3 - 5.5): which system prompt is
used, how tool use is folded into ReAct text (`Thought:` / `Action:` / `Action Input:` /
`Observation:`), where the ReAct instruction goes, and when a request continues the last assistant
message instead of opening a new turn. The bytes themselves come from `qwenlm.chat_format.make_context`,
so a request without tools is token-for-token what `model.chat` would build.

    prompt = build_chat_prompt(tok, [{"role": "user", "content": "hi"}])
    engine.generate(prompt.token_ids, stop=prompt.stop, stop_token_ids=prompt.stop_token_ids)

`tool_choice="required"` or a named function keeps the tools in the prompt exactly like "auto" and
lists them in `ChatPrompt.forced_tools`: the serving layer then constrains decoding (`server.structured`)
so the reply is a call to one of them with arguments matching its schema. "none" removes the tools.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenlm.chat_format import DEFAULT_SYSTEM, make_context
from qwenlm.server.tool_calls import normalize_tools, react_instruction
from qwenlm.tokenizer import QwenTokenizer

SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer OpenAI name for the system message
FINAL_ANSWER_PREFIX = "Thought: I now know the final answer.\nFinal Answer: "
OBSERVATION_STOP = "Observation:"


class PromptError(ValueError):
    """Invalid request messages; the message is what the client sees (HTTP 400)."""


@dataclass
class ChatPrompt:
    """Everything the engine needs to run one chat request, and how to read its output back."""

    token_ids: list[int]
    """The full prompt to generate from."""
    stop: list[str]
    """Extra stop strings the engine must apply (\"Observation:\" when tools are in the prompt)."""
    stop_token_ids: list[list[int]]
    """ChatML stop sequences `[[im_end], [im_start]]`; the caller adds eos handling."""
    uses_tools: bool
    """Tools/functions are in the prompt, so the output must go through `parse_tool_response`."""
    legacy_functions: bool
    """The request used `functions` (answer with `function_call`) rather than `tools` (`tool_calls`)."""
    is_continuation: bool
    """The last message was an assistant message: the model continues it (no new assistant turn)."""
    text: str = ""
    """The prompt as text (decode of `token_ids`), for logs and `echo`."""
    tools: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """The tools in the prompt, normalized (`tool_calls.normalize_tools`)."""
    forced_tools: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """The tools the reply must call one of (tool_choice "required" or a named function); empty = free."""


# --------------------------------------------------------------------------------------------------
# Request fields


def _content_text(message: Mapping[str, Any], index: int) -> str:
    """Message content as a string: None/missing -> "", text parts joined with "\\n"."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise PromptError(f"Invalid request: messages[{index}].content supports only text parts.")
            parts.append(part["text"])
        return "\n".join(parts)
    raise PromptError(f"Invalid request: messages[{index}].content must be a string, a list of text parts or null.")


def _clean(text: str) -> str:
    """Spec 5.3 normalisation of every message: leading newlines and trailing whitespace removed."""
    return text.lstrip("\n").rstrip()


def _role_of(message: Any, index: int) -> str:
    if not isinstance(message, Mapping):
        raise PromptError(f"Invalid request: messages[{index}] must be an object with a 'role'.")
    role = message.get("role")
    if not isinstance(role, str):
        raise PromptError(f"Invalid request: messages[{index}] has no 'role' string.")
    return role


def _call_parts(call: Any, where: str) -> tuple[str, str]:
    """(name, arguments) of a `function_call` object; dict arguments are JSON-dumped."""
    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) or not call["name"]:
        raise PromptError(f"Invalid request: {where} must be an object with a 'name' string.")
    arguments = call.get("arguments")
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return call["name"], arguments


def _tool_choice_mode(choice: Any, names: list[str], field: str) -> str:
    """Reduce a tool choice to "auto", "none", "required" or the name of the function that must be called
    (which must be among the tools)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    name = None
    if isinstance(choice, Mapping):
        target = choice.get("function") if field == "tool_choice" else choice
        if isinstance(target, Mapping):
            name = target.get("name")
    if not isinstance(name, str):
        expected = '{"type": "function", "function": {"name": ...}}' if field == "tool_choice" else '{"name": ...}'
        raise PromptError(f'Invalid request: {field} must be "none", "auto", "required" or {expected}.')
    if name not in names:
        raise PromptError(f"Invalid request: {field} names function {name!r}, which is not among the given tools.")
    return name


def resolve_tools(
    tools: Any, tool_choice: Any, functions: Any, function_call: Any
) -> tuple[list[dict[str, Any]], bool, list[dict[str, Any]]]:
    """Tools that go into the prompt (empty when none / tool_choice "none"), whether the API is legacy,
    and the tools the reply must call one of (all for "required", the named one, or none).

    Raises:
        PromptError: both `tools` and `functions`, a bad tool schema, or a bad / dangling tool choice.
    """
    if tools and functions:
        raise PromptError("Invalid request: use either tools or functions, not both.")
    legacy = bool(functions)
    try:
        normalized = normalize_tools(None, functions) if legacy else normalize_tools(tools, None)
    except ValueError as e:
        raise PromptError(f"Invalid request: {e}.") from e
    if legacy:
        fields = [("function_call", function_call)]
    elif normalized:
        fields = [("tool_choice", tool_choice)]
    else:  # no tools at all: a choice may only say "no call"
        fields = [("tool_choice", tool_choice), ("function_call", function_call)]
    for field, choice in fields:
        if not normalized and choice not in (None, "auto", "none"):
            raise PromptError(f"Invalid request: {field} is only allowed when tools are given.")
    field, choice = fields[0]
    mode = _tool_choice_mode(choice, [t["name"] for t in normalized], field)
    if mode == "none":
        return [], legacy, []
    forced = normalized if mode == "required" else [t for t in normalized if t["name"] == mode]
    return normalized, legacy, [] if mode == "auto" else forced


# --------------------------------------------------------------------------------------------------
# Folding (spec 5.3)


def _expand_tool_calls(messages: Sequence[Mapping[str, Any]], start: int) -> list[tuple[int, dict[str, Any]]]:
    """Rewrite OpenAI `tool_calls` into the legacy one-call-per-message shape the folding rules know.

    An assistant message with calls c1..cn and the `tool` messages right after it become
    assistant(c1), function(result of c1), ..., assistant(cn), function(result of cn): one ReAct round
    per call, in call order, results matched by `tool_call_id` (or by position when it is missing).
    Each item keeps the index of the original message, for error messages.
    """
    out: list[tuple[int, dict[str, Any]]] = []
    i = start
    while i < len(messages):
        message = messages[i]
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not calls:
            out.append((i, dict(message)))
            i += 1
            continue
        if not isinstance(calls, list):
            raise PromptError(f"Invalid request: messages[{i}].tool_calls must be a list.")
        parsed = [_tool_call_of(call, f"messages[{i}].tool_calls[{n}]") for n, call in enumerate(calls)]
        results, i_next = _tool_results(messages, i, [call_id for call_id, _ in parsed])
        for n, (_, function_call) in enumerate(parsed):
            content = message.get("content") if n == 0 else None
            out.append((i, {"role": "assistant", "content": content, "function_call": function_call}))
            if n in results:
                out.append(results[n])
        i = i_next
    return out


def _tool_call_of(call: Any, where: str) -> tuple[str | None, dict[str, str]]:
    """(id, {"name", "arguments"}) of one OpenAI tool call."""
    if not isinstance(call, Mapping) or call.get("type", "function") != "function":
        raise PromptError(f'Invalid request: {where} must be {{"type": "function", "function": {{...}}}}.')
    name, arguments = _call_parts(call.get("function"), f"{where}.function")
    call_id = call.get("id")
    return (call_id if isinstance(call_id, str) else None), {"name": name, "arguments": arguments}


def _tool_results(
    messages: Sequence[Mapping[str, Any]], i: int, call_ids: list[str | None]
) -> tuple[dict[int, tuple[int, dict[str, Any]]], int]:
    """The `tool` messages after messages[i], keyed by the index of the call they answer."""
    results: dict[int, tuple[int, dict[str, Any]]] = {}
    j = i + 1
    while j < len(messages) and isinstance(messages[j], Mapping) and messages[j].get("role") == "tool":
        wanted = messages[j].get("tool_call_id")
        if wanted is None:
            n = next((n for n in range(len(call_ids)) if n not in results), None)
        else:
            n = next((n for n, call_id in enumerate(call_ids) if call_id == wanted and n not in results), None)
        if n is None:
            raise PromptError(
                f"Invalid request: messages[{j}].tool_call_id {wanted!r} does not match a tool call of messages[{i}]."
            )
        results[n] = (j, dict(messages[j]))
        j += 1
    return results, j


def _render_assistant(message: Mapping[str, Any], index: int, content: str, uses_tools: bool) -> str:
    """An assistant message as ReAct text: a tool call becomes Thought/Action/Action Input."""
    function_call = message.get("function_call")
    if function_call is None:
        return FINAL_ANSWER_PREFIX + content if uses_tools else content
    name, arguments = _call_parts(function_call, f"messages[{index}].function_call")
    thought = content if content.startswith("Thought:") else f"Thought: {content}"
    return f"{thought}\nAction: {name}\nAction Input: {arguments}"


def fold_messages(messages: Sequence[Mapping[str, Any]], start: int, uses_tools: bool) -> list[tuple[str, str]]:
    """Fold messages[start:] into alternating ("user" | "assistant", text) turns (spec 5.3 step 4).

    Tool results are appended to the assistant message before them as "\\nObservation: ..." (plus
    "\\nThought:" when the result is the last message, so the model goes on reasoning), and an
    assistant message after an observation continues that same assistant turn: a multi-step tool use
    becomes one assistant turn, as in Qwen's training data.

    Raises:
        PromptError: system message not first, unknown role, or a role where it cannot be.
    """
    expanded = _expand_tool_calls(messages, start)
    folded: list[list[str]] = []
    for position, (index, message) in enumerate(expanded):
        role = _role_of(message, index)
        content = _clean(_content_text(message, index))
        if role in ("function", "tool"):
            if not folded or folded[-1][0] != "assistant":
                raise PromptError(f"Invalid request: Expecting role assistant before role {role}.")
            folded[-1][1] += f"\nObservation: {content}"
            if position == len(expanded) - 1:
                folded[-1][1] += "\nThought:"
        elif role == "assistant":
            if not folded:
                raise PromptError("Invalid request: Expecting role user before role assistant.")
            text = _render_assistant(message, index, content, uses_tools)
            if folded[-1][0] == "user":
                folded.append(["assistant", text])
            else:
                folded[-1][1] += "\n" + text
        elif role == "user":
            folded.append(["user", content])
        else:  # "system" not first, or a role nobody knows
            raise PromptError(f"Invalid request: Incorrect role {role}.")
    return [(role, text) for role, text in folded]


def split_conversation(folded: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str | None]:
    """(history pairs, new query or None for a continuation) from folded turns (spec 5.3 steps 5-6).

    Raises:
        PromptError: the turns do not pair up as (user, assistant).
    """
    query = None
    if folded and folded[-1][0] == "user":
        query, folded = folded[-1][1], folded[:-1]
    if len(folded) % 2:
        raise PromptError("Invalid request")
    history = []
    for (q_role, q), (a_role, a) in zip(folded[::2], folded[1::2], strict=True):
        if (q_role, a_role) != ("user", "assistant"):
            raise PromptError(
                "Invalid request: Expecting exactly one user (or function) role before every assistant role."
            )
        history.append((q, a))
    return history, query


# --------------------------------------------------------------------------------------------------
# Prompt


def _system_of(messages: Sequence[Any]) -> tuple[str, int]:
    """(system text, index of the first non-system message): a system message counts only when first."""
    if _role_of(messages[0], 0) in SYSTEM_ROLES:
        return _clean(_content_text(messages[0], 0)), 1
    return DEFAULT_SYSTEM, 0


def _check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise PromptError("Invalid request: messages must be a list of message objects.")
    roles = [_role_of(m, i) for i, m in enumerate(messages)]
    if "user" not in roles:
        raise PromptError("Invalid request: Expecting at least one user message.")


def build_chat_prompt(
    tokenizer: QwenTokenizer,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    tool_choice: str | dict | None = None,
    functions: list[dict] | None = None,
    function_call: str | dict | None = None,
    max_window_size: int = 6144,
) -> ChatPrompt:
    """Turn an OpenAI chat request into the Qwen prompt, like the reference server (spec 5.3 - 5.5).

    A request ending with a user message is rendered by `make_context` (byte-identical to `model.chat`,
    history truncation included). A request ending with an assistant message (or a tool result, which
    is folded into the assistant turn before it) is a continuation: the same layout with the final
    assistant turn left open, i.e. `make_context` over the earlier turns plus the assistant text.

    Args:
        messages: OpenAI messages; roles system (first only), user, assistant, tool, function.
        tools / tool_choice: OpenAI tools API. functions / function_call: the legacy API.
        max_window_size: history budget in tokens (see `make_context`).

    Raises:
        PromptError: invalid messages or tool settings; the message is meant for the client.
    """
    _check_messages(messages)
    tool_specs, legacy, forced = resolve_tools(tools, tool_choice, functions, function_call)
    uses_tools = bool(tool_specs)
    system, start = _system_of(messages)
    history, query = split_conversation(fold_messages(messages, start, uses_tools))
    is_continuation = query is None
    if uses_tools:
        instruction = react_instruction(tool_specs)
        if is_continuation:
            q, a = history[-1]
            history[-1] = (f"{instruction}\n\nQuestion: {q}", a)
        else:
            query = f"{instruction}\n\nQuestion: {query}"
    if is_continuation:
        (q, a), history = history[-1], history[:-1]
        text, ids = make_context(tokenizer, q, history, system=system, max_window_size=max_window_size)
        text, ids = text + a, ids + tokenizer.encode(a, allowed_special=set())
    else:
        text, ids = make_context(tokenizer, query, history, system=system, max_window_size=max_window_size)
    return ChatPrompt(
        token_ids=ids,
        stop=[OBSERVATION_STOP] if uses_tools else [],
        stop_token_ids=[[tokenizer.im_end_id], [tokenizer.im_start_id]],
        uses_tools=uses_tools,
        legacy_functions=legacy,
        is_continuation=is_continuation,
        text=text,
        tools=tool_specs,
        forced_tools=forced,
    )
