"""ReAct tool calling text protocol: instruction text, parsing of model output, streaming parse."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenlm.server.tool_calls import (
    ContentDelta,
    ParsedResponse,
    ToolCall,
    ToolCallEvent,
    ToolCallStreamParser,
    new_tool_call_id,
    normalize_tools,
    parse_tool_response,
    react_instruction,
    repair_arguments,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QWEN_PLUGIN = {
    "name_for_human": "谷歌搜索",
    "name_for_model": "google_search",
    "description_for_model": "谷歌搜索是一个通用搜索引擎。",
    "parameters": [
        {"name": "search_query", "description": "搜索关键词", "required": True, "schema": {"type": "string"}}
    ],
}


def counting_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


# --------------------------------------------------------------------------------------------------
# Schemas and instruction


def test_react_instruction_exact_text():
    expected = (
        "Answer the following questions as best you can. You have access to the following APIs:\n\n"
        "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
        'Get the current weather. Parameters: {"type": "object", "properties": {"city": {"type": "string"}}, '
        '"required": ["city"]}\n\n'
        "google_search: Call this tool to interact with the 谷歌搜索 API. What is the 谷歌搜索 API useful for? "
        '谷歌搜索是一个通用搜索引擎。 Parameters: [{"name": "search_query", "description": "搜索关键词", '
        '"required": true, "schema": {"type": "string"}}]\n\n'
        "Use the following format:\n\n"
        "Question: the input question you must answer\n"
        "Thought: you should always think about what to do\n"
        "Action: the action to take, should be one of [get_weather, google_search]\n"
        "Action Input: the input to the action\n"
        "Observation: the result of the action\n"
        "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
        "Thought: I now know the final answer\n"
        "Final Answer: the final answer to the original input question\n\n"
        "Begin!"
    )
    functions = normalize_tools([WEATHER_TOOL], [QWEN_PLUGIN])
    assert react_instruction(functions) == expected
    assert react_instruction([WEATHER_TOOL["function"], QWEN_PLUGIN]) == expected  # raw objects too


def test_normalize_tools_uniform_and_idempotent():
    got = normalize_tools([WEATHER_TOOL], [{"name": "now", "description": "Time."}, QWEN_PLUGIN])
    assert got[0] == {
        "name": "get_weather",
        "name_for_human": "get_weather",
        "description": "Get the current weather.",
        "parameters": WEATHER_TOOL["function"]["parameters"],
    }
    assert got[1] == {"name": "now", "name_for_human": "now", "description": "Time.", "parameters": {}}
    assert got[2]["name"] == "google_search" and got[2]["name_for_human"] == "谷歌搜索"
    assert normalize_tools(None, got) == got
    assert normalize_tools(None, None) == []


@pytest.mark.parametrize(
    ("tools", "functions", "message"),
    [
        ([{"type": "function", "function": {"description": "x"}}], None, r"tools\[0\]\.function has no name"),
        (None, [{"name": "", "parameters": {}}], r"functions\[0\] has no name"),
        ([{"type": "retrieval"}], None, r"tools\[0\] must be"),
        (["get_weather"], None, r"tools\[0\] must be an object"),
        ({"type": "function"}, None, "tools must be a list"),
        ([WEATHER_TOOL, WEATHER_TOOL], None, "duplicate tool name"),
    ],
)
def test_normalize_tools_rejects(tools, functions, message):
    with pytest.raises(ValueError, match=message):
        normalize_tools(tools, functions)


# --------------------------------------------------------------------------------------------------
# parse_tool_response


def test_parse_action_with_trimmed_observation():
    text = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}'
    parsed = parse_tool_response(text, counting_ids())
    assert parsed == ParsedResponse(
        content="I need the weather.",
        tool_calls=[ToolCall("call_0", "get_weather", '{"city": "Paris"}')],
        finish_reason_hint="tool_calls",
    )


def test_parse_action_stops_at_observation():
    text = 'Thought: x\nAction:  get_weather \nAction Input: {"city": "Rome"}\nObservation: sunny\nThought: done'
    parsed = parse_tool_response(text, counting_ids())
    assert parsed.tool_calls == [ToolCall("call_0", "get_weather", '{"city": "Rome"}')]
    assert parsed.content == "x"


def test_parse_action_at_start_of_text_has_no_content():
    parsed = parse_tool_response("Action: now\nAction Input: {}\n", counting_ids())
    assert parsed.tool_calls == [ToolCall("call_0", "now", "{}")]
    assert parsed.content is None and parsed.finish_reason_hint == "tool_calls"


def test_parse_thought_without_prefix_and_continuation_after_observation():
    # After an observation the prompt already ends with "Thought:", so the model starts mid-thought.
    parsed = parse_tool_response(' I still need Rome.\nAction: get_weather\nAction Input: {"city": "Rome"}')
    assert parsed.content == "I still need Rome."
    assert re.fullmatch(r"call_[0-9a-f]{24}", parsed.tool_calls[0].id)


def test_parse_final_answer():
    text = "Thought: I now know the final answer.\nFinal Answer: It is sunny in Paris.\n"
    assert parse_tool_response(text) == ParsedResponse("It is sunny in Paris.", [], "stop")
    assert parse_tool_response(" I now know the final answer\nFinal Answer: 42").content == "42"
    assert parse_tool_response("Final Answer: at the start").content == "at the start"


def test_parse_final_answer_last_occurrence():
    assert parse_tool_response("Final Answer: first\nFinal Answer: second").content == "second"


def test_parse_plain_text_is_content():
    assert parse_tool_response("  Hello! How can I help?  ") == ParsedResponse("Hello! How can I help?", [], "stop")
    assert parse_tool_response("") == ParsedResponse("", [], "stop")


@pytest.mark.parametrize(
    "text",
    [
        "Thought: try\nAction: get_weather\nAction Input: Paris, please",
        "Thought: try\nAction: get_weather\nAction Input: [1, 2]",
        'Thought: try\nAction: get_weather\nAction Input: {"city": "Paris"',
        "Thought: try\nAction: \nAction Input: {}",
        "Thought: try\nAction: get_weather",
        "Thought: try\nAction Input: {}\nAction: get_weather",
    ],
)
def test_parse_malformed_action_falls_back_to_content(text):
    parsed = parse_tool_response(text)
    assert parsed == ParsedResponse(text.strip(), [], "stop")


def test_parse_malformed_action_with_final_answer_keeps_answer():
    text = "Thought: t\nAction: f\nAction Input: nope\nFinal Answer: fine"
    assert parse_tool_response(text) == ParsedResponse("fine", [], "stop")


@pytest.mark.parametrize(
    ("raw", "repaired"),
    [
        ('{"a": 1}', '{"a": 1}'),
        ('  {"a": [1, {"b": null}]}  ', '{"a": [1, {"b": null}]}'),
        ('```json\n{"a": 1}\n```', '{"a": 1}'),
        ('```\n{"a": 1}\n```', '{"a": 1}'),
        ('{"a": 1} and then some words', '{"a": 1}'),
        ('{"a": "}"}}', '{"a": "}"}'),
        ("", "{}"),
        ("print(1)", None),
        ('"Paris"', None),
        ("{'a': 1}", None),
        ("```python\nprint(1)\n```", None),
    ],
)
def test_repair_arguments(raw, repaired):
    assert repair_arguments(raw) == repaired


def test_parse_uses_repaired_arguments():
    parsed = parse_tool_response('Action: f\nAction Input: ```json\n{"q": "x"}\n```', counting_ids())
    assert parsed.tool_calls == [ToolCall("call_0", "f", '{"q": "x"}')]


def test_new_tool_call_id_format_and_uniqueness():
    ids = {new_tool_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


# --------------------------------------------------------------------------------------------------
# Streaming


REALISTIC_OUTPUTS = [
    'Thought: I need the weather in Paris.\nAction: get_weather\nAction Input: {"city": "Paris"}',
    'Thought: 我需要搜索。\nAction: google_search\nAction Input: {"search_query": "通义千问"}\nObservation:',
    "Thought: I now know the final answer.\nFinal Answer: It is 21 °C and sunny in Paris.\n\nEnjoy!  \n",
    " I now know the final answer\nFinal Answer:  Rome is rainy, Paris is sunny. ",
    ' I still need Rome.\nAction: get_weather\nAction Input: ```json\n{"city": "Rome"}\n```',
    "Hello! I'm Qwen. How can I help you today?",
    "Thought: try\nAction: get_weather\nAction Input: Paris please",
    "Action: now\nAction Input: {}",
    "Final Answer: 你好！\n有什么可以帮你的吗？",
    "Thought: no tool fits\nAction: none\nFinal Answer: I cannot do that.",
    "",
    "   ",
]


def stream(text: str, cuts: list[int]) -> list[ContentDelta | ToolCallEvent]:
    parser = ToolCallStreamParser(counting_ids())
    bounds = [0, *sorted(cuts), len(text)]
    events = []
    for a, b in itertools.pairwise(bounds):
        events += parser.feed(text[a:b])
    return events + parser.finish()


def joined(events) -> tuple[str, list[ToolCall]]:
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return text, [e.tool_call for e in events if isinstance(e, ToolCallEvent)]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_stream_parser_equals_parse_for_any_chunking(data):
    text = data.draw(st.sampled_from(REALISTIC_OUTPUTS))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    parsed = parse_tool_response(text, counting_ids())
    assert joined(stream(text, cuts)) == (parsed.content or "", parsed.tool_calls)


def test_stream_parser_streams_final_answer_before_finish():
    parser = ToolCallStreamParser()
    assert parser.feed("Thought: I now know") == []  # held: could still become a tool call
    assert parser.feed(" the final answer.\nFinal Answer: Par") == [ContentDelta("Par")]
    assert parser.feed("is is ") == [ContentDelta("is is")]  # trailing space held back
    assert parser.feed("sunny.") == [ContentDelta(" sunny.")]
    assert parser.feed("\n") == []
    assert parser.finish() == []


def test_stream_parser_buffers_action_until_finish():
    parser = ToolCallStreamParser(counting_ids())
    assert parser.feed("Thought: look\nAction: get_weather\nAction Input: {") == []
    assert parser.feed('"city": "Paris"}') == []
    assert parser.finish() == [
        ContentDelta("look"),
        ToolCallEvent(ToolCall("call_0", "get_weather", '{"city": "Paris"}')),
    ]


def test_stream_parser_plain_text_released_at_finish():
    parser = ToolCallStreamParser()
    assert parser.feed("Hello ") == [] and parser.feed("there") == []
    assert parser.finish() == [ContentDelta("Hello there")]
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_stream_parser_commits_to_first_final_answer():
    # Documented divergence: text already streamed cannot be taken back.
    text = "Final Answer: a\nFinal Answer: b"
    assert joined(stream(text, [])) == ("a\nFinal Answer: b", [])
    assert parse_tool_response(text).content == "b"


@pytest.mark.parametrize(
    "text",
    [
        "Thought: I need the weather.\nAction: get_weather\nAction Input:",  # cut right after the marker
        'Thought: look\nAction: get_weather\nAction Input: {"city": "Paris"}',  # looks complete, was not ended
        'Thought: look\nAction: get_weather\nAction Input: {"city": "Par',
    ],
)
def test_a_truncated_generation_is_never_a_call_streaming_or_not(text):
    parsed = parse_tool_response(text, counting_ids(), truncated=True)
    assert parsed.tool_calls == [] and parsed.content == text and parsed.finish_reason_hint == "stop"
    for cuts in ([], [5, 30], list(range(0, len(text), 3))):
        parser = ToolCallStreamParser(counting_ids())
        bounds = [0, *cuts, len(text)]
        events = [e for a, b in itertools.pairwise(bounds) for e in parser.feed(text[a:b])]
        assert joined(events + parser.finish(truncated=True)) == (text, [])


def test_a_truncated_final_answer_is_still_the_answer():
    text = "Thought: I now know the final answer.\nFinal Answer: It is sun"
    assert parse_tool_response(text, truncated=True).content == "It is sun"
