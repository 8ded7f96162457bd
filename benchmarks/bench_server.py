"""Aggregate generated tokens/s and time to first token of `qwenlm serve` at 1, 4 and 16 concurrent
streaming clients, next to the same requests sent one at a time (the peer), against one server.

    python benchmarks/bench_server.py --model /tmp/q18/ckpt --dtype bfloat16 --max-tokens 32

Starts the real server on 127.0.0.1 (a free port), drives it with the `openai` client (streaming,
temperature 0, usage reported by the server), stops it. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwenlm", "serve", "--model", args.model, "--port", str(port), "--dtype", args.dtype,
           "--max-num-seqs", str(max(args.clients)), "--max-model-len", "1024",
           "--served-model-name", "bench"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def one_request(client: openai.OpenAI, i: int, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed chat request."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": f"Request {i}: tell me a long story about number {i}."}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - start), tokens


def run_load(client: openai.OpenAI, n: int, max_tokens: int, together: bool, offset: int) -> dict:
    start = time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(lambda i: one_request(client, offset + i, max_tokens), range(n)))
    else:
        results = [one_request(client, offset + i, max_tokens) for i in range(n)]
    wall = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"clients": n, "mode": "concurrent" if together else "one at a time", "wall_s": wall,
            "tokens": tokens, "tok_s": tokens / wall, "mean_ttft_s": sum(f for f, _ in results) / n}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    port = _free_port()
    proc = start_server(args, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        one_request(client, -1, 4)  # warm-up
        rows = []
        for n in args.clients:
            rows.append(run_load(client, n, args.max_tokens, together=True, offset=1000 * n))
            rows.append(run_load(client, n, args.max_tokens, together=False, offset=1000 * n + 500))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    print("| clients | mode | requests | tokens | wall s | aggregate tok/s | mean TTFT s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['mode']} | {r['clients']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.2f} "
              f"| {r['mean_ttft_s']:.2f} |")  # fmt: skip
    single = rows[0]["tok_s"]
    for r in rows[::2]:
        print(f"{r['clients']} concurrent clients: {r['tok_s'] / single:.1f}x the aggregate tokens/s of one")
    print(json.dumps({"bench": "server", "model": args.model, "dtype": args.dtype, "rows": rows}))


if __name__ == "__main__":
    main()
