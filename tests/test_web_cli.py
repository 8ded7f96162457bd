"""`qwenlm web` and `qwenlm serve --web` without a browser: the flags (Qwen web_demo.py's included), the
refused `--share`, and the one app they start (page at /, API at /v1) on a real tiny checkpoint."""

from __future__ import annotations

import pytest
import uvicorn
from fastapi.testclient import TestClient

from qwenlm.cli import build_parser, main


def test_the_web_demo_flags_of_the_seeds_are_accepted():
    argv = [
        "web",
        "-c",
        "Qwen-7B-Chat",
        "--cpu-only",
        "--server-name",
        "0.0.0.0",
        "--server-port",
        "7860",
        "--inbrowser",
    ]
    args = build_parser().parse_args(argv)
    assert (args.model, args.cpu_only, args.inbrowser, args.web) == ("Qwen-7B-Chat", True, True, True)
    assert (args.host, args.port) == ("0.0.0.0", 7860)


def test_defaults_and_the_serve_flags():
    args = build_parser().parse_args(["web"])
    assert (args.model, args.host, args.port, args.api_key, args.inbrowser) == (None, "127.0.0.1", 8000, None, False)
    args = build_parser().parse_args(["web", "--host", "::1", "--port", "9000", "--api-key", "k", "--max-num-seqs=2"])
    assert (args.host, args.port, args.api_key, args.max_num_seqs) == ("::1", 9000, "k", 2)
    assert build_parser().parse_args(["serve", "--web"]).web and not build_parser().parse_args(["serve"]).web


def test_share_is_refused_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["web", "--model", "whatever", "--share"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--share" in err and "not offered" in err and "--host 0.0.0.0" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "page"),
    [(["web"], True), (["serve", "--web"], True), (["serve"], False)],
    ids=["web", "serve_web", "serve"],
)
def test_one_server_for_the_page_and_the_api(argv, page, tiny_checkpoint, monkeypatch):
    apps = []

    class NoListen(uvicorn.Server):  # uvicorn.Server that hands its app to the test instead of listening
        def run(self, sockets=None) -> None:
            self.should_exit = True  # (anything waiting for the server to start gives up)
            apps.append(self.config.app)

    monkeypatch.setattr(uvicorn, "Server", NoListen)
    args = build_parser().parse_args([*argv, "--model", str(tiny_checkpoint), "--cpu-only", "--api-key", "sk-k"])
    args.func(args)
    client = TestClient(apps[0])
    auth = {"Authorization": "Bearer sk-k"}
    home = client.get("/") if page else client.get("/", headers=auth)
    assert home.status_code == (200 if page else 404)
    if page:
        assert "<title>qwenlm chat</title>" in home.text and "qwenlm-notice" not in home.text
    assert client.get("/v1/models").status_code == 401
    models = client.get("/v1/models", headers=auth).json()
    assert [m["id"] for m in models["data"]] == [tiny_checkpoint.name]
