"""Prefill and decode speed of qwenlm's `generate` beside transformers' `generate` on the same weights
(Qwen2ForCausalLM, converted), in one process, interleaved, median of repeats, warm-up excluded.

    python benchmarks/bench_generate.py --model /tmp/q18/ckpt --dtype float32 --threads 2
    python benchmarks/bench_generate.py --model /tmp/q18/ckpt --prompt-len 512 --gen-len 128 --repeats 3

Method (identical for both): time a greedy run that makes 1 token (= prefill + first token) and one
that makes `gen_len` tokens with eos disabled; decode tokens/s = (gen_len - 1) / (t_gen - t_first).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_runners(model_dir: Path, dtype: torch.dtype, qwen2_dir: Path | None):
    """{engine: run(prompt_ids, new_tokens)}, each a greedy generate with eos off."""
    from qwenlm import AutoModelForCausalLM, AutoTokenizer
    from qwenlm.generation import generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, progress=False)

    def run_ours(ids: list[int], new: int) -> None:
        out = generate(ours, tokenizer, ids, max_new_tokens=new, do_sample=False, repetition_penalty=1.0,
                       eos_token_id=[], stop_words_ids=[])  # fmt: skip
        assert len(out.token_ids) == new

    runners = {"qwenlm": run_ours}
    if qwen2_dir is not None:
        from transformers import Qwen2ForCausalLM

        theirs = Qwen2ForCausalLM.from_pretrained(qwen2_dir, dtype=dtype).eval()

        @torch.no_grad()
        def run_theirs(ids: list[int], new: int) -> None:
            x = torch.tensor([ids])
            out = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)  # fmt: skip
            assert out.shape[1] == len(ids) + new

        runners["transformers"] = run_theirs
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model_dir = Path(args.model)

    tmp = None
    qwen2_dir = None
    if not args.no_peer:
        from qwenlm.convert import convert_to_qwen2

        tmp = tempfile.TemporaryDirectory(prefix="qwen2-", dir=model_dir.parent)
        qwen2_dir = convert_to_qwen2(model_dir, tmp.name)
    runners = make_runners(model_dir, dtype, qwen2_dir)
    ids = torch.randint(0, 151643, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    for run in runners.values():  # warm-up
        run(ids[:16], 2)
    samples: dict[str, dict[str, list[float]]] = {e: {"first": [], "gen": []} for e in runners}
    for _ in range(args.repeats):
        for engine, run in runners.items():
            samples[engine]["first"].append(_time(lambda run=run: run(ids, 1)))
            samples[engine]["gen"].append(_time(lambda run=run: run(ids, args.gen_len)))

    results = []
    for engine, s in samples.items():
        first, gen = statistics.median(s["first"]), statistics.median(s["gen"])
        results.append({"engine": engine, "dtype": args.dtype, "threads": args.threads, "prompt_len": args.prompt_len,
                        "gen_len": args.gen_len, "ttft_s": first, "prefill_tok_s": args.prompt_len / first,
                        "decode_tok_s": (args.gen_len - 1) / (gen - first)})  # fmt: skip
    print("| engine | dtype | prompt | new | TTFT s | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['dtype']} | {r['prompt_len']} | {r['gen_len']} | {r['ttft_s']:.2f} "
              f"| {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} |")  # fmt: skip
    if len(results) == 2:
        print(f"decode: qwenlm / transformers = {results[0]['decode_tok_s'] / results[1]['decode_tok_s']:.2f}x; "
              f"prefill: {results[0]['prefill_tok_s'] / results[1]['prefill_tok_s']:.2f}x")  # fmt: skip
    print(json.dumps({"bench": "generate", "model": str(model_dir), "results": results}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
