"""What the OpenAI-compatibility features cost in the engine, each against its plain peer in the same run:

    python benchmarks/bench_openai_compat.py --model /tmp/q18/ckpt --dtype bfloat16 --suite scoring --prompt-tokens 512
    python benchmarks/bench_openai_compat.py --model /tmp/q18/ckpt --dtype bfloat16 --suite grammar --tokens 64

- scoring: echo + logprobs scoring of a prompt (prompt logprobs computed in the prefill: lm_head over every
  prompt position of the scored row, top-1 alternative) against the same prefill without them, interleaved.
- grammar: greedy decode under a JSON-schema grammar (llguidance mask per step) against the same decode
  without one, ms per token after the first, interleaved. The schema (an array of at least 1000 strings)
  never completes within `--tokens`, so both runs produce the same number of tokens.

Prints a table per suite (min-max over rounds, and the ratio to the peer), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

NO_STOPS = {"eos_token_ids": (), "stop_words_ids": ()}
LONG_ARRAY = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1000}


def _run(engine, request_id: str, prompt: list[int], params, **options) -> tuple[float, float | None, int]:
    """(seconds to the first output, ms per later token or None, tokens) of one request run alone."""
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params, **options)
    first, tokens = None, 0
    while engine.has_work():
        for out in engine.step():
            first = first or time.perf_counter()
            tokens += len(out.token_ids)
    end = time.perf_counter()
    per_token = (end - first) * 1000 / (tokens - 1) if tokens > 1 else None
    return first - start, per_token, tokens


def _table(title: str, rows: dict[str, list[float]], unit: str, peer: str) -> dict:
    print(f"\n{title}")
    base = statistics.median(rows[peer])
    result = {}
    for name, values in rows.items():
        med = statistics.median(values)
        ratio = [v / b for v, b in zip(values, rows[peer], strict=True)]
        print(f"  {name:<28} {med:9.2f} {unit}  (min {min(values):.2f}, max {max(values):.2f}; "
              f"x{med / base:.3f} of {peer}, per round {min(ratio):.3f}-{max(ratio):.3f})")  # fmt: skip
        result[name] = {"median": med, "min": min(values), "max": max(values), "ratio_min": min(ratio),
                        "ratio_max": max(ratio)}  # fmt: skip
    return result


def suite_scoring(engine, tokenizer, prompt_tokens: int, rounds: int) -> dict:
    from qwenlm.generation import SamplingParams

    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=1, **NO_STOPS)
    rows: dict[str, list[float]] = {"prefill": [], "prefill + prompt logprobs": []}
    for r in range(rounds + 1):  # round 0 warms up
        prompt = [rng.randrange(0, 151643) for _ in range(prompt_tokens)]  # a fresh prompt: no prefix reuse
        order = [("prefill", {}), ("prefill + prompt logprobs", {"prompt_logprobs": 1})]
        for name, options in order if r % 2 else order[::-1]:
            seconds, _, _ = _run(engine, f"{name}-{r}", prompt, params, **options)
            if r:
                rows[name].append(seconds * 1000)
    return _table(f"scoring a {prompt_tokens}-token prompt (ms to the first output)", rows, "ms", "prefill")


def suite_grammar(engine, tokenizer, tokens: int, rounds: int) -> dict:
    from qwenlm.generation import SamplingParams
    from qwenlm.generation.constrained import GrammarCompiler, json_schema_grammar

    compiler = GrammarCompiler(tokenizer, [151643, 151644, 151645])
    grammar = json_schema_grammar(LONG_ARRAY)
    params = SamplingParams(max_new_tokens=tokens, **NO_STOPS)
    prompt = tokenizer.encode("List some city names as a JSON array:")
    rows: dict[str, list[float]] = {"decode": [], "decode + JSON grammar": []}
    for r in range(rounds + 1):
        for name in ("decode", "decode + JSON grammar") if r % 2 else ("decode + JSON grammar", "decode"):
            options = {"constraint": compiler.compile(grammar)} if "grammar" in name else {}
            _, per_token, produced = _run(engine, f"{name}-{r}", prompt, params, **options)
            assert produced == tokens, f"{name} stopped after {produced} tokens"
            if r:
                rows[name].append(per_token)
    return _table(f"greedy decode, {tokens} tokens (ms per token after the first)", rows, "ms", "decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (e.g. qwenlm.testing's 1.8b preset)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--suite", choices=["scoring", "grammar"], required=True)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from qwenlm import AutoModelForCausalLM, AutoTokenizer
    from qwenlm.engine import EngineArgs, LLMEngine

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=args.dtype, device_map="cpu")
    engine = LLMEngine(model, tokenizer, EngineArgs(max_num_seqs=1, max_model_len=max(args.prompt_tokens, 256) + 128))
    if args.suite == "scoring":
        result = suite_scoring(engine, tokenizer, args.prompt_tokens, args.rounds)
    else:
        result = suite_grammar(engine, tokenizer, args.tokens, args.rounds)
    print(json.dumps({"suite": args.suite, "dtype": args.dtype, "threads": torch.get_num_threads(), **result}))


if __name__ == "__main__":
    main()
