"""`--endpoint`: the real `qwenlm serve` on 127.0.0.1 with the tiny base checkpoint gives the same results as
the model in this process (multiple choice and perplexity from echoed prompt logprobs, greedy generation)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from server_process import running_server
from test_eval_choice import rows, run

from qwenlm.chat import chat
from qwenlm.cli import main
from qwenlm.eval.backends import EndpointBackend, EndpointError

API_KEY = "sk-eval"


@pytest.fixture(scope="module")
def endpoint(base_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    args = ("--api-key", API_KEY, "--served-model-name", "tiny-base", "--max-model-len", "4096", "--cpu-only",
            "--dtype", "float32")  # fmt: skip
    with running_server(base_checkpoint, log_path, *args) as (base, _):
        yield f"{base}/v1"


def _via(endpoint: str, task: str, data, out, *extra: str, mode: str = "--base") -> list[dict]:
    main(["eval", task, "--endpoint", endpoint, "--api-key", API_KEY, mode, "--data", str(data), "--output",
          str(out), *extra])  # fmt: skip
    return rows(out)


def test_endpoint_equals_in_process(endpoint, base_checkpoint, eval_data, tmp_path):
    local = run("mmlu", base_checkpoint, eval_data / "mmlu", tmp_path / "a.jsonl", "--batch-size", "2")
    remote = _via(endpoint, "mmlu", eval_data / "mmlu", tmp_path / "b.jsonl", "--batch-size", "2")
    assert [r["pred"] for r in local] == [r["pred"] for r in remote]
    for a, b in zip(local, remote, strict=True):
        assert a["prompt"] == b["prompt"] and a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    info = json.loads((tmp_path / "b.results.json").read_text())["provenance"]["model"]
    assert info["model_name"] == "tiny-base" and info["endpoint"] == endpoint.removesuffix("/v1")

    local = run("ppl", base_checkpoint, eval_data / "text.txt", tmp_path / "c.jsonl", "--context-lengths", "64")
    remote = main(["eval", "ppl", "--endpoint", endpoint, "--api-key", API_KEY, "--data", str(eval_data / "text.txt"),
                   "--output", str(tmp_path / "d.jsonl"), "--context-lengths", "64"])  # fmt: skip
    assert rows(tmp_path / "d.jsonl")[0]["ppl"] == pytest.approx(local[0]["ppl"], rel=1e-4)

    local = run("gsm8k", base_checkpoint, eval_data / "gsm8k", tmp_path / "e.jsonl", "--max-new-tokens", "8")
    remote = _via(endpoint, "gsm8k", eval_data / "gsm8k", tmp_path / "f.jsonl", "--max-new-tokens", "8")
    assert [r["completion"] for r in local] == [r["completion"] for r in remote]


def test_endpoint_chat_equals_chat_in_process(endpoint, base_model, qwen_tokenizer, eval_data, tmp_path):
    # The ChatML context of chat() goes to the server as token ids (chat completions would strip the prompt's
    # trailing newline, as Qwen's server does); the tiny base weights stand in for a chat model here.
    remote = _via(endpoint, "ceval", eval_data / "ceval", tmp_path / "c.jsonl", "--max-new-tokens", "8",
                  "--subjects", "college_physics", mode="--chat")  # fmt: skip
    as_chat = base_model.generation_config.updated(chat_format="chatml")
    for row in remote:
        response, _ = chat(base_model, qwen_tokenizer, row["prompt"], None, generation_config=as_chat,
                           do_sample=False, repetition_penalty=1.0, max_new_tokens=8)  # fmt: skip
        assert row["response"] == response


class _LegacyServer(http.server.BaseHTTPRequestHandler):
    """A server that refuses max_tokens=0 and lists echoed prompt tokens without scoring them."""

    bodies: list[dict] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._send(200, {"data": [{"id": "legacy"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        if body.get("max_tokens") == 0:
            return self._send(400, {"error": {"message": "max_tokens must be at least 1"}})
        choices = [{"index": i, "text": "", "logprobs": {"token_logprobs": [None] * (len(p) + 1)}}
                   for i, p in enumerate(body["prompt"])]  # fmt: skip
        self._send(200, {"choices": choices})

    def _send(self, status: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def test_a_server_without_prompt_logprobs_is_named_clearly(qwen_tokenizer):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LegacyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = EndpointBackend(f"http://127.0.0.1:{server.server_port}/v1", qwen_tokenizer)
        assert backend.model_name == "legacy"
        with pytest.raises(EndpointError, match="null logprobs for echoed prompt tokens"):
            backend.choice_logprobs([1, 2], [[3]], [32, 33, 34, 35])
        assert [b["max_tokens"] for b in _LegacyServer.bodies] == [0, 1]  # refused 0, retried with 1
    finally:
        server.shutdown()
