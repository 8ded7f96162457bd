"""The matrix-vector kernels of two source versions, timed alternately in one process.

    python benchmarks/ab_kernels.py --base HEAD --rounds 100
    python benchmarks/ab_kernels.py --base 2c7fc11 --kinds int8:dpbf16,int4:dpbf16 --fast 45
    python benchmarks/ab_kernels.py --base HEAD~2 --resident --rounds 20
    python benchmarks/ab_kernels.py --lib avx2 --base HEAD --kinds int4,int6 --rounds 20 --fast 0

On a host whose memory speed swings from one minute to the next (the AMD host: 35-63 GB/s), two runs in
separate processes compare host phases more than kernels. This builds `qwenlm/kernels/cpu_gemv.cpp` as it is at
git revision `--base` and as it is in the working tree, each as its own op library (the TORCH_LIBRARY namespace
renamed, so both load into one process), and times them round by round on the same weights: one M=1 linear of
the Qwen-1.8B c_attn shape (2048 -> 6144) per call, cycling through 2 GiB of weight copies on 2 MiB pages so
every call streams from DRAM, as decoding does. Per kind (bf16 dense, int8 per channel, int4 g128; each
quantized one under the dpbf16 or vnni kernel) it reports GB/s of weights and the per-round ratio
working tree / base (median, min-max), over all rounds and over the "fast" rounds where the base's bf16 kernel
read more than `--fast` GB/s (in the slow phases every kernel waits on memory and the ratios sit at 1.0).
With `--resident` every call reads the same 2048-row weight, which stays in the L3 cache: the kernels' compute
rate, which tells whether a kernel could keep up with a faster memory at all. With `--lib avx2` the same is done
for `qwenlm/kernels/cpu_gemv_avx2.cpp` (the kernels of CPUs without AVX-512: bf16, int8, int4 g128, int6 g128;
the quantized kinds with bf16 activations, as decoding calls them).
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
from kernel_builds import load_kernel_build

from qwenlm.kernels import pack_quantized
from qwenlm.kernels.cpu import _avx2_order
from qwenlm.model import huge_pages

KINDS = {
    "avx512": ("bf16", "int8:dpbf16", "int8:vnni", "int4:dpbf16", "int4:vnni"),
    "avx2": ("bf16", "int8", "int4", "int6"),
}
NAMESPACES = {"avx512": "qwenlm_ab", "avx2": "qwenlm_ab_avx2"}
N, K = 6144, 2048  # c_attn of Qwen-1.8B
CYCLE_BYTES = 2 * 2**30
RESIDENT_N = 2048  # --resident: 2048 rows (8 MB of bf16, 4 MB of int8, 2 MB of int4), within the L3 cache


def _weights(kind: str, resident: bool) -> tuple[list[tuple[torch.Tensor, ...]], int, int]:
    """Copies of one weight of this kind (on huge pages, CYCLE_BYTES in all; with `resident`, the first RESIDENT_N
    rows of one copy, repeated), its bytes as called, and its kernel group."""
    gen = torch.Generator().manual_seed(0)
    if kind == "bf16":
        one: tuple[torch.Tensor, ...] = (torch.randn(N, K, generator=gen).bfloat16(),)
        group = 0
    else:
        bits = int(kind[3])
        group = K if bits == 8 else 128
        q = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=gen)
        scales = torch.rand(N, K // group, generator=gen) * 0.01 + 1e-3
        zeros = torch.randint(0, 1 << bits, (N, K // group), generator=gen).to(torch.int16)
        packed = pack_quantized(q, scales, zeros, bits=bits, group_size=group)
        one = (packed.qdata, packed.scales, packed.zeros)
        group = packed.kernel_group
    if resident:
        one = tuple(huge_pages.copy(t[:RESIDENT_N]) for t in one)
        return [one] * 256, one[0].numel() * one[0].element_size(), group
    nbytes = sum(t.numel() * t.element_size() for t in one)
    copies = [tuple(huge_pages.copy(t) for t in one) for _ in range(max(1, CYCLE_BYTES // nbytes))]
    return copies, one[0].numel() * one[0].element_size(), group


def _call(ops, kind: str, x: torch.Tensor, group: int) -> Callable[..., torch.Tensor]:
    if hasattr(ops, "linear_quantized"):  # the AVX2 library
        if kind == "bf16":
            return lambda w: ops.linear_bf16(x, w, None)
        bits = int(kind[3])
        order = _avx2_order(bits, group)
        return lambda q, s, z: ops.linear_quantized(x, order, q, s, z, bits, group, None, False)
    if kind == "bf16":
        return lambda w: ops.linear_dense(x, w, None)
    op = ops.linear_int8 if kind.startswith("int8") else ops.linear_int4
    return lambda q, s, z: op(x, q, s, z, group, K, None)


def rate(ops, kind: str, copies, nbytes: int, group: int, x: torch.Tensor) -> float:
    """GB/s of weight (codes only for the quantized kinds) over two passes through the copies."""
    if ":" in kind:
        ops.set_quant_kernel(1 if kind.endswith("vnni") else 0)
    call = _call(ops, kind, x, group)
    for c in copies[:3]:
        call(*c)
    t0 = time.perf_counter()
    for _ in range(2):
        for c in copies:
            call(*c)
    return nbytes * 2 * len(copies) / (time.perf_counter() - t0) / 1e9


def summary(values: list[float], ratios: list[float] | None = None) -> str:
    text = f"{statistics.median(values):6.1f} GB/s ({min(values):.1f}-{max(values):.1f})"
    if ratios:
        text += f"  tree/base {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--lib", default="avx512", choices=list(KINDS), help="which op library to compare")
    parser.add_argument("--kinds", default="", help="comma-separated subset of the library's KINDS (default: all)")
    parser.add_argument("--fast", type=float, default=45.0, help="GB/s of the base's bf16 kernel for a 'fast' round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--resident",
        action="store_true",
        help="time one cache-resident weight (the kernels' compute rate, nearly free of the host's memory phases)",
    )
    args = parser.parse_args()
    known = KINDS[args.lib]
    kinds = [k for k in args.kinds.split(",") if k] or list(known)
    unknown = sorted(set(kinds) - set(known))
    if unknown:
        raise SystemExit(f"unknown kinds {unknown} for --lib {args.lib}; choose from {', '.join(known)}")
    if "bf16" not in kinds:
        kinds.insert(0, "bf16")  # the phase marker
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        versions = {
            "base": load_kernel_build(args.base, f"{NAMESPACES[args.lib]}_base", Path(tmp), args.lib),
            "tree": load_kernel_build(None, f"{NAMESPACES[args.lib]}_tree", Path(tmp), args.lib),
        }
    x = torch.randn(1, K).bfloat16()
    weights = {kind: _weights(kind, args.resident) for kind in kinds}
    res: dict[tuple[str, str], list[float]] = {(v, k): [] for v in versions for k in kinds}
    with torch.inference_mode():
        for r in range(args.rounds):
            order = list(versions) if r % 2 == 0 else list(versions)[::-1]
            for kind in kinds:
                for v in order:
                    res[(v, kind)].append(rate(versions[v], kind, *weights[kind], x))
    fast = [r for r in range(args.rounds) if res[("base", "bf16")][r] > args.fast]
    print(f"working tree against {args.base}, {args.rounds} rounds ({len(fast)} fast: base bf16 > {args.fast} GB/s)")
    for kind in kinds:
        ratios = [a / b for a, b in zip(res[("tree", kind)], res[("base", kind)], strict=True)]
        print(f"{kind:12s} base {summary(res[('base', kind)])}")
        print(f"{'':12s} tree {summary(res[('tree', kind)], ratios)}")
        if fast:
            fr = [ratios[r] for r in fast]
            print(f"{'':12s} fast rounds: tree {summary([res[('tree', kind)][r] for r in fast], fr)}")
    print(json.dumps({"base": args.base, "fast": fast, "results": {f"{v}|{k}": x for (v, k), x in res.items()}}))


if __name__ == "__main__":
    main()
