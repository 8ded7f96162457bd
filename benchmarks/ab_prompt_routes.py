"""A prompt's speed through the AVX2 GEMM against the routes it replaced, alternated round by round in one process.

On CPUs where the AVX2 kernels stand in (x86 without AVX-512), a prompt's linears used to go through the row
kernels (which re-read a weight row for every 4 activation rows) up to 32 rows (quantized weights, bf16
activations) or 48 (bf16 weights), and through torch's fp32 GEMM on the weight made dense in slabs beyond. Now the
row kernels stop at kernels.cpu.AVX2_INT_MAX_ROWS / AVX2_DENSE_MAX_ROWS and the blocked GEMM (gemm_quantized,
gemm_bf16) takes the rows up to AVX2_GEMM_MAX_ROWS. Both routes run the same model in the same process, one
after the other for every prompt length and round, so the host's drift falls on both alike:

    python benchmarks/ab_prompt_routes.py --model /tmp/q18/ckpt --quantization int4 --prompt-len 16 128 512

Reported: prefill tokens/s per route (median over rounds) and the new route's speed-up, median (min-max) of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from qwenlm.bench import BenchSettings, load_qwenlm
from qwenlm.kernels import cpu as kcpu

sys.path.insert(0, str(Path(__file__).parent))
from versus_llamacpp import qwenlm_rates  # noqa: E402

# The row limits before the GEMM (commit cb10bcd's kernels/cpu.py); 0 rows: the GEMM takes none.
BEFORE = {"AVX2_INT_MAX_ROWS": 32, "AVX2_DENSE_MAX_ROWS": 48, "AVX2_GEMM_MAX_ROWS": 0}


@contextlib.contextmanager
def routes(limits: dict[str, int]) -> Iterator[None]:
    """kernels.cpu's row limits set to `limits` for the duration (an empty dict: as shipped)."""
    saved = {name: getattr(kcpu, name) for name in limits}
    for name, value in limits.items():
        setattr(kcpu, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kcpu, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--quantization", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not kcpu.avx2_kernel_available():
        raise SystemExit("the AVX2 kernels are not the ones in use on this CPU (or did not build): nothing to compare")
    torch.set_num_threads(args.threads)
    settings = BenchSettings(model=args.model, dtype=args.dtype, quantization=args.quantization, threads=args.threads)
    model = load_qwenlm(args.model, settings)
    qwenlm_rates(model, 16, 2, args.seed)  # warm-up
    rates: dict[int, dict[str, list[float]]] = {n: {"before": [], "after": []} for n in args.prompt_len}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        for n in args.prompt_len:
            for name, limits in (("before", BEFORE), ("after", {})):
                with routes(limits):
                    rates[n][name].append(qwenlm_rates(model, n, 2, args.seed + r)[0])
    weights = args.dtype if args.quantization == "none" else args.quantization
    print(f"{weights} weights, {args.dtype} activations, {args.threads} threads, {args.rounds} rounds")
    print(f"{'prompt':>8} {'before tok/s':>13} {'after tok/s':>12}  speed-up median (min-max)")
    rows = []
    for n, by_route in rates.items():
        ratios = [a / b for a, b in zip(by_route["after"], by_route["before"], strict=True)]
        before, after = statistics.median(by_route["before"]), statistics.median(by_route["after"])
        print(f"{n:>8} {before:>13.2f} {after:>12.2f}  {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
        rows.append({"prompt_len": n, "before": by_route["before"], "after": by_route["after"], "ratios": ratios})
    print(json.dumps({"args": vars(args), "torch": torch.__version__, "results": rows}))


if __name__ == "__main__":
    main()
