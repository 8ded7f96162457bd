"""Time to pick one token from Qwen's 151,936 logits with the chat models' sampling defaults, beside transformers.

    python benchmarks/bench_sampling.py                    # Qwen-Chat defaults: top_p 0.8, repetition penalty 1.1
    python benchmarks/bench_sampling.py --top-p 0.5 --rounds 7 --json

Why: the serving engine samples each request's row on its own (each has its own settings and seeded RNG), so
at 16 running requests a step pays this 16 times beside one batched forward. Both sides process the same rows
(peaked ones, as a trained model's are: the top 1024 tokens hold > 99.9% of the mass, or flat ones with
--flat) and draw with `torch.multinomial` from a generator seeded alike; the tokens drawn are checked equal.
Reported: ms per row, median over rounds (min-max), and the ratio peer / qwenlm per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qwenlm.generation.params import SamplingParams
from qwenlm.generation.sampling import make_generator, sample_next

VOCAB = 151936


def _rows(n: int, flat: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, VOCAB, generator=gen) * (0.5 if flat else 8.0)


def _ours(rows: torch.Tensor, history: torch.Tensor, params: SamplingParams) -> list[int]:
    generator = make_generator(0)
    return [int(sample_next(rows[i : i + 1], params, history, generator)[0]) for i in range(rows.shape[0])]


def _peer(rows: torch.Tensor, history: torch.Tensor, params: SamplingParams) -> list[int]:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
                                      TopPLogitsWarper(params.top_p)])  # fmt: skip
    generator = make_generator(0)
    out = []
    for i in range(rows.shape[0]):
        scores = processors(history, rows[i : i + 1].clone())
        out.append(int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[0, 0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="rows per round (one per running request)")
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--flat", action="store_true", help="flat rows (random weights): the nucleus is huge")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(do_sample=True, top_p=args.top_p, top_k=0, repetition_penalty=args.repetition_penalty)
    history = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"qwenlm": [], "transformers": []}
    for r in range(args.rounds):
        rows = _rows(args.rows, args.flat, seed=r)
        picked = {}
        for name, fn in (("qwenlm", _ours), ("transformers", _peer))[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            picked[name] = fn(rows, history, params)
            times[name].append((time.perf_counter() - start) * 1000 / args.rows)
        if picked["qwenlm"] != picked["transformers"]:
            raise SystemExit(f"round {r}: the two picked different tokens: {picked}")
    ratios = [p / q for p, q in zip(times["transformers"], times["qwenlm"], strict=True)]
    result = {
        "bench": "sampling", "rows": args.rows, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
        "flat": args.flat, "ms_per_row": {k: statistics.median(v) for k, v in times.items()},
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
    }  # fmt: skip
    if not args.json:
        print("| sampler | ms per row (min-max) |\n|---|---|")
        for name, values in times.items():
            print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) |")
        print(f"transformers / qwenlm: {result['ratio_median']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
