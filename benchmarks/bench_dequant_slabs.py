"""Quantized linears with many rows: the whole weight dequantized at once against slabs dequantized while cached.

    python benchmarks/bench_dequant_slabs.py --rows 17 33 64 512 --rounds 7

Above `QUANT_MAX_ROWS` activation rows (int8 16, int4/int6 32 with bf16 activations) a quantized linear
dequantizes its weight and runs the dense path (`kernels.cpu.dequantized_linear`). It used to dequantize the whole
weight at once; for lm_head (151,936 x 2048, 622 MB of bf16) that copy cannot stay in cache and the GEMM reads it
back from DRAM. Now a weight whose dense copy exceeds `DEQUANT_WHOLE_MAX_BYTES` is done in slabs of output rows.
This times the two, and the quantized kernel for reference, alternated round by round on the same weight (bf16
activations, Qwen-1.8B and Qwen-7B shapes), and reports ms per call and the whole / slabs ratio per round
(median, min-max).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_kernels import _random_codes, on_huge_pages

from qwenlm.kernels import QuantizedWeight, dequantize, linear, pack_quantized
from qwenlm.kernels.cpu import dequantized_linear, kernels_available, kernels_status

SHAPES = {
    "lm_head": (151936, 2048), "c_attn": (6144, 2048), "mlp.c_proj": (2048, 5504),  # Qwen-1.8B
    "7b.c_attn": (12288, 4096), "7b.mlp.c_proj": (4096, 11008),  # Qwen-7B
}  # fmt: skip
SCHEMES = {"int8": (8, -1), "int4 g128": (4, 128), "int6 g128": (6, 128)}


def whole(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The previous path: the whole weight dequantized, then the dense path."""
    return linear(x, dequantize(qw, x.dtype))


def kernel(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    op = getattr(torch.ops.qwenlm_kernels, f"linear_int{qw.bits}")
    return op(x, qw.qdata, qw.scales, qw.zeros, qw.kernel_group, qw.in_features, None)


def weight(n: int, k: int, bits: int, group: int) -> QuantizedWeight:
    """Random codes packed as the loader packs them, on huge pages (group -1: per channel)."""
    size = k if group == -1 else group
    qw = pack_quantized(*_random_codes(n, k, bits, size), bits=bits, group_size=size)
    return QuantizedWeight(*on_huge_pages((qw.qdata, qw.scales, qw.zeros)), bits, size, k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["lm_head", "7b.c_attn", "7b.mlp.c_proj"], choices=list(SHAPES),
                   help="default: the weights that go in slabs (the 1.8B block linears stay whole)")  # fmt: skip
    p.add_argument("--schemes", nargs="+", default=["int8", "int4 g128"], choices=list(SCHEMES))
    p.add_argument("--rows", nargs="+", type=int, default=[17, 33, 64, 512])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels_available():
        raise SystemExit(f"kernels unavailable: {kernels_status()}")
    paths = {"whole": whole, "slabs": dequantized_linear, "kernel": kernel}
    print(f"{args.threads} threads, {args.rounds} rounds; ms per call, median (min-max)")
    print("| shape | weights | rows | whole weight | slabs | quantized kernel | whole / slabs per round |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for shape in args.shapes:
            n, k = SHAPES[shape]
            for scheme in args.schemes:
                qw = weight(n, k, *SCHEMES[scheme])
                for m in args.rows:
                    x = torch.randn(m, k).bfloat16()
                    torch.testing.assert_close(dequantized_linear(x, qw), whole(x, qw))
                    ms: dict[str, list[float]] = {name: [] for name in paths}
                    order = list(paths)
                    for r in range(args.rounds + 1):
                        for name in order if r % 2 else order[::-1]:
                            start = time.perf_counter()
                            paths[name](x, qw)
                            if r:  # round 0 warms up
                                ms[name].append((time.perf_counter() - start) * 1e3)
                    ratios = [a / b for a, b in zip(ms["whole"], ms["slabs"], strict=True)]
                    cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in ms.values()]
                    print(f"| {shape} | {scheme} | {m} | " + " | ".join(cells)
                          + f" | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
