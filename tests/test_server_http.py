"""The OpenAI-compatible HTTP layer over a scripted FakeEngine (real tokenizer, no model).

Part 1 drives the app in-process (FastAPI TestClient): error paths, parameter mapping, small routes.
Part 2 starts uvicorn on 127.0.0.1 and talks to it with the real `openai` client, as users do.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from fake_engine import FakeEngine  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from qwenlm.model.config import GenerationConfig  # noqa: E402
from qwenlm.server.app import create_app  # noqa: E402
from qwenlm.server.protocol import DEFAULT_MAX_TOKENS, ChatCompletionRequest  # noqa: E402
from qwenlm.server.serving_chat import ServingChat  # noqa: E402

MODEL = "qwen-fake"
USER = [{"role": "user", "content": "Hi!"}]
REPLY = "Hello! How can I help you today?"
TOOL_REPLY = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: 22C'
ANSWER_REPLY = "Thought: I now know the final answer.\nFinal Answer: It is sunny in Paris."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def make_client(engine: FakeEngine | None = None, **app_kwargs) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine(reply=REPLY)
    return TestClient(create_app(engine, **app_kwargs)), engine


def chat(client: TestClient, headers: dict | None = None, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body}, headers=headers)


def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as a string)."""
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_openai_error(response, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def assert_still_serving(client: TestClient, headers: dict | None = None) -> None:
    response = chat(client, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == REPLY


# --------------------------------------------------------------------------------------------------
# Part 1: in-process


@pytest.fixture(scope="module")
def client_and_engine():
    return make_client()


@pytest.fixture
def client(client_and_engine):
    client, engine = client_and_engine
    engine.reply, engine.busy = REPLY, False
    return client


@pytest.fixture
def engine(client_and_engine):
    return client_and_engine[1]


def test_chat_response_matches_openai_schema(client, engine):
    body = chat(client).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL and body["system_fingerprint"] is None
    (choice,) = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": REPLY, "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(engine.last.prompt_ids)
    assert usage["completion_tokens"] == len(engine.tokenizer.encode(REPLY)) + 1  # + <|im_end|>
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": engine.last.outputs[-1].cached_tokens}
    assert engine.last_prompt.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"model": "qwen-fake", "messages": [', None),  # malformed JSON
        ("not json at all", None),
        ('["a", "list"]', None),
    ],
)
def test_error_malformed_json_is_400(client, raw, param):
    response = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, param=param)
    assert_still_serving(client)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": USER, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": USER, "n": 0}, "n"),
        ({"model": MODEL, "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "stop": 5}, "stop"),
        ({"model": MODEL, "messages": USER, "stop": [""]}, "stop"),
        ({"model": MODEL, "messages": USER, "stream": "yes please"}, "stream"),
        ({"messages": USER}, "model"),
    ],
)
def test_error_wrong_field_types_are_400(client, body, param):
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert_still_serving(client)


def test_any_model_name_is_accepted_unless_strict(client):
    """The reference accepted any name ("Qwen", "gpt-3.5-turbo"); the listed id stays the served one."""
    body = client.post("/v1/chat/completions", json={"model": "Qwen", "messages": USER}).json()
    assert body["model"] == MODEL and body["choices"][0]["message"]["content"] == REPLY
    assert client.post("/v1/completions", json={"model": "gpt-3.5-turbo", "prompt": "x"}).status_code == 200
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]
    strict, _ = make_client(strict_model_name=True)
    response = strict.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    error = assert_openai_error(response, 404, code="model_not_found", param="model")
    assert "gpt-4o" in error["message"] and MODEL in error["message"]
    response = strict.post("/v1/completions", json={"model": "gpt-4o", "prompt": "x"})
    assert_openai_error(response, 404, code="model_not_found")
    assert_openai_error(strict.get("/v1/models/gpt-4o"), 404, code="model_not_found")
    assert_openai_error(strict.post("/v1/responses", json={"model": "gpt-4o", "input": "x"}), 404)
    assert_still_serving(strict)


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([{"role": "system", "content": "Be brief."}], "user message"),
        ([{"role": "assistant", "content": "hello"}], "user message"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text"),
        ([{"role": "user", "content": ""}], "non-empty content"),
        ([{"role": "user", "content": None}], "non-empty content"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], "needs content"),
        ([{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "x"}], "needs content"),
    ],
)
def test_error_bad_messages_are_400(client, messages, fragment):
    error = assert_openai_error(chat(client, messages=messages), 400)
    assert fragment in error["message"]
    assert_still_serving(client)


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_error_penalties_suggest_repetition_penalty(client, name):
    error = assert_openai_error(chat(client, **{name: 0.5}), 400, param=name, code="unsupported_parameter")
    assert "repetition_penalty" in error["message"]
    assert chat(client, **{name: 0}).status_code == 200  # 0 means "off": accepted
    assert_still_serving(client)


def test_error_prompt_too_long_states_the_limits():
    client, engine = make_client(FakeEngine(reply=REPLY, max_model_len=64))
    long_text = "word " * 100
    error = assert_openai_error(chat(client, messages=[{"role": "user", "content": long_text}]), 400)
    assert error["code"] == "context_length_exceeded" and "64" in error["message"]
    prompt_tokens = client.post("/tokenize", json={"messages": USER}).json()["count"]
    error = assert_openai_error(chat(client, max_tokens=60), 400, code="context_length_exceeded", param="max_tokens")
    assert "64" in error["message"] and str(prompt_tokens) in error["message"] and "60" in error["message"]
    error = assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": long_text}), 400)
    assert error["param"] == "prompt" and "64" in error["message"]
    assert not engine.requests  # nothing reached the engine
    # Without max_tokens the rest of the context is the budget.
    assert chat(client).status_code == 200
    assert engine.last_params.max_new_tokens == 64 - prompt_tokens


def test_error_auth_missing_or_wrong_is_401():
    client, _ = make_client(api_key="sk-secret")
    error = assert_openai_error(chat(client), 401, code="invalid_api_key")
    assert "Authorization" in error["message"]
    response = chat(client, headers={"Authorization": "Bearer sk-wrong"})
    assert_openai_error(response, 401, code="invalid_api_key")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_openai_error(client.get("/v1/models", headers={"Authorization": "Basic c2stc2VjcmV0"}), 401)
    assert client.get("/health").status_code == 200  # open
    assert_still_serving(client, headers={"Authorization": "Bearer sk-secret"})


@pytest.mark.parametrize("stream", [False, True])
def test_error_busy_engine_is_503_before_streaming(client, engine, stream):
    engine.busy = True
    response = chat(client, stream=stream)
    error = assert_openai_error(response, 503, code="server_busy")
    assert error["type"] == "server_error" and response.headers["Retry-After"] == "1"
    engine.busy = False
    assert_still_serving(client)


def test_stream_closed_before_its_first_byte_aborts_the_engine_requests():
    engine = FakeEngine(reply="tick " * 50)
    serving = ServingChat(engine, MODEL)

    async def open_and_drop() -> None:
        request = ChatCompletionRequest(model=MODEL, messages=USER, stream=True, n=2)
        stream = await serving.create(request)
        await stream.aclose()  # the client left before the response started
        await engine.wait_idle()

    asyncio.run(open_and_drop())
    assert len(engine.requests) == 2 and all(r.finish_reason == "abort" for r in engine.requests)
    assert all(len(r.outputs) < 50 for r in engine.requests)


def test_error_unknown_route_and_method_use_openai_shape(client):
    assert_openai_error(client.get("/v1/nope"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)
    assert_still_serving(client)


def test_chat_stream_chunks_and_usage(client, engine):
    events = sse_events(chat(client, stream=True, stream_options={"include_usage": True}).text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == REPLY
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(engine.last.outputs)
    # Without include_usage there is no usage key at all.
    events = sse_events(chat(client, stream=True).text)
    assert all("usage" not in c for c in events[:-1])


def test_stop_strings_add_to_qwen_stop_words_and_never_leak(client, engine):
    engine.reply = "The answer is 42. END of story."
    body = chat(client, stop=["42. EN", "zzz"]).json()
    assert body["choices"][0]["message"]["content"] == "The answer is "
    assert body["choices"][0]["finish_reason"] == "stop"
    params = engine.last_params
    assert set(params.stop) == {"42. EN", "zzz"}
    assert 151643 in params.eos_token_ids and {(151645,), (151644,)} <= set(params.stop_words_ids)
    events = sse_events(chat(client, stop="42. EN", stream=True).text)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"]]
    assert "".join(pieces) == "The answer is "
    assert not any("4" in p for p in pieces)


def test_max_tokens_gives_finish_reason_length(client, engine):
    body = chat(client, max_tokens=3).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == engine.tokenizer.decode(engine.tokenizer.encode(REPLY)[:3])
    assert chat(client, max_completion_tokens=2, max_tokens=5).json()["usage"]["completion_tokens"] == 2


def test_sampling_defaults_are_openai_without_generation_config(client, engine):
    chat(client)
    p = engine.last_params
    assert (p.do_sample, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (True, 1.0, 1.0, 0, 1.0)
    assert p.max_new_tokens == min(DEFAULT_MAX_TOKENS, engine.max_model_len - len(engine.last.prompt_ids))
    chat(client, temperature=0)
    assert engine.last_params.is_greedy
    chat(client, temperature=0.5, top_p=0.9, top_k=20, repetition_penalty=1.2, seed=3)
    p = engine.last_params
    assert (p.do_sample, p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.seed) == (True, 0.5, 0.9, 20, 1.2, 3)


def test_sampling_defaults_come_from_generation_config_when_the_engine_has_one():
    qwen_chat = GenerationConfig(do_sample=True, top_k=0, top_p=0.8, repetition_penalty=1.1, max_new_tokens=512)
    client, engine = make_client(FakeEngine(reply=REPLY, generation_config=qwen_chat))
    chat(client)
    p = engine.last_params
    assert (p.do_sample, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (True, 1.0, 0.8, 0, 1.1)
    assert p.max_new_tokens == 512
    chat(client, top_p=1.0, repetition_penalty=1.0, max_tokens=1000)
    p = engine.last_params
    assert (p.top_p, p.repetition_penalty, p.max_new_tokens) == (1.0, 1.0, 1000)
    # A greedy checkpoint stays greedy unless the client asks for sampling.
    client, engine = make_client(FakeEngine(reply=REPLY, generation_config=GenerationConfig(do_sample=False)))
    chat(client)
    assert engine.last_params.is_greedy
    chat(client, temperature=0.7)
    assert not engine.last_params.is_greedy


def test_n_choices_are_separate_engine_requests_with_derived_seeds(client, engine):
    before = len(engine.requests)
    body = chat(client, n=3, seed=7).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == REPLY for c in body["choices"])
    new = engine.requests[before:]
    assert sorted(r.params.seed for r in new) == [7, 8, 9]
    assert len({r.request_id for r in new}) == 3
    assert body["usage"]["prompt_tokens"] == len(new[0].prompt_ids)  # the prompt counts once
    assert body["usage"]["completion_tokens"] == 3 * (len(engine.tokenizer.encode(REPLY)) + 1)


def test_chat_logprobs_format(client, engine):
    body = chat(client, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == REPLY  # the closing <|im_end|> is not content
    for entry in content:
        assert bytes(entry["bytes"]).decode() == entry["token"] and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]
    assert engine.last.logprobs == 2
    error = assert_openai_error(chat(client, logprobs=True, top_logprobs=21), 400)
    assert error["param"] == "top_logprobs"


def test_content_parts_are_joined(client, engine):
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    assert chat(client, messages=[{"role": "user", "content": parts}]).status_code == 200
    assert "Hi\nthere" in engine.last_prompt


def test_completions_prompt_forms_echo_and_logprobs(client, engine):
    engine.reply = " jumps over"
    body = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "The fox", "echo": True, "logprobs": 1, "max_tokens": 5}
    ).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == "The fox jumps over" and choice["finish_reason"] == "stop"
    lp = choice["logprobs"]
    # One entry per returned token: the prompt's (the first has nothing to be scored on), then the
    # completion's, its end token included (it has no text).
    assert lp["tokens"][-1] == "<|im_end|>" and "".join(lp["tokens"][:-1]) == "The fox jumps over"
    n_prompt = len(engine.tokenizer.encode("The fox"))
    assert len(lp["tokens"]) == n_prompt + body["usage"]["completion_tokens"] and engine.last.prompt_logprobs == 1
    assert lp["token_logprobs"][0] is None and all(x < 0 for x in lp["token_logprobs"][1:])
    assert lp["top_logprobs"][0] is None and all(len(top) == 1 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    assert engine.last_params.stop_words_ids[:2] == ((151645,), (151644,))
    # Token-id prompts and batches of prompts: choices are ordered prompt-major.
    ids, other = engine.tokenizer.encode("Once upon"), engine.tokenizer.encode("Hello")
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": [ids, other], "n": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [r.prompt_ids for r in engine.requests[-4:]] == [ids, ids, other, other]
    assert body["usage"]["prompt_tokens"] == len(ids) + len(other)
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": ["Once upon", "Hello"]}).json()
    assert [r.prompt_ids for r in engine.requests[-2:]] == [ids, other] and len(body["choices"]) == 2
    client.post("/v1/completions", json={"model": MODEL, "prompt": ids})
    assert engine.last.prompt_ids == ids
    assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400, param="prompt")
    assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "suffix": "y"}), 400)


def test_completions_stream_with_echo(client, engine):
    engine.reply = " world"
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "echo": True, "stream": True})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in events[:-1])
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == "Hello world"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_tokenize_and_detokenize(client, engine):
    tok = engine.tokenizer
    body = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert body == {"tokens": tok.encode("Hello world"), "count": 2, "max_model_len": engine.max_model_len}
    counted = client.post("/tokenize", json={"model": MODEL, "messages": USER}).json()["count"]
    assert counted == chat(client).json()["usage"]["prompt_tokens"]
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    assert_openai_error(client.post("/detokenize", json={"tokens": [-5]}), 400, param="tokens")
    assert_openai_error(client.post("/tokenize", json={}), 400)


def test_models_health_and_metrics(client, engine):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["object"] == "model" and models["data"][0]["owned_by"] == "qwenlm"
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/health").json() == {"status": "ok"}
    chat(client)
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in [
        "qwenlm_requests_total",
        "qwenlm_requests_running",
        "qwenlm_requests_waiting",
        "qwenlm_prompt_tokens_total",
        "qwenlm_generation_tokens_total",
        "qwenlm_cached_prompt_tokens_total",
        'qwenlm_time_to_first_token_seconds{quantile="0.5"}',
        "qwenlm_tokens_per_second",
        'qwenlm_http_time_to_first_token_seconds_bucket{le="+Inf"}',
        'qwenlm_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}',
    ]:
        assert name in text, name


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level("INFO", logger="qwenlm.server"):
        chat(client)
        client.get("/v1/nope")
    lines = [r.getMessage() for r in caplog.records if r.name == "qwenlm.server"]
    assert len(lines) == 2
    assert (
        lines[0].startswith("POST /v1/chat/completions 200 ") and "ms" in lines[0] and "completion_tokens=" in lines[0]
    )
    assert lines[1].startswith("GET /v1/nope 404 ")


def test_cors_headers_when_configured():
    client, _ = make_client(cors_origins=["http://example.com"], api_key="k")
    preflight = client.options(
        "/v1/chat/completions",
        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://example.com"


# --------------------------------------------------------------------------------------------------
# Part 2: a real server, the real openai client


@pytest.fixture(scope="module")
def live_server():
    engine = FakeEngine(reply=REPLY)
    app = create_app(engine, api_key="sk-test", served_model_name=MODEL, strict_model_name=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def oai(live_server):
    url, engine = live_server
    engine.reply, engine.delay = REPLY, 0.002
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=10)


@pytest.fixture
def live_engine(live_server):
    return live_server[1]


def test_openai_chat_non_stream_and_stream_agree(oai):
    completion = oai.chat.completions.create(model=MODEL, messages=USER, temperature=0)
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    stream = oai.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_openai_wrong_key_and_unknown_model_raise_typed_errors(live_server):
    url, _ = live_server
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        good.chat.completions.create(model="gpt-4", messages=USER)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        good.chat.completions.create(model=MODEL, messages=USER, presence_penalty=1.0)
    assert [m.id for m in good.models.list()] == [MODEL]


def test_openai_n_and_stop_and_logprobs(oai, live_engine):
    live_engine.reply = "Paris is the capital. STOP here."
    completion = oai.chat.completions.create(
        model=MODEL, messages=USER, n=2, stop=["STOP"], logprobs=True, top_logprobs=3, seed=1
    )
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.content == "Paris is the capital. "
        tokens = choice.logprobs.content
        assert tokens and all(len(t.top_logprobs) == 3 for t in tokens)
    stream = oai.chat.completions.create(model=MODEL, messages=USER, stop="STOP", stream=True, n=2)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            assert "ST" not in (choice.delta.content or "")
    assert texts == {0: "Paris is the capital. ", 1: "Paris is the capital. "}


def test_openai_tool_calls_non_stream_and_stream(oai, live_engine):
    live_engine.reply = TOOL_REPLY
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    completion = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "Observation:" in live_engine.last_params.stop
    assert "get_weather" in live_engine.last_prompt and "Action Input:" in live_engine.last_prompt

    stream = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], stream=True)
    calls, reasons, content = {}, [], ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert calls == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert "Action" not in content and "Observation" not in content
    assert [r for r in reasons if r] == ["tool_calls"]

    # The tool result goes back in; the model's final answer comes out as plain content.
    live_engine.reply = ANSWER_REPLY
    follow_up = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": "22C"}'},
    ]
    completion = oai.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER_TOOL])
    assert completion.choices[0].message.content == "It is sunny in Paris."
    assert completion.choices[0].finish_reason == "stop"
    assert 'Observation: {"temperature": "22C"}' in live_engine.last_prompt
    stream = oai.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER_TOOL], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "It is sunny in Paris."


def test_openai_legacy_functions_give_function_call(oai, live_engine):
    live_engine.reply = TOOL_REPLY
    completion = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], functions=[WEATHER_TOOL["function"]]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}


def test_openai_completions_echo_and_logprobs(oai, live_engine):
    live_engine.reply = " brown fox"
    completion = oai.completions.create(model=MODEL, prompt="The quick", echo=True, logprobs=2, max_tokens=10)
    choice = completion.choices[0]
    assert choice.text == "The quick brown fox"
    assert "".join(choice.logprobs.tokens) == "The quick brown fox<|im_end|>"  # the end token is returned too
    assert choice.logprobs.token_logprobs[0] is None and all(lp < 0 for lp in choice.logprobs.token_logprobs[1:])
    stream = oai.completions.create(model=MODEL, prompt="The quick", max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in stream) == " brown fox"


def test_openai_client_disconnect_mid_stream_aborts_engine_request(oai, live_engine):
    live_engine.reply, live_engine.delay = "tick " * 400, 0.005
    before = len(live_engine.requests)
    stream = oai.chat.completions.create(model=MODEL, messages=USER, stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    stream.close()
    record = live_engine.requests[before]
    deadline = time.monotonic() + 5
    while record.finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert record.finish_reason == "abort" and record.request_id in live_engine.aborted
    assert len(record.outputs) < 400  # stopped early, not run to the end
    # Same for a non-streaming request whose client gives up.
    live_engine.reply = "tock " * 400
    impatient = oai.with_options(timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=MODEL, messages=USER)
    record = live_engine.requests[-1]
    deadline = time.monotonic() + 5
    while record.finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert record.finish_reason == "abort"
    live_engine.reply, live_engine.delay = REPLY, 0.002
    assert oai.chat.completions.create(model=MODEL, messages=USER).choices[0].finish_reason == "stop"
