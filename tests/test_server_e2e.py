"""End to end: the real `qwenlm serve` process on 127.0.0.1 with a tiny real checkpoint, driven by the
real `openai` client — what users run."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest
from server_process import running_server

API_KEY = "sk-test-key"


def _http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    """A plain HTTP call (stdlib), for what the openai client cannot send: broken JSON, raw endpoints."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                               **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(tiny_checkpoint, log_path, "--api-key", API_KEY, "--served-model-name", "qwen-tiny",
                        "--strict-model-name",  # other names get 404 (the default accepts any name)
                        "--max-num-seqs", "3", "--max-model-len", "1024", "--cpu-only") as running:  # fmt: skip
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


GREEDY = {"temperature": 0, "max_tokens": 12}


def test_models_and_chat(client):
    assert [m.id for m in client.models.list().data] == ["qwen-tiny"]
    reply = client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": "你好"}], **GREEDY)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == 20 and reply.usage.completion_tokens <= 12  # the spec's 20-token context


def test_stream_equals_non_stream_and_reports_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(model="qwen-tiny", messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model="qwen-tiny", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_concurrent_requests_get_the_same_greedy_answers_as_alone(client):
    prompts = ["Hello", "What is 1+1?", "写一首诗", "Tell me about the sea", "Why?"]

    def ask(p: str) -> str:
        r = client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": p}], **GREEDY)
        return r.choices[0].message.content

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_completions_endpoint(client):
    r = client.completions.create(model="qwen-tiny", prompt="Once upon a time", max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Once upon a time") and r.object == "text_completion"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    base = server[0]
    status, body = _http("POST", f"{base}/v1/chat/completions", b"{not json", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and "error" in json.loads(body)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": "x" * 10}],
                                       max_tokens=5000)  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen-tiny", messages=[{"role": "assistant", "content": "hi"}])
    ok = client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": "still there?"}],
                                        **GREEDY)  # fmt: skip
    assert ok.choices[0].message.content is not None


def test_metrics_and_tokenize(server):
    base = server[0]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tokens = json.loads(_http("POST", f"{base}/tokenize", {"prompt": "你好"}, headers)[1])
    assert tokens["tokens"] == [108386]
    assert json.loads(_http("POST", f"{base}/detokenize", {"tokens": [108386]}, headers)[1])["prompt"] == "你好"
    status, metrics = _http("GET", f"{base}/metrics", None, headers)
    assert status == 200 and "requests" in metrics and "tokens" in metrics


def test_n_stop_logprobs_and_usage(client):
    messages = [{"role": "user", "content": "Count with me"}]
    free = client.chat.completions.create(model="qwen-tiny", messages=messages, **GREEDY).choices[0].message.content
    stop = free[2:5]
    reply = client.chat.completions.create(model="qwen-tiny", messages=messages, n=2, stop=[stop], logprobs=True,
                                           top_logprobs=2, **GREEDY)  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert stop not in choice.message.content and choice.finish_reason == "stop"
        assert choice.message.content == free[: free.index(stop)].strip() or free.startswith(choice.message.content)
        assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in choice.logprobs.content)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_tools_are_accepted_and_answered(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    reply = client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": "Weather?"}],
                                           tools=tools, **GREEDY)  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")  # random weights: rarely a call
    streamed = list(client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": "Hi"}],
                                                   tools=tools, stream=True, **GREEDY))  # fmt: skip
    assert streamed[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_vllm_request_extensions_are_honoured(server, client):
    """What vLLM clients put in extra_body: stop_token_ids and ignore_eos change where the output ends,
    structured_outputs / guided_* constrain it (chat and completions), and unimplemented ones are a 400."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    hello = json.loads(_http("POST", f"{server[0]}/tokenize", {"prompt": "Hello"}, headers)[1])["tokens"][0]
    chat = {"model": "qwen-tiny", "messages": [{"role": "user", "content": "Say hello"}], "temperature": 0}
    forced = client.chat.completions.create(**chat, max_tokens=4, logit_bias={str(hello): 100})
    assert forced.choices[0].message.content == "Hello" * 4 and forced.choices[0].finish_reason == "length"
    stopped = client.chat.completions.create(**chat, max_tokens=4, logit_bias={str(hello): 100},
                                             extra_body={"stop_token_ids": [hello]})  # fmt: skip
    assert stopped.choices[0].message.content == "" and stopped.choices[0].finish_reason == "stop"
    im_end = {"151645": 100}  # the end-of-turn token: the reply ends at once, unless ignore_eos
    assert client.chat.completions.create(**chat, max_tokens=5, logit_bias=im_end).usage.completion_tokens == 1
    endless = client.chat.completions.create(**chat, max_tokens=5, logit_bias=im_end, extra_body={"ignore_eos": True})
    assert endless.usage.completion_tokens == 5 and endless.choices[0].finish_reason == "length"

    choice = client.chat.completions.create(**chat, max_tokens=8, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    grammar = {"structured_outputs": {"grammar": 'root ::= "A" | "BB"'}}  # llama.cpp's GBNF; Lark works too
    gbnf = client.chat.completions.create(**chat, max_tokens=8, extra_body=grammar)
    assert gbnf.choices[0].message.content in ("A", "BB")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = client.chat.completions.create(**chat, max_tokens=24, extra_body={"guided_json": schema})
    assert json.loads(reply.choices[0].message.content) in ({"ok": True}, {"ok": False})
    phone = client.completions.create(model="qwen-tiny", prompt="Call", max_tokens=12, temperature=0, n=2,
                                      extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})  # fmt: skip
    for c in phone.choices:
        assert len(c.text) == 8 and c.text[3] == "-" and (c.text[:3] + c.text[4:]).isdigit()

    for extra, param in [({"min_tokens": 3}, "min_tokens"), ({"modalities": ["text", "audio"]}, "modalities"),
                         ({"guided_regex": "b", "guided_choice": ["a"]}, "guided_choice"),
                         ({"guided_choice": []}, "guided_choice"), ({"seed": 2**70}, "seed"),
                         ({"stop_token_ids": [10**6]}, "stop_token_ids")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**chat, max_tokens=2, extra_body=extra)
        assert err.value.body["param"] == param, extra


def test_errors_name_what_the_client_sent(server):
    """A body that is not sent as JSON says so; the Responses API's errors name its own fields."""
    base, auth = server[0], {"Authorization": f"Bearer {API_KEY}"}
    form = urllib.request.Request(f"{base}/v1/chat/completions", data=b'{"model": "qwen-tiny"}', method="POST",
                                  headers={**auth, "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(form, timeout=30)
    assert (
        err.value.code == 400 and "Content-Type: application/json" in json.loads(err.value.read())["error"]["message"]
    )
    status, body = _http("POST", f"{base}/v1/responses", {"model": "qwen-tiny", "input": "word " * 1200}, auth)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "input" and "messages" not in error["message"]
    empty = {"model": "qwen-tiny", "input": [{"role": "user", "content": ""}]}
    status, body = _http("POST", f"{base}/v1/responses", empty, auth)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "input" and "messages" not in error["message"]


@pytest.mark.parametrize(
    "body,status",
    [({"model": "qwen-tiny"}, 400),  # missing messages
     ({"model": "qwen-tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
     ({"model": "qwen-tiny", "messages": [{"role": "user", "content": ""}]}, 400),
     ({"model": "qwen-tiny", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400),
     ({"model": "qwen-tiny", "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400),
     ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404)],
)  # fmt: skip
def test_each_bad_input_gets_its_status_and_an_error_object(server, body, status):
    code, text = _http("POST", f"{server[0]}/v1/chat/completions", body, {"Authorization": f"Bearer {API_KEY}"})
    error = json.loads(text)["error"]
    assert code == status and set(error) >= {"message", "type", "param", "code"} and "Traceback" not in text


def test_sixteen_concurrent_streaming_clients_are_all_correct(client):
    prompts = [f"Client {i} says hello" for i in range(16)]

    def solo(p: str) -> str:
        return client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": p}],
                                              **GREEDY).choices[0].message.content  # fmt: skip

    def streamed(p: str) -> str:
        chunks = client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": p}],
                                                stream=True, **GREEDY)  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    expected = [solo(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        assert list(pool.map(streamed, prompts)) == expected


def test_a_client_killed_mid_stream_frees_its_slot(server, client):
    stream = client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": "Go on and on"}],
                                            max_tokens=900, temperature=0, stream=True)  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away mid-stream
    deadline = time.time() + 20
    while time.time() < deadline:
        metrics = _http("GET", f"{server[0]}/metrics")[1]
        running = [line for line in metrics.splitlines() if line.startswith("qwenlm_requests_running ")]
        if running and float(running[0].split()[-1]) == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned request kept running")


def test_full_queue_answers_503(tiny_checkpoint, tmp_path):
    with running_server(tiny_checkpoint, tmp_path / "server.log", "--max-num-seqs", "1", "--max-queue", "1",
                        "--cpu-only") as (base, _):  # fmt: skip
        busy = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)

        def ask(i: int) -> str:
            try:
                busy.chat.completions.create(model=str(tiny_checkpoint.name), max_tokens=300, temperature=0,
                                             messages=[{"role": "user", "content": f"long {i}"}])  # fmt: skip
                return "ok"
            except openai.InternalServerError as err:  # the client's class for 5xx
                assert err.status_code == 503 and err.response.headers["Retry-After"] == "1"
                return "503"

        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            outcomes = list(pool.map(ask, range(6)))
        assert "503" in outcomes and "ok" in outcomes


def test_requests_still_running_at_the_graceful_timeout_end_as_the_api_says(tiny_checkpoint, tmp_path):
    """Past --graceful-timeout the engine aborts what still runs before uvicorn cancels it: a stream ends with an
    error event and [DONE] (not a cut body), a plain request gets the 503 error object (not a text 500)."""
    import httpx

    with running_server(tiny_checkpoint, tmp_path / "server.log", "--graceful-timeout", "2", "--cpu-only",
                        "--max-num-seqs", "4") as (base, proc):  # fmt: skip
        body = {"model": "m", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900,
                "temperature": 0, "ignore_eos": True}  # fmt: skip

        def streamed() -> str:
            text = ""
            with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
                for chunk in r.iter_text():
                    text += chunk
            return text

        def plain() -> tuple[int, dict]:
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            return r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            streams = [pool.submit(streamed) for _ in range(2)]
            single = pool.submit(plain)
            time.sleep(1.5)  # generating
            proc.send_signal(signal.SIGTERM)
            for future in streams:
                text = future.result(timeout=60)
                assert '"request_aborted"' in text and text.rstrip().endswith("data: [DONE]"), text[-500:]
            status, error = single.result(timeout=60)
        assert status == 503 and error["error"]["code"] == "request_aborted"
        assert proc.wait(timeout=30) == 0


def test_graceful_shutdown(server):
    _, proc = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
