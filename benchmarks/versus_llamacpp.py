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

from qwenlm.bench import BenchSettings, load_qwenlm, random_prompt, run_qwenlm  # noqa: E402

PAIRS = {  # name: (qwenlm dtype, qwenlm quantization, GGUF type)
    "bf16": ("bfloat16", "none", "bf16"),
    "f32": ("float32", "none", "f32"),
    "int8": ("bfloat16", "int8", "q8_0"),
    "int4": ("bfloat16", "int4", "q4_0"),
}


def llama_bench(gguf: Path, threads: int, prompt_len: int = 0, gen_len: int = 0, depth: int = 0) -> float:
    """tokens/s of one llama-bench run: prefill of prompt_len tokens, or gen_len tokens at `depth`."""
    rates = bench(gguf, prompt_len, gen_len, threads, repeats=1, depth=depth)
    return rates["prefill_tok_s" if prompt_len else "decode_tok_s"]


def qwenlm_rates(model: torch.nn.Module, prompt_len: int, gen_len: int, seed: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy generation after a random prompt of prompt_len tokens."""
    ids = random_prompt(1, prompt_len, seed, model.config.vocab_size)
    timing = run_qwenlm(model, ids, gen_len)
    return prompt_len / timing.ttft_s, (gen_len - 1) / timing.decode_s


def run_pair(name: str, args: argparse.Namespace) -> list[dict]:
    dtype, quantization, gguf_type = PAIRS[name]
    gguf = convert(args.model.resolve(), args.gguf_dir, gguf_type)
    settings = BenchSettings(model=str(args.model), dtype=dtype, quantization=quantization, threads=args.threads)
    model = load_qwenlm(args.model, settings)
    qwenlm_rates(model, 16, 8, args.seed)  # warm-up
    llama_bench(gguf, args.threads, gen_len=8)
    cases = [("prefill", args.prompt_len, 0)] + [(f"decode@{d}", d, d) for d in args.depths]
    samples: dict[str, dict[str, list[float]]] = {case: {"llama": [], "qwenlm": []} for case, _, _ in cases}
    for r in range(args.rounds):
        print(f"{name}: round {r + 1}/{args.rounds}", file=sys.stderr)
        for case, length, depth in cases:
            if case == "prefill":
                theirs = llama_bench(gguf, args.threads, prompt_len=length)
                ours = qwenlm_rates(model, length, 2, args.seed + r)[0]
            else:
                theirs = llama_bench(gguf, args.threads, gen_len=args.gen_len, depth=depth)
                ours = qwenlm_rates(model, max(length, 1), args.gen_len, args.seed + r)[1]
            samples[case]["llama"].append(theirs)
            samples[case]["qwenlm"].append(ours)
    del model
    rows = []
    for case, _, _ in cases:
        ours, theirs = samples[case]["qwenlm"], samples[case]["llama"]
        ratios = sorted(o / t for o, t in zip(ours, theirs, strict=True))
        rows.append({
            "pair": name, "gguf": gguf_type, "case": case,
            "qwenlm_tok_s": statistics.median(ours), "llamacpp_tok_s": statistics.median(theirs),
            "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "samples": samples[case],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["bf16", "f32", "int8", "int4"])
    parser.add_argument("--depths", nargs="+", type=int, default=[0, 512], help="decode context depths")
    parser.add_argument("--prompt-len", type=int, default=512, help="prefill length")
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf-dir", type=Path, default=Path.home() / ".cache/qwenlm/gguf")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for name in args.pairs for row in run_pair(name, args)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.threads} threads, {args.rounds} interleaved rounds, medians; ratio = qwenlm / llama.cpp per round")
    print(f"{'pair':<6} {'llama.cpp':<9} {'case':<11} {'qwenlm tok/s':>12} {'llama.cpp tok/s':>15} "
          f"{'ratio (min-max)':>22}")  # fmt: skip
    for row in rows:
        spread = f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
        print(f"{row['pair']:<6} {row['gguf']:<9} {row['case']:<11} {row['qwenlm_tok_s']:>12.2f} "
              f"{row['llamacpp_tok_s']:>15.2f} {row['ratio_median']:>8.2f}x {spread}")  # fmt: skip


if __name__ == "__main__":
    main()
