"""End to end: the real `qwenlm serve` process on 127.0.0.1 with a tiny real checkpoint, driven by the
real `openai` client — what users run."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwenlm",
            "serve",
            "--model",
            str(tiny_checkpoint),
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--served-model-name",
            "qwen-tiny",
            "--max-num-seqs",
            "3",
            "--max-model-len",
            "1024",
            "--cpu-only",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if _http("GET", f"{base}/health")[0] == 200:
            break
        time.sleep(0.3)
        assert proc.poll() is None, "server exited during start-up"
    else:
        pytest.fail("server did not come up")
    yield base, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    log.seek(0)
    print(log.read()[-3000:])
    log.close()


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
    assert text.strip() == full.choices[0].message.content.strip()
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


def test_graceful_shutdown(server):
    _, proc = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
