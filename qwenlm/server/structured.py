"""Structured output: `response_format` and forced tool calls become a grammar the engine decodes under.

- `response_format` json_object / json_schema: the reply is JSON matching the schema (any object for
  json_object), enforced token by token (`generation.constrained`, on llguidance), so it always parses
  and validates unless max_tokens cuts it off (then finish_reason is "length").
- `tool_choice` naming a function, or "required": Qwen calls tools in ReAct text, so the grammar is
  that text: `Thought: ...` then `Action: <name>` and `Action Input: <arguments matching the tool's
  JSON schema>`. With tools in "auto" mode and a JSON response format, the reply is either such a call
  or `Final Answer: <JSON>`.

The grammar text is built here (pure functions); `StructuredOutput` compiles it against the tokenizer
(the vocabulary index is built once, on the first structured request, off the event loop).

    grammar = reply_grammar(prompt, response_format)      # None: nothing to enforce
    constraints = await structured.constraints(grammar, n=2)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from ..generation.constrained import (
    GrammarCompiler,
    GrammarConstraint,
    GrammarError,
    GrammarUnavailable,
    guided_grammar,
    json_schema_grammar,
    json_value_rule,
    lark_string,
)
from .prompting import ChatPrompt
from .protocol import ALWAYS_STOP_WORDS_IDS, EOS_TOKEN_ID, APIError, ResponseFormat, _SamplingRequest
from .tool_calls import ACTION, ACTION_INPUT, FINAL_ANSWER, THOUGHT

MAX_THOUGHT_CHARS = 256  # a forced call still lets the model think first, within bounds (Qwen's are one line)


def arguments_schema(parameters: Any) -> dict[str, Any]:
    """A tool's `parameters` as the JSON schema of its arguments object.

    OpenAI tools give a JSON schema ({} or missing = any object); Qwen plugins give a list of
    `{name, description, required, schema}`, turned into the equivalent object schema.
    """
    if isinstance(parameters, list):
        named = [p for p in parameters if isinstance(p, Mapping) and isinstance(p.get("name"), str)]
        properties = {p["name"]: dict(p.get("schema") or {}) for p in named}
        for p in named:
            if isinstance(p.get("description"), str):
                properties[p["name"]]["description"] = p["description"]
        required = [p["name"] for p in named if p.get("required")]
        return {"type": "object", "properties": properties, "required": required}
    if not isinstance(parameters, Mapping) or not parameters:
        return {"type": "object"}
    return {"type": "object", **parameters}


def react_grammar(
    tools: Sequence[Mapping[str, Any]],
    answer_schema: Mapping[str, Any] | None,
    *,
    strict: bool = False,
    after_thought_marker: bool = False,
) -> str:
    """The Lark grammar of one ReAct reply: a bounded thought, then a call to one of `tools` with
    arguments matching its schema, or (when `answer_schema` is given) a final answer matching it.

    Args:
        tools: normalized tool specs (`name`, `parameters`); may be empty when an answer is allowed.
        answer_schema: the JSON schema of a final answer; None = the reply must be a call.
        strict: refuse answer-schema keywords that cannot be enforced (tool schemas are always lenient:
            function definitions often carry keywords only meant for humans).
        after_thought_marker: the prompt already ends with "Thought:" (the model continues after an
            observation), so the reply starts with the thought's text.
    """
    head = '" "' if after_thought_marker else lark_string(THOUGHT + " ")
    branches = []
    if tools:
        branches.append("call")
    if answer_schema is not None:
        branches.append("answer")
    if not branches:
        raise ValueError("a ReAct grammar needs tools to call or an answer schema")
    lines = [
        f'start: {head} THOUGHT "\\n" ({" | ".join(branches)})',
        f"THOUGHT: /[^\\n]{{0,{MAX_THOUGHT_CHARS}}}/",
    ]
    if tools:
        lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
        for i, tool in enumerate(tools):
            name = lark_string(f"{ACTION.lstrip()} {tool['name']}{ACTION_INPUT} ")
            arguments = json_value_rule(arguments_schema(tool.get("parameters")), lenient=True)
            lines.append(f"call_{i}: {name} {arguments}")
    if answer_schema is not None:
        answer = json_value_rule(answer_schema, lenient=not strict)
        lines.append(f"answer: {lark_string(FINAL_ANSWER.lstrip() + ' ')} {answer}")
    return "\n".join(lines)


def reply_grammar(prompt: ChatPrompt, response_format: ResponseFormat | None) -> str | None:
    """The grammar a chat reply must follow, or None when the model is free."""
    schema = response_format.schema_of_reply() if response_format is not None else None
    # strict (OpenAI's "strict": true) refuses schema keywords that cannot be enforced; otherwise they are ignored
    strict = bool(response_format and response_format.json_schema and response_format.json_schema.strict)
    if not prompt.uses_tools:
        return json_schema_grammar(schema, lenient=not strict) if schema is not None else None
    if not prompt.forced_tools and schema is None:
        return None
    forced = bool(prompt.forced_tools)
    return react_grammar(
        prompt.forced_tools if forced else prompt.tools,
        None if forced else schema,
        strict=strict,
        after_thought_marker=prompt.text.endswith(THOUGHT),
    )


def reply_end_token_ids() -> list[int]:
    """The tokens that always end a reply (what a completed grammar leaves the model to say)."""
    return [EOS_TOKEN_ID, *(ids[0] for ids in ALWAYS_STOP_WORDS_IDS)]


def request_guided_grammar(request: _SamplingRequest) -> tuple[str, str] | None:
    """(grammar, request field) of a request's vLLM guided decoding (`structured_outputs` or `guided_*`),
    or None when it asks for none.

    Raises:
        APIError: (400) several constraints at once, or one that is not a valid constraint.
    """
    guided = request.guided()
    if guided is None:
        return None
    name, kind, value = guided
    try:
        return guided_grammar(kind, value), name
    except GrammarError as err:
        raise APIError(f"Invalid request: {name}: {err}.", param=name) from None
    except GrammarUnavailable as err:
        raise APIError(f"Structured output is not available on this server: {err}.", param=name,
                       code="unsupported_parameter") from None  # fmt: skip


class StructuredOutput:
    """Compiles the grammars of one server's requests against its tokenizer.

    Args:
        tokenizer: the engine's tokenizer.
        end_token_ids: the tokens that end a reply; once the grammar is complete only these are allowed
            (default: `reply_end_token_ids()`).
    """

    def __init__(self, tokenizer: Any, end_token_ids: Sequence[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.end_token_ids = list(end_token_ids if end_token_ids is not None else reply_end_token_ids())
        self._compiler: GrammarCompiler | None = None
        self._lock = asyncio.Lock()

    async def compiler(self) -> GrammarCompiler:
        """The compiler, built on first use in a worker thread (indexing the vocabulary takes ~1 s)."""
        async with self._lock:
            if self._compiler is None:
                try:
                    self._compiler = await asyncio.to_thread(GrammarCompiler, self.tokenizer, self.end_token_ids)
                except GrammarUnavailable as err:
                    raise APIError(
                        f"Structured output is not available on this server: {err}.",
                        param="response_format",
                        code="unsupported_parameter",
                    ) from None
        return self._compiler

    async def constraints(self, grammar: str | None, n: int, param: str = "response_format") -> list:
        """One fresh constraint per choice (each keeps its own state), or `[None] * n` without a grammar.

        Raises:
            APIError: (400) the schema cannot be compiled (the message says why), or llguidance is missing.
        """
        if grammar is None:
            return [None] * n
        compiler = await self.compiler()
        try:
            first: GrammarConstraint = await asyncio.to_thread(compiler.compile, grammar)
        except GrammarError as err:
            what = "the JSON schema" if param in ("response_format", "tool_choice") else param
            raise APIError(f"Invalid request: {what} cannot be enforced: {err}.", param=param) from None
        return [first] + [compiler.compile(grammar) for _ in range(n - 1)]
