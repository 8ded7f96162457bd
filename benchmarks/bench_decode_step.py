"""Where a single-sequence decode step's time goes: the fused native step against the op-by-op forward.

    python benchmarks/bench_decode_step.py --model /tmp/q18/ckpt --quantization int4 --depth 1 --rounds 5

Each round times `--steps` greedy tokens of `generate_steps` (the loop `generate`/`stream` run) with the fused
step (one native call per token, generation/fused.py) and then with QWENLM_FUSED_DECODE=0 (the model's Python
forward per token), after the same `--depth`-token prompt, in one process, alternately. For the fused runs the
step's own clock splits each token into the linear kernels, attention (cache write included) and the rest of
the native step (norms, RoPE, residual adds, SiLU, op calls); what remains of the token's wall time is Python
(the embedding lookup, the call, sampling and stop checks). Reported: medians over rounds, min-max in brackets.

    python benchmarks/bench_decode_step.py --model /tmp/q18/ckpt --quantization int8 --quant-kernels dpbf16,vnni

With `--quant-kernels` each round instead times the fused step once under each listed kernel for quantized
linears (kernels/cpu.py QUANT_KERNELS, switched between runs on the same weights) and reports each one's ms per
token and the per-round ratio of the first kernel's time to each other's (above 1: faster than the first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from qwenlm.bench import BenchSettings, load_qwenlm, random_prompt
from qwenlm.generation import fused
from qwenlm.generation.generate import generate_steps
from qwenlm.generation.params import SamplingParams
from qwenlm.kernels.cpu import QUANT_KERNELS, set_quant_kernel
from qwenlm.quant.linear import QuantLinear


def timed_tokens(model, ids: torch.Tensor, steps: int, use_fused: bool) -> tuple[float, dict | None]:
    """ms per decode step (the tokens after the first) of one greedy generation, and the fused step's split."""
    os.environ["QWENLM_FUSED_DECODE"] = "1" if use_fused else "0"
    params = SamplingParams(max_new_tokens=steps + 1, do_sample=False, eos_token_ids=(), stop_words_ids=())
    made: list[fused.FusedStep] = []
    original = fused.FusedStep.__init__

    def spy(self, m) -> None:  # start the step's clock as soon as generate_steps builds it
        original(self, m)
        self.profile(True)
        made.append(self)

    fused.FusedStep.__init__ = spy
    try:
        with torch.inference_mode():
            stamps = [time.perf_counter() for _ in generate_steps(model, ids, params, compile=False)]
    finally:
        fused.FusedStep.__init__ = original
    ms = (stamps[-1] - stamps[0]) / steps * 1e3
    return ms, (made[0].profile(False) if made else None)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--depth", type=int, default=1, help="prompt tokens before the timed steps")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    kernel_help = f"comma-separated subset of {','.join(QUANT_KERNELS)}: compare these instead"
    parser.add_argument("--quant-kernels", default="", help=kernel_help)
    args = parser.parse_args()
    kernels = [k for k in args.quant_kernels.split(",") if k]
    if any(k not in QUANT_KERNELS for k in kernels) or len(kernels) == 1:
        raise SystemExit(f"--quant-kernels: two or more of {', '.join(QUANT_KERNELS)}")
    torch.set_num_threads(args.threads)
    settings = BenchSettings(model=args.model, dtype=args.dtype, quantization=args.quantization, threads=args.threads)
    model = load_qwenlm(args.model, settings)
    if kernels and not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise SystemExit("--quant-kernels needs quantized linears: --quantization int8/int4, or a GPTQ checkpoint")
    ids = random_prompt(1, args.depth, 0, model.config.vocab_size)
    timed_tokens(model, ids, 4, True)  # warm-up (builds the step library on a first run)
    timed_tokens(model, ids, 4, False)
    if kernels:
        return compare_kernels(model, ids, args, kernels)
    rows: dict[str, list[float]] = {k: [] for k in ("fused", "python", "linear", "attention", "native_other", "py")}
    for r in range(args.rounds):
        ms, split = timed_tokens(model, ids, args.steps, True)
        if split is None:
            raise SystemExit("the fused step did not run this model (see generation.fused.unsupported_reason)")
        rows["fused"].append(ms)
        rows["linear"].append(split["linear_ms"])
        rows["attention"].append(split["attention_ms"])
        rows["native_other"].append(split["other_ms"])
        rows["py"].append(ms - split["linear_ms"] - split["attention_ms"] - split["other_ms"])
        rows["python"].append(timed_tokens(model, ids, args.steps, False)[0])
        print(f"round {r + 1}/{args.rounds}: fused {ms:.2f} ms/token, op by op {rows['python'][-1]:.2f}", flush=True)
    ratios = [p / f for p, f in zip(rows["python"], rows["fused"], strict=True)]
    overhead = [o + p for o, p in zip(rows["native_other"], rows["py"], strict=True)]
    weights = args.quantization if args.quantization != "none" else args.dtype
    print(f"{weights}, depth {args.depth}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps: "
          "ms per token, median (min-max)")  # fmt: skip
    print(f"  fused step          {spread(rows['fused'])}")
    print(f"    linear kernels    {spread(rows['linear'])}")
    print(f"    attention         {spread(rows['attention'])}")
    print(f"    rest of the step  {spread(rows['native_other'])}")
    print(f"    Python per token  {spread(rows['py'])}")
    print(f"    outside kernels   {spread(overhead)}")
    print(f"  op-by-op forward    {spread(rows['python'])}   (fused speed-up {spread(ratios)}x)")
    print(json.dumps({"args": vars(args), **rows, "speedup": ratios}))


def compare_kernels(model, ids: torch.Tensor, args: argparse.Namespace, kernels: list[str]) -> None:
    """The fused step under each quantized-linear kernel in turn, round by round, on the same weights."""
    times: dict[str, list[float]] = {k: [] for k in kernels}
    previous = set_quant_kernel(kernels[0])
    try:
        for k in kernels:
            set_quant_kernel(k)
            timed_tokens(model, ids, 4, True)
        for r in range(args.rounds):
            for k in kernels:
                set_quant_kernel(k)
                times[k].append(timed_tokens(model, ids, args.steps, True)[0])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}" for k in kernels), flush=True)
    finally:
        set_quant_kernel(previous)
    setting = f"{args.quantization}, depth {args.depth}, {args.threads} threads, {args.rounds}x{args.steps} steps"
    print(f"{setting}: fused step ms per token, median (min-max); ratio = {kernels[0]} time / this kernel's, per round")
    for k in kernels:
        ratios = [a / b for a, b in zip(times[kernels[0]], times[k], strict=True)]
        print(f"  {k:10s} {spread(times[k])}   ratio {spread(ratios)}")
    print(json.dumps({"args": vars(args), "ms_per_token": times}))


if __name__ == "__main__":
    main()
