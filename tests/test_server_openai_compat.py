"""OpenAI compatibility items over the scripted FakeEngine (real tokenizer, in-process): logit_bias, the
developer role, structured output and forced tool calls reaching the engine as grammars, truncated tool
calls, echo-only scoring, the remote-tokenizer routes, 4xx log lines, and the Responses API."""

from __future__ import annotations

import json
import sys

import jinja2
import pytest
from fake_engine import FakeEngine
from test_server_http import MODEL, REPLY, USER, WEATHER_TOOL, assert_openai_error, chat, make_client, sse_events

from qwenlm.generation.constrained import GrammarConstraint
from qwenlm.server.prompting import build_chat_prompt
from qwenlm.server.responses_protocol import ResponsesRequest
from qwenlm.server.serving_responses import to_chat_messages, to_chat_request
from qwenlm.server.serving_tokens import CHATML_TEMPLATE

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def shared_app():
    return make_client()  # one app for the module: its grammar compiler is built once


@pytest.fixture
def app(shared_app):
    """(TestClient, FakeEngine) with the engine's script reset."""
    shared_app[1].reply, shared_app[1].busy = REPLY, False
    return shared_app


# ---- sampling and messages ------------------------------------------------------------------------


def test_logit_bias_reaches_the_sampler_and_bad_values_are_400(app):
    client, engine = app
    assert chat(client, logit_bias={"42": -100, "7": 5.5}).status_code == 200
    assert engine.last_params.logit_bias == ((7, 5.5), (42, -100.0))
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logit_bias": {"13": 100}}).json()
    assert body["choices"] and engine.last_params.logit_bias == ((13, 100.0),)
    for bias, fragment in [({"1": 101}, "between -100 and 100"), ({"abc": 1}, "token ids"),
                           ({"151851": 1}, "token ids go from 0 to 151850")]:  # fmt: skip
        error = assert_openai_error(chat(client, logit_bias=bias), 400, param="logit_bias")
        assert fragment in error["message"]


def test_the_developer_role_is_the_system_message(app):
    client, engine = app
    assert chat(client, messages=[{"role": "developer", "content": "Answer in French."}, *USER]).status_code == 200
    assert engine.last_prompt.startswith("<|im_start|>system\nAnswer in French.<|im_end|>")
    error = assert_openai_error(chat(client, messages=[*USER, {"role": "developer", "content": "late"}]), 400)
    assert "Incorrect role developer" in error["message"]


# ---- structured output ----------------------------------------------------------------------------


def test_response_formats_reach_the_engine_as_one_grammar_per_choice(app):
    client, engine = app
    assert chat(client, response_format=JSON_SCHEMA_FORMAT, n=2).status_code == 200
    first, second = engine.requests[-2:]
    assert isinstance(first.constraint, GrammarConstraint) and first.constraint is not second.constraint
    assert chat(client, response_format={"type": "json_object"}).status_code == 200
    assert isinstance(engine.last.constraint, GrammarConstraint)
    chat(client, response_format={"type": "text"})
    assert engine.last.constraint is None


def test_vllm_extensions_at_their_off_values_are_accepted_and_guided_decoding_is_a_grammar(app):
    client, engine = app
    off = {"min_tokens": 0, "skip_special_tokens": True, "bad_words": [], "include_stop_str_in_output": False,
           "modalities": ["text"], "chat_template_kwargs": {"enable_thinking": False}, "priority": 0}  # fmt: skip
    assert chat(client, **off).status_code == 200 and engine.last.constraint is None
    assert chat(client, min_p=0.1).status_code == 200 and engine.last_params.min_p == 0.1
    assert engine.last_params.do_sample  # min_p alone asks for sampling, as temperature or top_p would
    assert_openai_error(chat(client, min_p=1.5), 400, param="min_p")
    body = {"model": MODEL, "prompt": "x", "n": 2, "guided_choice": ["yes", "no"]}
    assert client.post("/v1/completions", json=body).status_code == 200
    first, second = engine.requests[-2:]
    assert isinstance(first.constraint, GrammarConstraint) and first.constraint is not second.constraint
    error = assert_openai_error(chat(client, guided_json={"type": "object"}, response_format={"type": "json_object"}),
                                400, param="guided_json")  # fmt: skip
    assert "cannot be combined" in error["message"]
    error = assert_openai_error(chat(client, guided_grammar="start: ("), 400, param="guided_grammar")
    assert "guided_grammar cannot be enforced" in error["message"]


@pytest.mark.parametrize(
    "response_format, fragment",
    [
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type: strin"),
        ({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
          "schema": {"type": "object", "dependentSchemas": {}}}}, "dependentSchemas"),
        ({"type": "xml"}, "response_format.type"),
    ],
)  # fmt: skip
def test_schemas_that_cannot_be_enforced_are_400(app, response_format, fragment):
    client, _ = app
    error = assert_openai_error(chat(client, response_format=response_format), 400)
    assert fragment in error["message"] and error["param"].startswith("response_format")


def test_a_named_tool_choice_forces_a_call_through_a_grammar(app):
    client, engine = app
    choice = {"type": "function", "function": {"name": "get_weather"}}
    engine.reply = 'Thought: look it up\nAction: get_weather\nAction Input: {"city": "Paris"}'
    body = chat(client, tools=[WEATHER_TOOL], tool_choice=choice).json()
    assert isinstance(engine.last.constraint, GrammarConstraint) and "get_weather" in engine.last_prompt
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert body["choices"][0]["finish_reason"] == "tool_calls" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"
    }  # fmt: skip
    chat(client, tools=[WEATHER_TOOL], tool_choice="auto")
    assert engine.last.constraint is None  # "auto": the model decides


@pytest.mark.parametrize("cut", ["Action Input:", 'Action Input: {"city": "Paris"}'])
def test_a_tool_call_cut_off_by_max_tokens_ends_with_length_streaming_or_not(app, cut):
    client, engine = app
    engine.reply = f"Thought: I need the weather.\nAction: get_weather\n{cut}\nObservation: 22C"
    max_tokens = len(engine.tokenizer.encode(engine.reply[: engine.reply.index(cut) + len(cut)]))
    body = chat(client, tools=[WEATHER_TOOL], max_tokens=max_tokens).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].endswith(cut) and "Action: get_weather" in choice["message"]["content"]
    events = sse_events(chat(client, tools=[WEATHER_TOOL], max_tokens=max_tokens, stream=True).text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert not any("tool_calls" in d for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == choice["message"]["content"]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "length"
    # Not cut off: the same text is a call.
    engine.reply = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}'
    assert chat(client, tools=[WEATHER_TOOL]).json()["choices"][0]["finish_reason"] == "tool_calls"


# ---- completions: echo-only scoring ---------------------------------------------------------------


def test_max_tokens_zero_with_echo_scores_the_prompt_only(app):
    client, engine = app
    ids, other = engine.tokenizer.encode("The quick brown fox"), engine.tokenizer.encode("Hello")
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": [ids, other], "echo": True,
                                                "logprobs": 1, "max_tokens": 0}).json()  # fmt: skip
    assert [r.prompt_logprobs for r in engine.requests[-2:]] == [1, 1]
    assert [r.params.max_new_tokens for r in engine.requests[-2:]] == [1, 1]  # sampled from the prefill, dropped
    for choice, prompt in zip(body["choices"], [ids, other], strict=True):
        lp = choice["logprobs"]
        assert choice["text"] == engine.tokenizer.decode(prompt) and choice["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt)
        assert lp["token_logprobs"][0] is None and all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert body["usage"] == {"prompt_tokens": len(ids) + len(other), "completion_tokens": 0,
                             "total_tokens": len(ids) + len(other),
                             "prompt_tokens_details": body["usage"]["prompt_tokens_details"]}  # fmt: skip
    events = sse_events(
        client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0, "stream": True},
        ).text
    )
    (only,) = [e for e in events[:-1]]
    assert only["choices"][0]["text"] == engine.tokenizer.decode(ids)
    assert only["choices"][0]["logprobs"]["token_logprobs"] == body["choices"][0]["logprobs"]["token_logprobs"]
    error = assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0}),
                                400)  # fmt: skip
    assert "echo" in error["message"]
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 1})
    assert engine.last.prompt_logprobs is None  # no echo: the prompt is not scored


# ---- tokenizer routes -----------------------------------------------------------------------------


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(app):
    client, engine = app
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] is None
    assert client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()[
        "tokens"] == [151643]  # fmt: skip
    assert info["model_max_length"] == engine.max_model_len and info["vocab_size"] == len(engine.tokenizer)
    template = jinja2.Environment().from_string(info["chat_template"])
    for messages in (USER, [{"role": "system", "content": "Be brief."}, *USER, {"role": "assistant", "content": "Hi"},
                            {"role": "user", "content": "And?"}]):  # fmt: skip
        rendered = template.render(messages=messages, add_generation_prompt=True)
        assert rendered == build_chat_prompt(engine.tokenizer, messages).text
    assert CHATML_TEMPLATE == info["chat_template"]


def test_error_log_lines_carry_the_message(app, caplog):
    client, _ = app
    with caplog.at_level("INFO", logger="qwenlm.server"):
        chat(client, temperature=9)
        client.get("/v1/nope")
        chat(client)
    lines = [r.getMessage() for r in caplog.records if r.name == "qwenlm.server"]
    assert lines[0].startswith("POST /v1/chat/completions 400 ") and 'error="Invalid request: temperature' in lines[0]
    assert lines[1].startswith("GET /v1/nope 404 ") and 'error="Not Found"' in lines[1]
    assert "error=" not in lines[2]


# ---- Responses API --------------------------------------------------------------------------------


def test_responses_input_becomes_chat_messages():
    request = ResponsesRequest.model_validate({
        "model": "m", "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Use metric units."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather"}, {"type": "text", "text": "?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "22C"},
            {"type": "function_call_output", "call_id": "c2", "output": "25C"},
        ],
    })  # fmt: skip
    messages = to_chat_messages(request)
    assert messages[0] == {"role": "system", "content": "Be brief.\n\nUse metric units."}
    assert messages[1] == {"role": "user", "content": "Weather\n?"}
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"] and messages[2]["content"] is None
    assert messages[3:] == [{"role": "tool", "tool_call_id": "c1", "content": "22C"},
                            {"role": "tool", "tool_call_id": "c2", "content": "25C"}]  # fmt: skip
    chat_request = to_chat_request(ResponsesRequest.model_validate({
        "model": "m", "input": "Hi", "max_output_tokens": 5, "tool_choice": {"type": "function", "name": "f"},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "text": {"format": {"type": "json_schema", "name": "A", "schema": SCHEMA, "strict": True}},
    }))  # fmt: skip
    assert chat_request.max_tokens == 5 and chat_request.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert chat_request.tools[0].function.name == "f" and chat_request.response_format.schema_of_reply() == SCHEMA


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "does not store responses"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "stores nothing"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]",
         "only text parts"),
        ({"background": True}, "background", "not supported"),
    ],
)  # fmt: skip
def test_responses_requests_we_cannot_serve_are_400_with_the_reason(app, body, param, fragment):
    client, _ = app
    error = assert_openai_error(client.post("/v1/responses", json={"model": MODEL, "input": "Hi", **body}), 400)
    assert error["param"] == param and fragment in error["message"]


def test_responses_non_stream_and_stream_agree(app):
    client, engine = app
    engine.reply = 'Thought: need it\nAction: get_weather\nAction Input: {"city": "Paris"}'
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    body = client.post("/v1/responses", json={"model": "any", "input": "Weather?", "tools": [tool]}).json()
    assert body["object"] == "response" and body["status"] == "completed" and body["model"] == MODEL
    assert body["store"] is False and body["usage"]["input_tokens"] == len(engine.last.prompt_ids)
    message, call = body["output"]
    assert message["content"][0] == {"type": "output_text", "text": "need it", "annotations": [], "logprobs": []}
    assert (call["type"], call["name"], call["arguments"]) == ("function_call", "get_weather", '{"city": "Paris"}')
    events = sse_events_typed(client.post("/v1/responses", json={"model": "any", "input": "Weather?",
                                                                 "tools": [tool], "stream": True}).text)  # fmt: skip
    types = [t for t, _ in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert "response.function_call_arguments.done" in types and "response.output_text.done" in types
    final = events[-1][1]["response"]
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["arguments"] == call["arguments"]
    # Cut off by max_output_tokens: incomplete, with the reason.
    engine.reply = REPLY
    body = client.post("/v1/responses", json={"model": "any", "input": "Hi", "max_output_tokens": 2}).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    events = sse_events_typed(
        client.post("/v1/responses", json={"model": "any", "input": "Hi", "max_output_tokens": 2, "stream": True}).text
    )
    assert events[-1][0] == "response.incomplete"
    assert "".join(d["delta"] for t, d in events if t == "response.output_text.delta") == body["output"][0][
        "content"][0]["text"]  # fmt: skip


def sse_events_typed(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each Responses SSE event; the name must match the data's type."""
    out = []
    for block in text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        name, data = name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    return out


def test_a_busy_engine_is_503_for_responses_too():
    client, engine = make_client(FakeEngine(reply=REPLY))
    engine.busy = True
    assert_openai_error(client.post("/v1/responses", json={"model": MODEL, "input": "Hi"}), 503)


def test_without_llguidance_structured_output_is_a_clear_400(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    client, _ = make_client(FakeEngine(reply=REPLY))
    error = assert_openai_error(chat(client, response_format={"type": "json_object"}), 400, param="response_format")
    assert "pip install llguidance" in error["message"]
    assert chat(client).status_code == 200  # everything else is served
