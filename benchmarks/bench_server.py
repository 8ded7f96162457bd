"""`qwenlm serve` under load and at rest: aggregate generated tokens/s, time to first token and errors at N
concurrent streaming clients next to the same requests sent one at a time (the peer), and the server's
resident memory (RSS) against weights + KV budget.

    python benchmarks/bench_server.py --model /tmp/q18/ckpt --dtype bfloat16 --max-tokens 32 --clients 1 16 64
    python benchmarks/bench_server.py --model /tmp/small --dtype float32 --clients 64 --max-num-seqs 64 \
        --max-model-len 8192 --kv-cache-memory 1 --prompt-words 200 2000 --max-tokens 64 --no-sequential
    python benchmarks/bench_server.py --model /tmp/small --dtype float32 --rss-only --rss-matrix
    ... --baseline /tmp/qwenlm-head     # the same, also against the engine of another checkout (git worktree)

Starts the real server on 127.0.0.1 (a free port), drives it with the `openai` client (streaming,
temperature 0, usage reported by the server), reads its /metrics (KV blocks, preemptions) and the RSS of
its process, stops it. `--baseline ROOT` runs everything a second time with `qwenlm` imported from ROOT
(e.g. `git worktree add /tmp/qwenlm-head HEAD`: the previous engine), in the same run. Prints tables,
then one JSON line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def weights_mib(model: str, dtype: str) -> float:
    """Bytes of the checkpoint's tensors once loaded in `dtype`, from the safetensors headers."""
    from safetensors import safe_open

    size = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    total = 0
    for path in Path(model).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n * size
    return total / 2**20


class Server:
    """`qwenlm serve` in a subprocess, optionally importing qwenlm from another checkout (`root`)."""

    def __init__(self, args: argparse.Namespace, root: str | None, max_num_seqs: int, max_model_len: int) -> None:
        self.port = _free_port()
        model = str(Path(args.model).resolve())
        cmd = [sys.executable, "-m", "qwenlm", "serve", "--model", model, "--port", str(self.port),
               "--dtype", args.dtype, "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
               "--served-model-name", "bench"]  # fmt: skip
        if args.kv_cache_memory is not None and root is None:
            cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115 (closed in stop())
        # `python -m` imports from its working directory first: run a baseline from its own checkout
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=env, cwd=root)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(1200):
            try:
                urllib.request.urlopen(f"{self.base}/health", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None:
                    tail = Path(self.log.name).read_text()[-200:]
                    code = self.proc.returncode
                    raise RuntimeError(f"exited with code {code} (-9: killed, out of memory?) {tail}") from None
                time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError("server did not start")
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=3600)

    def kv_cache_gib(self) -> float | None:
        found = re.search(r"kv_cache=([\d.]+) GiB", Path(self.log.name).read_text())
        return float(found.group(1)) if found else None

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"{self.base}/metrics", timeout=10).read().decode()
        wanted = ("qwenlm_preemptions_total", "qwenlm_kv_cache_blocks_total", "qwenlm_kv_cache_blocks_used",
                  "qwenlm_prefix_cache_hit_rate")  # fmt: skip
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(wanted)}

    def rss(self) -> tuple[float, float]:
        return _rss_mib(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _prompt(i: int, words: tuple[int, int]) -> str:
    rng = random.Random(i)
    n = rng.randint(*words)
    return f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(n)) + f". Tell me a long story about {i}."


def one_request(client: openai.OpenAI, i: int, max_tokens: int, words: tuple[int, int]) -> tuple[float, int, bool]:
    """(time to first token, completion tokens, ok) of one streamed chat request."""
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": _prompt(i, words)}],
            max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as err:
        print(f"request {i} failed: {err}", file=sys.stderr)
        return time.perf_counter() - start, 0, False
    return (first if first is not None else time.perf_counter() - start), tokens, True


def run_load(server: Server, n: int, args: argparse.Namespace, together: bool, offset: int) -> dict:
    words = tuple(args.prompt_words)
    start = time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(lambda i: one_request(server.client, offset + i, args.max_tokens, words), range(n)))
    else:
        results = [one_request(server.client, offset + i, args.max_tokens, words) for i in range(n)]
    wall = time.perf_counter() - start
    tokens = sum(t for _, t, _ in results)
    return {"clients": n, "mode": "concurrent" if together else "one at a time", "wall_s": wall, "tokens": tokens,
            "tok_s": tokens / wall, "mean_ttft_s": sum(f for f, _, _ in results) / n,
            "errors": sum(not ok for _, _, ok in results), "peak_rss_mib": server.rss()[1],
            **server.metrics()}  # fmt: skip


def load_rows(args: argparse.Namespace, root: str | None) -> list[dict]:
    server = Server(args, root, args.max_num_seqs or max(args.clients), args.max_model_len)
    try:
        one_request(server.client, -1, 4, (1, 2))  # warm-up
        rows = []
        for n in args.clients:
            rows.append(run_load(server, n, args, together=True, offset=1000 * n))
            if not args.no_sequential:
                rows.append(run_load(server, n, args, together=False, offset=1000 * n + 500))
    finally:
        server.stop()
    return rows


def rss_rows(args: argparse.Namespace, root: str | None, weights: float) -> list[dict]:
    """Idle RSS of a fresh server per (max_num_seqs, max_model_len)."""
    shapes = [(8, 2048), (8, 8192), (64, 8192)] if args.rss_matrix else [(args.max_num_seqs or 8, args.max_model_len)]
    rows = []
    for seqs, length in shapes:
        try:
            server = Server(args, root, seqs, length)
        except RuntimeError as err:  # e.g. the old engine cannot reserve max_num_seqs x max_model_len
            rows.append({"max_num_seqs": seqs, "max_model_len": length, "error": str(err).splitlines()[0]})
            continue
        try:
            one_request(server.client, -1, 4, (1, 2))
            rss, peak = server.rss()
            kv = server.kv_cache_gib()
        finally:
            server.stop()
        kv_mib = kv * 1024 if kv is not None else None
        rows.append({"max_num_seqs": seqs, "max_model_len": length, "rss_mib": rss, "peak_rss_mib": peak,
                     "weights_mib": weights, "kv_mib": kv_mib,
                     "overhead_mib": rss - weights - (kv_mib or 0.0)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2, help="the server's OMP threads")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, nargs=2, default=[6, 6], metavar=("MIN", "MAX"),
                        help="random filler words per prompt (~1.3 tokens each), per request")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, help="default: the largest --clients")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory", type=float, help="GiB (this checkout's engine only)")
    parser.add_argument("--no-sequential", action="store_true", help="skip the one-at-a-time peer")
    parser.add_argument("--rss-only", action="store_true", help="only the idle-RSS measurement")
    parser.add_argument("--rss-matrix", action="store_true", help="idle RSS at 8x2048, 8x8192 and 64x8192")
    parser.add_argument("--baseline", metavar="ROOT", help="also run the engine of the checkout at ROOT")
    args = parser.parse_args()
    weights = weights_mib(args.model, args.dtype)
    engines = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    result: dict = {"bench": "server", "model": args.model, "dtype": args.dtype, "weights_mib": weights}
    for name, root in engines:
        result[f"{name}_rss"] = rss_rows(args, root, weights)
        if not args.rss_only:
            result[f"{name}_load"] = load_rows(args, root)
    for name, _ in engines:
        print(f"\n### {name} engine: idle RSS (weights {weights:.0f} MiB)")
        print("| max_num_seqs | max_model_len | KV budget MiB | RSS MiB | RSS - weights - KV MiB |")
        print("|---|---|---|---|---|")
        for r in result[f"{name}_rss"]:
            if "error" in r:
                print(f"| {r['max_num_seqs']} | {r['max_model_len']} | - | did not start: {r['error']} | - |")
                continue
            kv = f"{r['kv_mib']:.0f}" if r["kv_mib"] is not None else "(slots)"
            print(f"| {r['max_num_seqs']} | {r['max_model_len']} | {kv} | {r['rss_mib']:.0f} | "
                  f"{r['overhead_mib']:.0f} |")  # fmt: skip
        if args.rss_only:
            continue
        print(f"\n### {name} engine: load")
        print("| clients | mode | tokens | wall s | aggregate tok/s | mean TTFT s | errors | preemptions "
              "| peak RSS MiB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        rows = result[f"{name}_load"]
        for r in rows:
            print(f"| {r['clients']} | {r['mode']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.2f} | "
                  f"{r['mean_ttft_s']:.2f} | {r['errors']} | {r.get('qwenlm_preemptions_total', '-')} | "
                  f"{r['peak_rss_mib']:.0f} |")  # fmt: skip
        single = rows[0]["tok_s"]
        for r in (r for r in rows if r["mode"] == "concurrent"):
            print(f"{r['clients']} concurrent clients: {r['tok_s'] / single:.1f}x the aggregate tokens/s of one")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
