"""server.structured: which grammar a chat reply must follow, and the ReAct grammar of a forced tool call,
decoded from arbitrary logits on the real vocabulary and read back by the same parser the server uses."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from qwenlm.generation.constrained import GrammarCompiler
from qwenlm.server.prompting import build_chat_prompt
from qwenlm.server.protocol import ResponseFormat
from qwenlm.server.structured import (
    MAX_THOUGHT_CHARS,
    arguments_schema,
    react_grammar,
    reply_end_token_ids,
    reply_grammar,
)
from qwenlm.server.tool_calls import parse_tool_response

VOCAB = 151851
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
           "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "parameters": {"properties": {"q": {"type": "string",
     "maxLength": 8}}, "required": ["q"], "additionalProperties": False}}},
]  # fmt: skip
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def compiler(qwen_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(qwen_tokenizer, reply_end_token_ids())


def _decode(compiler, tokenizer, grammar: str, seed: int) -> str:
    constraint, generator, out = compiler.compile(grammar), torch.Generator().manual_seed(seed), []
    for _ in range(400):
        token = int(constraint.mask_logits(torch.randn(1, VOCAB, generator=generator)).argmax())
        if token in reply_end_token_ids():
            return tokenizer.decode(out)
        constraint.advance(token)
        out.append(token)
    raise AssertionError("the grammar did not finish")


def test_arguments_schema_of_openai_and_qwen_style_parameters():
    assert arguments_schema(WEATHER) == WEATHER
    assert arguments_schema(None) == arguments_schema({}) == {"type": "object"}
    assert arguments_schema({"properties": {"q": {"type": "string"}}}) == {
        "type": "object", "properties": {"q": {"type": "string"}}
    }  # fmt: skip
    qwen_style = [{"name": "query", "description": "what to look up", "required": True, "schema": {"type": "string"}},
                  {"name": "page", "required": False, "schema": {"type": "integer"}}]  # fmt: skip
    assert arguments_schema(qwen_style) == {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "what to look up"}, "page": {"type": "integer"}},
        "required": ["query"],
    }


def test_which_replies_get_a_grammar(qwen_tokenizer):
    plain = build_chat_prompt(qwen_tokenizer, USER)
    with_tools = build_chat_prompt(qwen_tokenizer, USER, tools=TOOLS)
    forced = build_chat_prompt(qwen_tokenizer, USER, tools=TOOLS, tool_choice={"type": "function",
                               "function": {"name": "search"}})  # fmt: skip
    json_object = ResponseFormat(type="json_object")
    assert reply_grammar(plain, None) is None and reply_grammar(plain, ResponseFormat(type="text")) is None
    assert reply_grammar(with_tools, None) is None  # "auto": the model decides, as always
    assert reply_grammar(plain, json_object).startswith("start: %json")
    assert [t["name"] for t in forced.forced_tools] == ["search"] and len(forced.tools) == 2
    assert '"Action: search\\nAction Input: "' in reply_grammar(forced, None)
    assert "get_weather" not in reply_grammar(forced, None)
    assert "answer" in reply_grammar(with_tools, json_object)  # tools + JSON: a call or a JSON final answer
    required = build_chat_prompt(qwen_tokenizer, USER, tools=TOOLS, tool_choice="required")
    assert [t["name"] for t in required.forced_tools] == ["get_weather", "search"]
    assert build_chat_prompt(qwen_tokenizer, USER, tools=TOOLS, tool_choice="none").forced_tools == []


@pytest.mark.parametrize("seed", [0, 1])
def test_a_forced_call_always_parses_into_that_call_with_valid_arguments(compiler, qwen_tokenizer, seed):
    prompt = build_chat_prompt(qwen_tokenizer, USER, tools=TOOLS, tool_choice={"type": "function",
                               "function": {"name": "get_weather"}})  # fmt: skip
    text = _decode(compiler, qwen_tokenizer, reply_grammar(prompt, None), seed)
    assert text.startswith("Thought: ") and len(text.split("\n")[0]) <= len("Thought: ") + MAX_THOUGHT_CHARS
    (call,) = parse_tool_response(text).tool_calls
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_required_calls_one_of_the_tools_and_auto_with_json_answers_in_json(compiler, qwen_tokenizer):
    grammar = react_grammar([t["function"] for t in TOOLS], None)
    for seed in range(3):
        (call,) = parse_tool_response(_decode(compiler, qwen_tokenizer, grammar, seed)).tool_calls
        assert call.name in ("get_weather", "search")
        jsonschema.validate(json.loads(call.arguments), arguments_schema(TOOLS[call.name == "search"]["function"]
                                                                         ["parameters"]))  # fmt: skip
    answer_only = react_grammar([], WEATHER)
    parsed = parse_tool_response(_decode(compiler, qwen_tokenizer, answer_only, 0))
    assert not parsed.tool_calls
    jsonschema.validate(json.loads(parsed.content), WEATHER)


def test_after_an_observation_the_reply_continues_the_thought(qwen_tokenizer, compiler):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "22C"},
    ]  # fmt: skip
    prompt = build_chat_prompt(qwen_tokenizer, messages, tools=TOOLS, tool_choice="required")
    assert prompt.text.endswith("Observation: 22C\nThought:")
    text = _decode(compiler, qwen_tokenizer, reply_grammar(prompt, None), 3)
    assert text.startswith(" ") and not text.startswith(" Thought:")
    assert parse_tool_response(text).tool_calls
