"""Benchmark the CPU matrix-vector kernels against torch on the Qwen-1.8B linear shapes.

    python benchmarks/bench_kernels.py                     # table, 2 threads, M in {1, 4, 16}
    python benchmarks/bench_kernels.py --m 1 --shapes c_attn --impls kernel_bf16,torch_bf16 --json
    python benchmarks/bench_kernels.py --m 1,4,16 --impls kernel_int8,kernel_int4_g128 --quant-kernels dpbf16,vnni
    python benchmarks/bench_kernels.py --m 1 --impls avx2_int4_g128,avx2_int4_g128_f32x,torch_bf16,avx2_bf16

The kernel_* impls need the AVX-512 kernels; the avx2_* ones (cpu_gemv_avx2.cpp, for CPUs without AVX-512) run
on any AVX2 CPU, the AVX-512 hosts included. avx2_*_f32x time their fp32-activation path, the others the integer
path that bf16 activations take; avx2_*_blocked time the GEMM that a prompt's rows take (more than
kernels.cpu.AVX2_INT_MAX_ROWS / AVX2_DENSE_MAX_ROWS).

For each shape, M (rows) and implementation it reports the weight bytes streamed per second (GB/s: bytes
of the stored weight incl. scales/zeros, divided by the time per call) and the time per call (best of
several repeats, since the machine may be shared). Calls cycle through copies of the weight (>= 256 MB in
all) so that, as in decoding, weights come from DRAM, not cache. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenlm.kernels import QuantizedWeight, dequantize, kernels_status, load_kernels, pack_quantized
from qwenlm.kernels import cpu as kcpu
from qwenlm.kernels.cpu import QUANT_KERNELS, dequantized_linear, set_quant_kernel
from qwenlm.model import huge_pages

SHAPES = {  # name: (N = out_features, K = in_features)
    "c_attn": (6144, 2048),
    "attn.c_proj": (2048, 2048),
    "w1/w2": (5504, 2048),
    "mlp.c_proj": (2048, 5504),
    "lm_head": (151936, 2048),
}


# Every timed call reads a different copy of the weight, with at least this many bytes across the copies, so
# the weights stream from DRAM as in real decoding (one token reads every layer once) instead of sitting in
# the L3 cache between calls (32 MB on the AMD host, 480 MB on the AMX host: 256 MB cycles there were partly
# served from L3 and overstated every kernel by up to a fifth).
MIN_BYTES_PER_CYCLE = 2 * 2**30


@dataclass
class Case:
    """make() -> the weight tensors of one copy; call(x, *tensors) runs one matrix-vector product; quant_kernel:
    the quantized-linear kernel for bf16 activations to time it under (QUANT_KERNELS; None: the default)."""

    make: Callable[[], tuple[torch.Tensor, ...]]
    call: Callable[..., torch.Tensor]
    quant_kernel: str | None = None


def _nbytes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _random_codes(n: int, k: int, bits: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3
    zeros = torch.randint(0, 1 << bits, (n, k // group), generator=gen).to(torch.int16)
    return q, scales, zeros


def _torch_dense(n: int, k: int, dtype: torch.dtype) -> Case:
    return Case(lambda: (torch.randn(n, k, dtype=dtype),), lambda x, w: F.linear(x.to(dtype), w))


def _kernel_dense(n: int, k: int, wdtype: torch.dtype, xdtype: torch.dtype) -> Case:
    op = torch.ops.qwenlm_kernels.linear_dense
    return Case(lambda: (torch.randn(n, k, dtype=wdtype),), lambda x, w: op(x.to(xdtype), w, None))


def _torch_int8(n: int, k: int) -> Case:
    # torch's op is per-channel symmetric: int8 codes, one scale per row (same dtype as x).
    def make():
        return torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)

    return Case(make, lambda x, w, s: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w, s))


def _torch_int4(n: int, k: int, group: int) -> Case:
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)

    def make():
        return packed.clone(), torch.rand(k // group, n, 2, dtype=torch.bfloat16)

    return Case(make, lambda x, p, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p, group, sz))


def _kernel_quant(n: int, k: int, bits: int, group: int, xdtype: torch.dtype, kernel: str | None = None) -> Case:
    """kernel: which quantized-linear kernel runs bf16 activations (QUANT_KERNELS; None: the process default)."""
    qw = pack_quantized(*_random_codes(n, k, bits, group), bits=bits, group_size=group)
    op = getattr(torch.ops.qwenlm_kernels, f"linear_int{bits}")

    def make():
        return qw.qdata.clone(), qw.scales.clone(), qw.zeros.clone()

    return Case(make, lambda x, q, s, z: op(x.to(xdtype), q, s, z, qw.kernel_group, k, None), kernel)


def _avx2_quant(n: int, k: int, bits: int, group: int, xdtype: torch.dtype, op: str = "linear_quantized") -> Case:
    """An AVX2 op through its wrapper (kernels.cpu._avx2_linear), as linear_quantized calls it there: the row
    kernel, or (op="gemm_quantized") the blocked GEMM of a prompt's rows."""
    qw = pack_quantized(*_random_codes(n, k, bits, group), bits=bits, group_size=group)

    def make():
        return qw.qdata.clone(), qw.scales.clone(), qw.zeros.clone()

    def call(x, q, s, z):
        return kcpu._avx2_linear(x.to(xdtype), QuantizedWeight(q, s, z, bits, qw.kernel_group, k), None, op=op)

    return Case(make, call)


def _avx2_bf16(n: int, k: int, route: str) -> Case:
    """bf16 weights where the AVX2 kernels stand in: `linear` as it routes the rows ("auto"), the row op for any
    number of rows ("op", 4 at a time per weight row), the blocked GEMM ("blocked"), or torch's fp32 GEMM in slabs
    ("gemm")."""

    def call(x, w):
        x = x.bfloat16()
        if route == "op":
            return torch.ops.qwenlm_avx2.linear_bf16(x, w, None)
        if route == "gemm":
            return kcpu.bf16_linear_in_fp32(x, w, None)
        if route == "blocked":
            return torch.ops.qwenlm_avx2.gemm_bf16(x, w, None)
        return kcpu.linear(x, w)

    return Case(lambda: (torch.randn(n, k).bfloat16(),), call)


def _dequant_linear(n: int, k: int, bits: int, group: int, slabs: bool = False) -> Case:
    """The large-M fallback of linear_quantized (to locate the crossover): with `slabs`, as it runs
    (`dequantized_linear`: slabs of rows dequantized while cached), else the whole weight dequantized to bf16 +
    F.linear (what it did before)."""
    qw = pack_quantized(*_random_codes(n, k, bits, group), bits=bits, group_size=group)

    def make():
        return qw.qdata.clone(), qw.scales.clone(), qw.zeros.clone()

    def call(x, q, s, z):
        weight = QuantizedWeight(q, s, z, bits, group, k)
        if slabs:
            return dequantized_linear(x.bfloat16(), weight)
        return F.linear(x.bfloat16(), dequantize(weight, torch.bfloat16))

    return Case(make, call)


IMPLS: dict[str, Callable[[int, int], Case]] = {
    "torch_f32": lambda n, k: _torch_dense(n, k, torch.float32),
    "torch_bf16": lambda n, k: _torch_dense(n, k, torch.bfloat16),
    "kernel_f32": lambda n, k: _kernel_dense(n, k, torch.float32, torch.float32),
    "kernel_f32x_bf16w": lambda n, k: _kernel_dense(n, k, torch.bfloat16, torch.float32),
    "kernel_bf16": lambda n, k: _kernel_dense(n, k, torch.bfloat16, torch.bfloat16),
    "torch_int8pack": _torch_int8,
    "kernel_int8": lambda n, k: _kernel_quant(n, k, 8, k, torch.bfloat16),
    "kernel_int8_f32x": lambda n, k: _kernel_quant(n, k, 8, k, torch.float32),
    "kernel_int8_g128": lambda n, k: _kernel_quant(n, k, 8, 128, torch.bfloat16),
    "torch_int4pack_g128": lambda n, k: _torch_int4(n, k, 128),
    "kernel_int4_g128": lambda n, k: _kernel_quant(n, k, 4, 128, torch.bfloat16),
    "kernel_int4_g32": lambda n, k: _kernel_quant(n, k, 4, 32, torch.bfloat16),
    "kernel_int4_g128_f32x": lambda n, k: _kernel_quant(n, k, 4, 128, torch.float32),
    "kernel_int6_g128": lambda n, k: _kernel_quant(n, k, 6, 128, torch.bfloat16),
    "dequant_linear_int4_g128": lambda n, k: _dequant_linear(n, k, 4, 128),
    "dequant_linear_int8": lambda n, k: _dequant_linear(n, k, 8, k),
    "slabs_linear_int8": lambda n, k: _dequant_linear(n, k, 8, k, slabs=True),
    "slabs_linear_int4_g128": lambda n, k: _dequant_linear(n, k, 4, 128, slabs=True),
    "slabs_linear_int6_g128": lambda n, k: _dequant_linear(n, k, 6, 128, slabs=True),
    "avx2_bf16": lambda n, k: _avx2_bf16(n, k, "auto"),
    "avx2_bf16_op": lambda n, k: _avx2_bf16(n, k, "op"),
    "avx2_bf16_gemm": lambda n, k: _avx2_bf16(n, k, "gemm"),
    "avx2_int8": lambda n, k: _avx2_quant(n, k, 8, k, torch.bfloat16),
    "avx2_int8_f32x": lambda n, k: _avx2_quant(n, k, 8, k, torch.float32),
    "avx2_int4_g128": lambda n, k: _avx2_quant(n, k, 4, 128, torch.bfloat16),
    "avx2_int4_g128_f32x": lambda n, k: _avx2_quant(n, k, 4, 128, torch.float32),
    "avx2_int6_g128": lambda n, k: _avx2_quant(n, k, 6, 128, torch.bfloat16),
    "avx2_int6_g128_f32x": lambda n, k: _avx2_quant(n, k, 6, 128, torch.float32),
    "avx2_bf16_blocked": lambda n, k: _avx2_bf16(n, k, "blocked"),
    "avx2_int8_blocked": lambda n, k: _avx2_quant(n, k, 8, k, torch.bfloat16, "gemm_quantized"),
    "avx2_int4_g128_blocked": lambda n, k: _avx2_quant(n, k, 4, 128, torch.bfloat16, "gemm_quantized"),
    "avx2_int6_g128_blocked": lambda n, k: _avx2_quant(n, k, 6, 128, torch.bfloat16, "gemm_quantized"),
}
# The kernel impls whose bf16 activations go through the selectable quantized-linear kernel (--quant-kernels).
BF16_QUANT_IMPLS: dict[str, Callable[[str], Callable[[int, int], Case]]] = {
    "kernel_int8": lambda kernel: lambda n, k: _kernel_quant(n, k, 8, k, torch.bfloat16, kernel),
    "kernel_int8_g128": lambda kernel: lambda n, k: _kernel_quant(n, k, 8, 128, torch.bfloat16, kernel),
    "kernel_int4_g128": lambda kernel: lambda n, k: _kernel_quant(n, k, 4, 128, torch.bfloat16, kernel),
    "kernel_int4_g32": lambda kernel: lambda n, k: _kernel_quant(n, k, 4, 32, torch.bfloat16, kernel),
    "kernel_int6_g128": lambda kernel: lambda n, k: _kernel_quant(n, k, 6, 128, torch.bfloat16, kernel),
}
DEFAULT_IMPLS = [
    "torch_f32", "torch_bf16", "kernel_f32", "kernel_f32x_bf16w", "kernel_bf16", "torch_int8pack", "kernel_int8",
    "torch_int4pack_g128", "kernel_int4_g128", "kernel_int4_g32",
]  # fmt: skip


def time_call(fn: Callable[[], torch.Tensor], min_time: float, repeats: int, clock: Callable[[], float]) -> float:
    """Best mean time per call over `repeats` batches of calls lasting about min_time each."""
    fn()
    t0 = clock()
    fn()
    one = max(clock() - t0, 1e-6)
    calls = max(1, int(min_time / one))
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - t0) / calls)
    return best


def on_huge_pages(tensors: tuple) -> tuple:
    """Copies of the weights, placed as the loader places them (qwenlm.model.huge_pages: 2 MiB pages)."""
    return tuple(huge_pages.copy(t) if isinstance(t, torch.Tensor) else t for t in tensors)


def run(
    shapes: list[str], ms: list[int], impls: list[str], min_time: float, repeats: int, clock: Callable[[], float]
) -> list[dict]:
    results = []
    with torch.inference_mode():
        for shape in shapes:
            n, k = SHAPES[shape]
            for impl in impls:
                case = IMPLS[impl](n, k)
                first = on_huge_pages(case.make())
                nbytes = _nbytes(first)
                copies = [first] + [on_huge_pages(first) for _ in range(-(-MIN_BYTES_PER_CYCLE // nbytes) - 1)]
                for m in ms:
                    x = torch.randn(m, k)
                    state = {"i": 0}

                    def call(x=x, copies=copies, state=state, case=case):
                        state["i"] = (state["i"] + 1) % len(copies)
                        return case.call(x, *copies[state["i"]])

                    previous = set_quant_kernel(case.quant_kernel) if case.quant_kernel else None
                    try:
                        t = time_call(call, min_time, repeats, clock)
                    finally:
                        if previous is not None:
                            set_quant_kernel(previous)
                    results.append(
                        {"shape": shape, "N": n, "K": k, "M": m, "impl": impl, "us": t * 1e6, "GBps": nbytes / t / 1e9}
                    )
                del copies, first
    return results


def print_table(results: list[dict], ms: list[int]) -> None:
    for shape in dict.fromkeys(r["shape"] for r in results):
        rows = [r for r in results if r["shape"] == shape]
        n, k = rows[0]["N"], rows[0]["K"]
        print(f"\n{shape}: {k} -> {n}")
        print(f"  {'impl':<26}" + "".join(f"{'M=' + str(m):>22}" for m in ms))
        for impl in dict.fromkeys(r["impl"] for r in rows):
            cells = {r["M"]: r for r in rows if r["impl"] == impl}
            line = "".join(f"{cells[m]['GBps']:>9.1f} GB/s {cells[m]['us']:>7.0f}us" for m in ms)
            print(f"  {impl:<26}{line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    p.add_argument("--m", default="1,4,16", help="comma-separated row counts")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.1, help="seconds per timed batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="thread: CPU time of this thread (with --threads 1 this discounts time lost to other processes)",
    )
    p.add_argument(
        "--quant-kernels",
        default="",
        help=f"comma-separated subset of {','.join(QUANT_KERNELS)}: run each bf16-activation quantized impl "
        "(kernel_int8, kernel_int4_*) under each of these kernels, as impl[kernel] (default: the CPU's choice)",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args()
    for kernel in filter(None, args.quant_kernels.split(",")):
        if kernel not in QUANT_KERNELS:
            raise SystemExit(f"--quant-kernels: {kernel!r} is not one of {', '.join(QUANT_KERNELS)}")
    torch.set_num_threads(args.threads)
    impls = args.impls.split(",")
    if any(i.startswith("kernel_") for i in impls) and not load_kernels():
        raise SystemExit(f"kernels unavailable: {kernels_status()}")
    if any(i.startswith("avx2_") for i in impls) and not kcpu._load_avx2().ok:
        raise SystemExit(f"AVX2 kernels unavailable: {kcpu._load_avx2().status}")
    ms = [int(m) for m in args.m.split(",")]
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread needs --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.quant_kernels:
        per_kernel = [i for i in impls if i in BF16_QUANT_IMPLS]
        impls = [i for i in impls if i not in per_kernel]
        for name in per_kernel:
            for kernel in args.quant_kernels.split(","):
                IMPLS[f"{name}[{kernel}]"] = BF16_QUANT_IMPLS[name](kernel)
                impls.append(f"{name}[{kernel}]")
    results = run(args.shapes.split(","), ms, impls, args.min_time, args.repeats, clock)
    if not args.json:
        print(f"threads={args.threads} clock={args.clock} torch={torch.__version__} kernels: {kernels_status()}")
        print_table(results, ms)
    print(json.dumps({"threads": args.threads, "clock": args.clock, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
