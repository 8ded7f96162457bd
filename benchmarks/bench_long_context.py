"""Long-context prefill + decode with dynamic NTK and LogN active: qwenlm beside transformers' Qwen2.

The checkpoint's `seq_length` is set to --seq-length (2048 by default, as in the 2023-08 Qwen-7B
release), so an 8192-token prompt is 4x past it: qwenlm rebuilds RoPE with NTK alpha 7 at prefill and
scales queries by LogN. transformers' Qwen2 has neither feature, so its row is a speed reference for
the same shapes only (its tokens are not Qwen v1's past seq_length).

    python benchmarks/bench_long_context.py --model /tmp/q18/ckpt --dtype bfloat16 --prompt-len 8192 --gen-len 32
    python benchmarks/bench_long_context.py --prompt-len 64 --seq-length 16 --gen-len 8   # demo checkpoint, fast

Prints the `qwenlm bench` table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from qwenlm.bench import BenchSettings, format_report, run_bench
from qwenlm.model.blocks import logn_scale, ntk_alpha


def long_context_factors(prompt_len: int, gen_len: int, seq_length: int) -> dict[str, float]:
    """What qwenlm applies for this run: the prefill's NTK alpha (kept while decoding) and the LogN
    query factor at the last prompt and the last generated position."""
    last = prompt_len + gen_len - 1
    return {
        "ntk_alpha": float(ntk_alpha(prompt_len, seq_length)),
        "logn_at_prompt_end": float(logn_scale(prompt_len - 1, 1, seq_length)[0]),
        "logn_at_end": float(logn_scale(last, 1, seq_length)[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the demo checkpoint)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=2048, help="the trained context NTK/LogN start past")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bandwidth", type=float, metavar="GBPS")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    args = parser.parse_args()

    factors = long_context_factors(args.prompt_len, args.gen_len, args.seq_length)
    if factors["ntk_alpha"] <= 1:
        sys.exit(f"--prompt-len {args.prompt_len} does not pass --seq-length {args.seq_length}: NTK/LogN stay off")
    settings = BenchSettings(
        model=args.model, dtype=args.dtype, prompt_len=args.prompt_len, gen_len=args.gen_len, threads=args.threads,
        device=args.device, repeats=args.repeats, warmup=args.warmup, bandwidth_gbps=args.bandwidth,
        compare=None if args.no_peer else "transformers", config_overrides={"seq_length": args.seq_length},
    )  # fmt: skip
    report = run_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_report(report))
    print(f"qwenlm: seq_length {args.seq_length}, prompt {args.prompt_len} -> dynamic NTK alpha "
          f"{factors['ntk_alpha']:.0f}, LogN query factor {factors['logn_at_prompt_end']:.3f} at the prompt's end, "
          f"{factors['logn_at_end']:.3f} at the last token")  # fmt: skip
    if "transformers" in report["engines"]:
        print("transformers' Qwen2 has no dynamic NTK and no LogN: its row is a speed reference for the same "
              "shapes, not the same model past seq_length (so greedy tokens may differ)")  # fmt: skip
    print(json.dumps({"bench": "long_context", "seq_length": args.seq_length, **factors, "report": report}))


if __name__ == "__main__":
    main()
