"""One-token (decode) attention over a long KV cache: qwenlm's kernel beside torch's SDPA, in one process.

    python benchmarks/bench_attention.py --depths 512 4096 16384 --rounds 5
    python benchmarks/bench_attention.py --depths 2048 16384 --baseline-rev HEAD~1   # and an older kernel build

Each depth gets enough layers of [1, heads, depth, head_dim] bf16 K/V caches on 2 MiB pages (as the loader
allocates them, model/huge_pages.py) that a round reads ~2.5 GB, far past any cache; every implementation times
the same calls (one per layer, --repeats times), alternating order round by round. Reports ms per layer call,
the K+V bytes read per second, the fraction of the same run's read probe (`measure_bandwidth_gbps`), and the
speed-up of the working tree's kernel over each peer per round (median, min-max). With --baseline-rev, that git
revision's cpu_gemv.cpp and headers are built beside the working tree's (their op namespace renamed), and
outputs are checked equal bit for bit first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_builds import load_kernel_build

from qwenlm import kernels
from qwenlm.bench import measure_bandwidth_gbps
from qwenlm.kernels import cpu as kcpu
from qwenlm.model import huge_pages


def baseline_op(rev: str, build_root: Path) -> Callable:
    """`decode_attention` as built from `rev`'s sources, registered as torch.ops.qwenlm_baseline."""
    return load_kernel_build(rev, "qwenlm_baseline", build_root).decode_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gigabytes", type=float, default=2.5, help="K/V bytes per round")
    parser.add_argument("--baseline-rev", help="also time decode_attention as built from this git revision")
    parser.add_argument("--no-sdpa", action="store_true", help="leave torch's SDPA out (slow at long depths)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.layer_kernels_available():
        raise SystemExit(f"qwenlm's CPU kernels are not available here: {kernels.kernels_status()}")
    H, D = args.heads, args.head_dim
    scale = D**-0.5
    ours = kcpu._layer_op("decode_attention")  # AVX-512's kernel, or AVX2's on CPUs without AVX-512
    impls: dict[str, Callable] = {"qwenlm": lambda q, k, v: ours(q, k, v, scale, None)}
    if not args.no_sdpa:
        impls["torch sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    with tempfile.TemporaryDirectory(prefix="bench_attention_") as tmp:
        if args.baseline_rev:
            old = baseline_op(args.baseline_rev, Path(tmp))
            impls[f"qwenlm @ {args.baseline_rev}"] = lambda q, k, v: old(q, k, v, scale, None)
        probe = measure_bandwidth_gbps(size_mb=2048)
        rows = []
        for T in args.depths:
            per_layer = 2 * H * T * D * 2
            layers = max(2, int(args.gigabytes * 1e9 // per_layer))
            caches = []
            for _ in range(layers):
                k, v = (huge_pages.empty((1, H, T, D), torch.bfloat16).normal_() for _ in range(2))
                caches.append((k, v))
            q = torch.randn(1, H, 1, D).bfloat16()
            with torch.inference_mode():
                first = {name: f(q, *caches[0]) for name, f in impls.items()}
                for name, out in first.items():
                    if name.startswith("qwenlm @") and not torch.equal(out, first["qwenlm"]):
                        raise SystemExit(f"{name} gives different outputs at depth {T}")
                times: dict[str, list[float]] = {name: [] for name in impls}
                order = list(impls)
                for r in range(args.rounds):
                    for name in order if r % 2 == 0 else order[::-1]:
                        f = impls[name]
                        start = time.perf_counter()
                        for _ in range(args.repeats):
                            for k, v in caches:
                                f(q, k, v)
                        times[name].append((time.perf_counter() - start) / (args.repeats * layers))
            for name, ts in times.items():
                ratios = [p / o for p, o in zip(ts, times["qwenlm"], strict=True)]
                med = statistics.median(ts)
                rows.append({"depth": T, "impl": name, "ms": med * 1e3, "GBps": per_layer / med / 1e9,
                             "fraction": per_layer / med / 1e9 / probe, "speedup_of_qwenlm": statistics.median(ratios),
                             "speedup_min": min(ratios), "speedup_max": max(ratios)})  # fmt: skip
            del caches
    print(f"{args.threads} threads, {H} heads x {D} dims, bf16 K/V on 2 MiB pages, {args.rounds} rounds; "
          f"read probe {probe:.1f} GB/s")  # fmt: skip
    print(f"{'depth':>6} {'impl':<24} {'ms/layer':>9} {'GB/s':>6} {'fraction':>8}  qwenlm's speed-up (min-max)")
    for r in rows:
        lo, hi = r["speedup_min"], r["speedup_max"]
        ratio = "" if r["impl"] == "qwenlm" else f"{r['speedup_of_qwenlm']:.3f}x ({lo:.3f}-{hi:.3f})"
        print(f"{r['depth']:>6} {r['impl']:<24} {r['ms']:>9.3f} {r['GBps']:>6.1f} {r['fraction']:>8.2f}  {ratio}")
    print(json.dumps({"args": vars(args), "probe_GBps": probe, "rows": rows}))


if __name__ == "__main__":
    main()
