"""Where a single-sequence decode step's time goes: the fused native step against the op-by-op forward.

    python benchmarks/bench_decode_step.py --model /tmp/q18/ckpt --quantization int4 --depth 1 --rounds 5

Each round times `--steps` greedy tokens of `generate_steps` (the loop `generate`/`stream` run) with the fused
step (one native call per token, generation/fused.py) and then with QWENLM_FUSED_DECODE=0 (the model's Python
forward per token), after the same `--depth`-token prompt, in one process, alternately. For the fused runs the
step's own clock splits each token into the linear kernels, attention (cache write included) and the rest of
the native step (norms, RoPE, residual adds, SiLU, op calls); what remains of the token's wall time is Python
(the embedding lookup, the call, sampling and stop checks). Reported: medians over rounds, min-max in brackets.

    python benchmarks/bench_decode_step.py --model /tmp/q18/ckpt --quantization int8 --quant-kernels dpbf16,vnni

    python benchmarks/bench_decode_step.py --model /tmp/q18/ckpt --quantization int8 --paired-bound --rounds 8

With `--paired-bound` each round instead decodes `--steps` tokens twice: once as above, and once with a read of
256 MB from a cold buffer after every step (`bench.ReadProbe`), which pairs each step with the host's read
bandwidth of the same moment. Reported: the step's fraction of that bound (bytes one step reads, every tensor but
the embedding plus the KV cache at its context, per second, over the probe's GB/s), median of the steps and
min-max of the rounds' medians; and how much the probes slowed the steps (plain / probed ms per token), since the
measure is only as good as that is close to 1.

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

from qwenlm.bench import (
    BenchSettings,
    ReadProbe,
    cache_bytes_per_position,
    load_qwenlm,
    random_prompt,
    weight_bytes_per_token,
)
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


def probed_steps(model, ids: torch.Tensor, steps: int, probe: ReadProbe) -> list[tuple[float, float]]:
    """(seconds, probe GB/s) of each fused greedy decode step (the tokens after the first), with one probe read
    between consecutive steps: a step's time runs from the end of the read before it to its token."""
    os.environ["QWENLM_FUSED_DECODE"] = "1"
    params = SamplingParams(max_new_tokens=steps + 1, do_sample=False, eos_token_ids=(), stop_words_ids=())
    pairs, resumed = [], None
    with torch.inference_mode():
        for _ in generate_steps(model, ids, params, compile=False):
            token_at = time.perf_counter()
            gbps = probe.read_gbps()
            if resumed is not None:
                pairs.append((token_at - resumed, gbps))
            resumed = time.perf_counter()
    return pairs


def paired_bound(model, ids: torch.Tensor, args: argparse.Namespace) -> None:
    """Each round: a plain run, then a probed one (`probed_steps`); fractions of the paired bound."""
    probe = ReadProbe()
    weights, per_position = weight_bytes_per_token(model), cache_bytes_per_position(model)
    medians, plain, probed, gbps = [], [], [], []
    for r in range(args.rounds):
        plain.append(timed_tokens(model, ids, args.steps, True)[0])
        pairs = probed_steps(model, ids, args.steps, probe)
        # The step that makes generated token n + 2 attends over depth + n + 1 cached positions.
        fractions = [(weights + per_position * (ids.shape[1] + n + 1)) / seconds / 1e9 / bound
                     for n, (seconds, bound) in enumerate(pairs)]  # fmt: skip
        medians.append(statistics.median(fractions))
        probed.append(statistics.median(seconds for seconds, _ in pairs) * 1e3)
        gbps.append(statistics.median(bound for _, bound in pairs))
        print(f"round {r + 1}/{args.rounds}: fraction {medians[-1]:.3f}, probe {gbps[-1]:.1f} GB/s, "
              f"plain {plain[-1]:.2f} / probed {probed[-1]:.2f} ms per token", flush=True)  # fmt: skip
    weights_name = args.quantization if args.quantization != "none" else args.dtype
    print(
        f"{weights_name}, depth {args.depth}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps, "
        f"{weights / 1e6:.0f} MB of weights per step, probe kernel {probe.kernel!r}: median (min-max of rounds)"
    )
    print(f"  fraction of the paired bound  {spread(medians)}")
    print(f"  probe GB/s                    {spread(gbps)}")
    print(f"  ms per token, plain           {spread(plain)}")
    print(f"  ms per token, probed          {spread(probed)}   (plain / probed "
          f"{spread([a / b for a, b in zip(plain, probed, strict=True)])})")  # fmt: skip
    print(json.dumps({"args": vars(args), "fraction": medians, "probe_gbps": gbps, "plain_ms": plain,
                      "probed_ms": probed, "weight_bytes": weights, "probe_kernel": probe.kernel}))  # fmt: skip


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
    parser.add_argument("--paired-bound", action="store_true",
                        help="the step's fraction of the read bandwidth probed between steps")  # fmt: skip
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
    if args.paired_bound:
        return paired_bound(model, ids, args)
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
