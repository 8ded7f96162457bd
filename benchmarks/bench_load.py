"""Load time and peak memory of a checkpoint: qwenlm beside transformers' Qwen2ForCausalLM (same weights,
converted) in the same run. Each load runs in a fresh process so its peak RSS is its own.

    python benchmarks/bench_load.py --model /tmp/q18 [--dtypes float32 bfloat16] [--repeats 3]
    python benchmarks/bench_load.py --make-preset 1.8b --model /tmp/q18   # writes the checkpoint first
    python benchmarks/bench_load.py --model /tmp/q18 --dtypes bfloat16 --quantization int8 --baseline-rev HEAD~1

`--quantization int8/int4` quantizes while loading (qwenlm only: transformers has no such CPU path, so the peer
is left out). `--baseline-rev REV` also loads with qwenlm as it was at git revision REV (its package exported to
a temporary folder), interleaved with the working tree's. Besides time and peak, each load reports its resident
memory right after loading and how much of it sits on huge pages (AnonHugePages). `--decode-steps N` also times
greedy decoding in each qwenlm process (where a process's memory lands can move decode speed by several percent
on a VM, so compare placements across several processes).

Prints a table, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_mb(key: str, path: str = "/proc/self/status") -> float:
    """VmRSS (now) or VmHWM (peak) of this process, or a /proc/self/smaps_rollup total such as AnonHugePages
    (memory on transparent huge pages). Not ru_maxrss: that survives fork+exec, so a child would report its
    parent's peak."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_now_mb() -> float:
    return _status_mb("VmRSS")


def _decode_ms_per_token(model, steps: int, rounds: int = 8) -> float:
    """Median ms per greedy token (after a 3-token prompt) over `rounds` runs of `steps` tokens."""
    import torch

    from qwenlm.bench import run_qwenlm

    prompt, times = torch.tensor([[1, 2, 3]]), []
    for _ in range(rounds + 1):  # the first is a warm-up
        timing = run_qwenlm(model, prompt, steps + 1, compile=False)
        times.append((timing.total_s - timing.ttft_s) / steps * 1e3)
    return statistics.median(times[1:])


def worker(engine: str, model: str, dtype: str, quantization: str, decode_steps: int) -> None:
    """Load once in this process and print {load_s, peak_rss_mb, base_rss_mb, ...} as JSON."""
    import torch

    torch.set_num_threads(2)
    base = _rss_now_mb()  # after importing torch
    start = time.perf_counter()
    if engine.startswith("qwenlm"):
        from qwenlm.model import load_model

        quant = None if quantization == "none" else quantization
        model_obj = load_model(model, torch_dtype=dtype, device_map="cpu", progress=False, quantization=quant)
    else:
        from transformers import Qwen2ForCausalLM

        model_obj = Qwen2ForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    rss_loaded, huge = _rss_now_mb(), _status_mb("AnonHugePages", "/proc/self/smaps_rollup")
    tensors = [*model_obj.parameters(), *model_obj.buffers()]  # quantized codes are buffers
    params = sum(p.numel() * p.element_size() for p in tensors)
    start = time.perf_counter()
    with torch.no_grad():  # touches every weight once: mmap-backed pages are resident after this
        model_obj(torch.arange(16)[None])
    forward_s = time.perf_counter() - start
    decode_ms = _decode_ms_per_token(model_obj, decode_steps) if decode_steps and engine.startswith("qwenlm") else None
    print(json.dumps({"load_s": load_s, "peak_rss_mb": peak, "base_rss_mb": base, "weights_mb": params / 2**20,
                      "rss_loaded_mb": rss_loaded, "huge_pages_mb": huge, "first_forward_s": forward_s,
                      "rss_after_forward_mb": _rss_now_mb(), "decode_ms_per_token": decode_ms}))  # fmt: skip


def run_case(engine: str, model: Path, dtype: str, quantization: str, source: Path | None, decode_steps: int) -> dict:
    """One load in a fresh process; `source`: a folder holding another version of the qwenlm package."""
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model), "--dtypes", dtype,
           "--quantization", quantization, "--decode-steps", str(decode_steps)]  # fmt: skip
    env = None
    if source is not None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def export_package(revision: str, into: Path) -> Path:
    """The qwenlm package as at git `revision`, extracted under `into` (a folder to put on PYTHONPATH)."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", revision, "qwenlm"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"cannot export qwenlm at {revision!r}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def disk_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Qwen v1 checkpoint folder")
    parser.add_argument("--make-preset", help="first write a random checkpoint of this preset to --model")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--baseline-rev", help="also load with qwenlm as at this git revision")
    parser.add_argument("--decode-steps", type=int, default=0, help="also time greedy decoding after each qwenlm load")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.dtypes[0], args.quantization, args.decode_steps)

    model = Path(args.model)
    if args.make_preset:
        from qwenlm.testing import make_random_checkpoint

        make_random_checkpoint(model, preset=args.make_preset, chat=False)
    engines = {"qwenlm": model}
    sources: dict[str, Path | None] = {"qwenlm": None}
    baseline = None
    if args.baseline_rev:
        baseline = tempfile.TemporaryDirectory(prefix="qwenlm-baseline-")
        engines[f"qwenlm@{args.baseline_rev}"] = model
        sources[f"qwenlm@{args.baseline_rev}"] = export_package(args.baseline_rev, Path(baseline.name))
    tmp = None
    if not args.no_peer and args.quantization == "none":
        from qwenlm.convert import convert_to_qwen2

        tmp = tempfile.TemporaryDirectory(prefix="qwen2-", dir=model.parent)
        engines["transformers"] = convert_to_qwen2(model, tmp.name)

    results = []
    for dtype in args.dtypes:
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for _ in range(args.repeats):  # interleaved, so drift in the page cache hits both alike
            for engine, folder in engines.items():
                sample = run_case(engine, folder, dtype, args.quantization, sources.get(engine), args.decode_steps)
                runs[engine].append(sample)
        for engine, samples in runs.items():
            loaded = [s["rss_loaded_mb"] for s in samples]
            results.append(
                {
                    "engine": engine,
                    "dtype": dtype,
                    "load_s": statistics.median(s["load_s"] for s in samples),
                    "peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in samples),
                    "base_rss_mb": statistics.median(s["base_rss_mb"] for s in samples),
                    "weights_mb": samples[0]["weights_mb"],
                    "rss_loaded_mb": statistics.median(loaded),
                    "rss_loaded_mb_range": [min(loaded), max(loaded)],
                    "huge_pages_mb": statistics.median(s["huge_pages_mb"] for s in samples),
                    "decode_ms_per_token": [s["decode_ms_per_token"] for s in samples],
                    "first_forward_s": statistics.median(s["first_forward_s"] for s in samples),
                    "rss_after_forward_mb": statistics.median(s["rss_after_forward_mb"] for s in samples),
                    "disk_mb": disk_mb(engines[engine]),
                }
            )
    header = ["engine", "dtype", "load s", "peak RSS MB", "RSS loaded MB (min-max)", "on huge pages MB", "1st fwd s",
              "RSS after fwd MB", "weights MB", "disk MB"]  # fmt: skip
    print(f"quantization: {args.quantization}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        low, high = r["rss_loaded_mb_range"]
        cells = [r["engine"], r["dtype"], f"{r['load_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['rss_loaded_mb']:.0f} ({low:.0f}-{high:.0f})", f"{r['huge_pages_mb']:.0f}",
                 f"{r['first_forward_s']:.2f}", f"{r['rss_after_forward_mb']:.0f}", f"{r['weights_mb']:.0f}",
                 f"{r['disk_mb']:.0f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    for r in results:
        if r["decode_ms_per_token"][0] is not None:
            ms = r["decode_ms_per_token"]
            print(f"{r['engine']} {r['dtype']}: decode {statistics.median(ms):.2f} ms/token, per process (in order) "
                  + ", ".join(f"{v:.1f}" for v in ms))  # fmt: skip
    for dtype in args.dtypes:
        pair = {r["engine"]: r for r in results if r["dtype"] == dtype}
        if "transformers" in pair:
            ratio = pair["transformers"]["load_s"] / pair["qwenlm"]["load_s"]
            print(f"{dtype}: qwenlm loads {ratio:.2f}x as fast as transformers")
    print(json.dumps({"bench": "load", "model": str(model), "quantization": args.quantization, "results": results}))
    for folder in (tmp, baseline):
        if folder is not None:
            folder.cleanup()


if __name__ == "__main__":
    main()
