"""qwenlm beside llama.cpp, interleaved round by round, at the same context depth.

    python benchmarks/versus_llamacpp.py --model /tmp/q18/ckpt --pairs bf16 f32 int8 int4 --rounds 3

`llama-bench -n 128` times generation from an *empty* context, while "128 tokens after a 512-token
prompt" decodes at contexts 512..639, where attention reads a 512-token KV cache every step. This
script times both engines at the same depths (`--depths 0 512`: llama-bench `-d`, and for qwenlm a
prompt of that many tokens, at least 1), plus prefill of `--prompt-len` tokens from an empty context.
Each round runs llama-bench once (a subprocess, `-r 1`) and then qwenlm once (this process, the model
loaded once per pair), so both see the same state of a shared host; the ratio is taken per round and
its median reported. GGUFs come from `benchmarks/llamacpp.py` (converted once, cached).

Pairs: bf16 (qwenlm bfloat16 vs llama.cpp BF16), f32, int8 (qwenlm int8 on the fly vs Q8_0), int4
(qwenlm int4 g128 vs Q4_0; llama-quantize keeps the output layer at Q6_K, qwenlm at int8).

Each decode rate is also given as a fraction of that round's bandwidth bound: bytes one qwenlm step reads (every
tensor but the embedding, plus the KV cache at the mean context) over `measure_bandwidth_gbps` on a 2 GB buffer.

Long prompts, with dynamic NTK and LogN active in qwenlm (`--seq-length 2048`: the 1.8B shape's 8192 moved down
to a Qwen-7B's, so 4k-32k prompts are 2-16x past it) and llama.cpp's flash attention on; a length that is both a
prefill length and a depth is one qwenlm run (its prefill, then its decode) and two llama-bench runs:

    python benchmarks/versus_llamacpp.py --model /tmp/q18/ckpt --pairs int4 --prompt-len 4096 8192 16384 \
        --depths 4096 8192 16384 --gen-len 16 --seq-length 2048 --flash-attn on --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp import bench, convert  # noqa: E402

from qwenlm.bench import (  # noqa: E402
    BenchSettings,
    bound_tokens_per_s,
    cache_bytes_per_position,
    load_qwenlm,
    mean_decode_context,
    measure_bandwidth_gbps,
    random_prompt,
    run_qwenlm,
    weight_bytes_per_token,
)

PROBE_MB = 2048  # the bandwidth probe's buffer: far past the caches (this host's L3 is 480 MB)

PAIRS = {  # name: (qwenlm dtype, qwenlm quantization, GGUF type)
    "bf16": ("bfloat16", "none", "bf16"),
    "f32": ("float32", "none", "f32"),
    "int8": ("bfloat16", "int8", "q8_0"),
    "int4": ("bfloat16", "int4", "q4_0"),
}


def llama_bench(gguf: Path, threads: int, prompt_len: int = 0, gen_len: int = 0, depth: int = 0,
                flash_attn: bool | None = None) -> float:  # fmt: skip
    """tokens/s of one llama-bench run: prefill of prompt_len tokens, or gen_len tokens at `depth`."""
    rates = bench(gguf, prompt_len, gen_len, threads, repeats=1, depth=depth, flash_attn=flash_attn)
    return rates["prefill_tok_s" if prompt_len else "decode_tok_s"]


def qwenlm_rates(model: torch.nn.Module, prompt_len: int, gen_len: int, seed: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy generation after a random prompt of prompt_len tokens."""
    ids = random_prompt(1, prompt_len, seed, model.config.vocab_size)
    timing = run_qwenlm(model, ids, gen_len)
    return prompt_len / timing.ttft_s, (gen_len - 1) / timing.decode_s


def run_pair(name: str, args: argparse.Namespace) -> list[dict]:
    dtype, quantization, gguf_type = PAIRS[name]
    gguf = convert(args.model.resolve(), args.gguf_dir, gguf_type)
    overrides = {"seq_length": args.seq_length} if args.seq_length else {}
    settings = BenchSettings(model=str(args.model), dtype=dtype, quantization=quantization, threads=args.threads,
                             config_overrides=overrides)  # fmt: skip
    model = load_qwenlm(args.model, settings)
    fa = args.flash_attn
    qwenlm_rates(model, 16, 8, args.seed)  # warm-up
    llama_bench(gguf, args.threads, gen_len=8, flash_attn=fa)
    cases = [(f"prefill {n}", n) for n in args.prompt_len] + [(f"decode@{d}", d) for d in args.depths]
    samples: dict[str, dict[str, list[float]]] = {case: {"llama": [], "qwenlm": [], "fraction": []}
                                                  for case, _ in cases}  # fmt: skip
    weights, per_position = weight_bytes_per_token(model), cache_bytes_per_position(model)
    probes: list[float] = []
    for r in range(args.rounds):
        print(f"{name}: round {r + 1}/{args.rounds}", file=sys.stderr)
        probes.append(measure_bandwidth_gbps(size_mb=PROBE_MB))  # this round's bound for the decode rates
        # Per length: llama-bench's runs, then one qwenlm run, whose prefill and decode rates both count when
        # the length is a prefill length and a depth (a long prompt: both are of interest).
        for length in dict.fromkeys(args.prompt_len + args.depths):
            prefill, depth = length in args.prompt_len, length in args.depths
            if prefill:
                samples[f"prefill {length}"]["llama"].append(
                    llama_bench(gguf, args.threads, prompt_len=length, flash_attn=fa)
                )
            if depth:
                samples[f"decode@{length}"]["llama"].append(
                    llama_bench(gguf, args.threads, gen_len=args.gen_len, depth=length, flash_attn=fa)
                )
            ours = qwenlm_rates(model, max(length, 1), args.gen_len if depth else 2, args.seed + r)
            if prefill:
                samples[f"prefill {length}"]["qwenlm"].append(ours[0])
            if depth:
                samples[f"decode@{length}"]["qwenlm"].append(ours[1])
                step_bytes = weights + per_position * mean_decode_context(max(length, 1), args.gen_len)
                bound = bound_tokens_per_s(step_bytes, probes[-1], 1)
                samples[f"decode@{length}"]["fraction"].append(ours[1] / bound)
    del model
    rows = []
    for case, _ in cases:
        ours, theirs = samples[case]["qwenlm"], samples[case]["llama"]
        ratios = sorted(o / t for o, t in zip(ours, theirs, strict=True))
        rows.append({
            "pair": name, "gguf": gguf_type, "case": case,
            "qwenlm_tok_s": statistics.median(ours), "llamacpp_tok_s": statistics.median(theirs),
            "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "bandwidth_fraction": sorted(samples[case]["fraction"]), "probe_gbps": probes,
            "weight_bytes": weights, "samples": samples[case],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["bf16", "f32", "int8", "int4"])
    parser.add_argument("--depths", nargs="+", type=int, default=[0, 512], help="decode context depths")
    parser.add_argument("--prompt-len", nargs="+", type=int, default=[512], help="prefill lengths")
    parser.add_argument("--seq-length", type=int, help="qwenlm's trained context (config override): dynamic NTK "
                        "and LogN switch on past it, as for a long prompt on a Qwen-7B (2048)")  # fmt: skip
    parser.add_argument("--flash-attn", choices=["on", "off"], help="llama-bench -fa (default: its own, auto)")
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf-dir", type=Path, default=Path.home() / ".cache/qwenlm/gguf")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    args.flash_attn = None if args.flash_attn is None else args.flash_attn == "on"
    torch.set_num_threads(args.threads)
    rows = [row for name in args.pairs for row in run_pair(name, args)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.threads} threads, {args.rounds} interleaved rounds, medians; ratio = qwenlm / llama.cpp per round; "
          "fraction = qwenlm decode / the round's bandwidth bound (bytes per step over a 2 GB read probe)")  # fmt: skip
    print(f"{'pair':<6} {'llama.cpp':<9} {'case':<13} {'qwenlm tok/s':>12} {'llama.cpp tok/s':>15} "
          f"{'ratio (min-max)':>22} {'fraction (min-max)':>22}")  # fmt: skip
    for row in rows:
        spread = f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
        fractions = row["bandwidth_fraction"]
        fraction = (f"{statistics.median(fractions):.2f} ({fractions[0]:.2f}-{fractions[-1]:.2f})"
                    if fractions else "")  # fmt: skip
        print(f"{row['pair']:<6} {row['gguf']:<9} {row['case']:<13} {row['qwenlm_tok_s']:>12.2f} "
              f"{row['llamacpp_tok_s']:>15.2f} {row['ratio_median']:>8.2f}x {spread:<13} {fraction:>22}")  # fmt: skip
    for pair in dict.fromkeys(row["pair"] for row in rows):
        probes = next(row["probe_gbps"] for row in rows if row["pair"] == pair)
        print(f"{pair}: bandwidth probe {min(probes):.1f}-{max(probes):.1f} GB/s over the rounds")


if __name__ == "__main__":
    main()
