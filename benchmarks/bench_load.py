"""Load time and peak memory of a checkpoint: qwenlm beside transformers' Qwen2ForCausalLM (same weights,
converted) in the same run. Each load runs in a fresh process so its peak RSS is its own.

    python benchmarks/bench_load.py --model /tmp/q18 [--dtypes float32 bfloat16] [--repeats 3]
    python benchmarks/bench_load.py --make-preset 1.8b --model /tmp/q18   # writes the checkpoint first

Prints a table, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: that survives fork+exec, so a child
    would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_now_mb() -> float:
    return _status_mb("VmRSS")


def worker(engine: str, model: str, dtype: str) -> None:
    """Load once in this process and print {load_s, peak_rss_mb, base_rss_mb} as JSON."""
    import torch

    torch.set_num_threads(2)
    base = _rss_now_mb()  # after importing torch
    start = time.perf_counter()
    if engine == "qwenlm":
        from qwenlm.model import load_model

        model_obj = load_model(model, torch_dtype=dtype, device_map="cpu", progress=False)
    else:
        from transformers import Qwen2ForCausalLM

        model_obj = Qwen2ForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    params = sum(p.numel() * p.element_size() for p in model_obj.parameters())
    start = time.perf_counter()
    with torch.no_grad():  # touches every weight once: mmap-backed pages are resident after this
        model_obj(torch.arange(16)[None])
    forward_s = time.perf_counter() - start
    print(json.dumps({"load_s": load_s, "peak_rss_mb": peak, "base_rss_mb": base, "weights_mb": params / 2**20,
                      "first_forward_s": forward_s, "rss_after_forward_mb": _rss_now_mb()}))  # fmt: skip


def run_case(engine: str, model: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model), "--dtypes", dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def disk_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Qwen v1 checkpoint folder")
    parser.add_argument("--make-preset", help="first write a random checkpoint of this preset to --model")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.dtypes[0])

    model = Path(args.model)
    if args.make_preset:
        from qwenlm.testing import make_random_checkpoint

        make_random_checkpoint(model, preset=args.make_preset, chat=False)
    engines = {"qwenlm": model}
    tmp = None
    if not args.no_peer:
        from qwenlm.convert import convert_to_qwen2

        tmp = tempfile.TemporaryDirectory(prefix="qwen2-", dir=model.parent)
        engines["transformers"] = convert_to_qwen2(model, tmp.name)

    results = []
    for dtype in args.dtypes:
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for _ in range(args.repeats):  # interleaved, so drift in the page cache hits both alike
            for engine, folder in engines.items():
                runs[engine].append(run_case(engine, folder, dtype))
        for engine, samples in runs.items():
            results.append(
                {
                    "engine": engine,
                    "dtype": dtype,
                    "load_s": statistics.median(s["load_s"] for s in samples),
                    "peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in samples),
                    "base_rss_mb": statistics.median(s["base_rss_mb"] for s in samples),
                    "weights_mb": samples[0]["weights_mb"],
                    "first_forward_s": statistics.median(s["first_forward_s"] for s in samples),
                    "rss_after_forward_mb": statistics.median(s["rss_after_forward_mb"] for s in samples),
                    "disk_mb": disk_mb(engines[engine]),
                }
            )
    header = ["engine", "dtype", "load s", "peak RSS MB", "1st fwd s", "RSS after fwd MB", "weights MB", "disk MB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [r["engine"], r["dtype"], f"{r['load_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['first_forward_s']:.2f}", f"{r['rss_after_forward_mb']:.0f}", f"{r['weights_mb']:.0f}",
                 f"{r['disk_mb']:.0f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    for dtype in args.dtypes:
        pair = {r["engine"]: r for r in results if r["dtype"] == dtype}
        if "transformers" in pair:
            ratio = pair["transformers"]["load_s"] / pair["qwenlm"]["load_s"]
            print(f"{dtype}: qwenlm loads {ratio:.2f}x as fast as transformers")
    print(json.dumps({"bench": "load", "model": str(model), "results": results}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
