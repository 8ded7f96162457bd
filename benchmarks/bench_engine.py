"""The engine alone (no HTTP), three suites, each against a peer in the same run:

    python benchmarks/bench_engine.py --model /tmp/q18/ckpt --dtype bfloat16 --suite chat --turns 4
    python benchmarks/bench_engine.py --model /tmp/q18/ckpt --dtype bfloat16 --suite prefix --prefix-tokens 2048
    python benchmarks/bench_engine.py --model /tmp/q18/ckpt --dtype bfloat16 --suite decode --baseline /tmp/qwenlm-head
    python benchmarks/bench_engine.py --model /tmp/q18/ckpt --quantization int8 --suite batch --batch 24

- chat: time to first token across the turns of one growing chat (ChatML, a long system prompt, ~60-token
  questions, 16-token replies), with the prefix cache on and off (the peer), interleaved.
- prefix: time to first token of a request whose ~2k-token prefix an earlier request computed, against
  that first request (same prefix, another question) and against the same pair with prefix caching off.
- decode: single-stream decode, ms per token (after the first), of the engine against `generate()` (the
  eager loop on a contiguous cache), interleaved rounds; `--baseline ROOT` adds the engine of another
  checkout (`git worktree add /tmp/qwenlm-head HEAD`: the previous engine), measured between the same
  rounds in a subprocess that imports qwenlm from ROOT, with its own generate() beside it (the engine /
  generate() ratios of the two processes compare the engines even while the machine's speed drifts).
- batch: batched decode of `--batch` requests at once (32-token prompts, `--new-tokens` each), tokens/s of the
  decode steps, for a quantized model (`--quantization`) whose linears take more rows than the quantized kernel
  does (`QUANT_MAX_ROWS`), with weights too large for a cache dequantized in slabs (`kernels.cpu.
  dequantized_linear`) against dequantized whole (the previous path), alternated round by round.

Prints a table per suite, then one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

NO_STOPS = {"eos_token_ids": (), "stop_words_ids": ()}


def engine_args(EngineArgs, **kwargs):
    """EngineArgs with the fields this checkout's engine has (a baseline checkout may lack newer ones)."""
    fields = EngineArgs.__dataclass_fields__
    return EngineArgs(**{k: v for k, v in kwargs.items() if k in fields})


def time_to_first_token(engine, request_id: str, prompt: list[int], params) -> tuple[float, list[int]]:
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first, tokens = None, []
    while engine.has_work():
        for out in engine.step():
            first = first or time.perf_counter()
            tokens += out.token_ids
    return first - start, tokens


# ---- chat ----------------------------------------------------------------------------------------
def run_chat(engine, tokenizer, turns: int, system: str) -> list[float]:
    from qwenlm.chat_format import make_context
    from qwenlm.generation import SamplingParams

    params = SamplingParams(max_new_tokens=16, **NO_STOPS)
    history: list[tuple[str, str]] = []
    ttft = []
    for turn in range(turns):
        query = f"Question {turn}: " + "please explain the history of the printing press in detail " * 6
        _, prompt = make_context(tokenizer, query, history, system)
        seconds, reply = time_to_first_token(engine, f"{id(engine)}-{turn}", prompt, params)
        ttft.append(seconds)
        history.append((query, tokenizer.decode(reply, skip_special_tokens=True)))
    return ttft


def suite_chat(model, tokenizer, args) -> dict:
    from qwenlm.engine import EngineArgs, LLMEngine

    system = "You are a meticulous research assistant. " * 20  # a long shared system prompt
    run_chat(LLMEngine(model, tokenizer, engine_args(EngineArgs, max_num_seqs=1, max_model_len=4096)), tokenizer, 1,
             "warm-up")  # fmt: skip
    samples: dict[str, list[list[float]]] = {"reuse": [], "no reuse": []}
    for _ in range(args.repeats):
        for name, enabled in (("reuse", True), ("no reuse", False)):
            engine = LLMEngine(model, tokenizer, engine_args(EngineArgs, max_num_seqs=2, max_model_len=4096,
                                                             enable_prefix_caching=enabled))  # fmt: skip
            samples[name].append(run_chat(engine, tokenizer, args.turns, system))
    table = {
        name: [statistics.median(run[t] for run in runs) for t in range(args.turns)] for name, runs in samples.items()
    }
    print("| turn | " + " | ".join(f"TTFT s ({n})" for n in table) + " | speed-up |")
    print("|---|---|---|---|")
    for t in range(args.turns):
        print(f"| {t + 1} | {table['reuse'][t]:.2f} | {table['no reuse'][t]:.2f} | "
              f"{table['no reuse'][t] / table['reuse'][t]:.1f}x |")  # fmt: skip
    return {"bench": "engine_ttft", "model": args.model, "dtype": args.dtype, "ttft_s": table}


# ---- batch ---------------------------------------------------------------------------------------
def suite_batch(model, tokenizer, args) -> dict:
    from qwenlm.engine import EngineArgs, LLMEngine
    from qwenlm.generation import SamplingParams
    from qwenlm.kernels import cpu

    params = SamplingParams(max_new_tokens=args.new_tokens, **NO_STOPS)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 150000) for _ in range(32)] for _ in range(args.batch)]
    settings = {"slabs": cpu.DEQUANT_WHOLE_MAX_BYTES, "whole": 1 << 62}

    def decode_rate() -> float:
        engine = LLMEngine(model, tokenizer, engine_args(EngineArgs, max_num_seqs=args.batch, max_model_len=256))
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        while engine.waiting or any(len(s.token_ids) == s.num_prompt_tokens for s in engine.running):
            engine.step()  # prefills (the scheduler admits the batch over a few steps)
        start, tokens = time.perf_counter(), 0
        while engine.has_work():
            tokens += sum(len(out.token_ids) for out in engine.step())
        return tokens / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {name: [] for name in settings}
    try:
        for r in range(args.repeats + 1):  # round 0 warms up
            for name in settings if r % 2 else list(settings)[::-1]:
                cpu.DEQUANT_WHOLE_MAX_BYTES = settings[name]
                rate = decode_rate()
                if r:
                    rates[name].append(rate)
    finally:
        cpu.DEQUANT_WHOLE_MAX_BYTES = settings["slabs"]
    ratios = [a / b for a, b in zip(rates["slabs"], rates["whole"], strict=True)]
    print(f"{args.batch} requests x {args.new_tokens} tokens, {args.quantization}: decode tokens/s, median (min-max)")
    print("| large weights | decode tok/s | slabs / whole per round |")
    print("|---|---|---|")
    for name, values in rates.items():
        shown = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if name == "slabs" else ""
        print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) | {shown} |")
    return {"bench": "engine_batch", "model": args.model, "quantization": args.quantization, "batch": args.batch,
            "decode_tokens_per_s": rates}  # fmt: skip


# ---- prefix --------------------------------------------------------------------------------------
def suite_prefix(model, tokenizer, args) -> dict:
    """TTFT of (prefix + question B) after (prefix + question A) computed the prefix, over rounds with a
    fresh random prefix each (so earlier rounds do not help), prefix caching on and off."""
    from qwenlm.engine import EngineArgs, LLMEngine
    from qwenlm.generation import SamplingParams

    params = SamplingParams(max_new_tokens=2, **NO_STOPS)
    max_len = args.prefix_tokens + 256
    rows: dict[str, list[tuple[float, float]]] = {"prefix cache": [], "no prefix cache": []}
    for r in range(args.repeats + 1):  # round 0 warms up
        rng = random.Random(r)
        prefix = [rng.randrange(100, 150000) for _ in range(args.prefix_tokens)]
        questions = [[rng.randrange(100, 150000) for _ in range(24)] for _ in range(2)]
        for name, enabled in (("prefix cache", True), ("no prefix cache", False)):
            engine = LLMEngine(model, tokenizer, engine_args(EngineArgs, max_num_seqs=2, max_model_len=max_len,
                                                             enable_prefix_caching=enabled))  # fmt: skip
            first, _ = time_to_first_token(engine, "a", prefix + questions[0], params)
            again, _ = time_to_first_token(engine, "b", prefix + questions[1], params)
            if r:
                rows[name].append((first, again))
    print(f"| prefix cache | TTFT s, first ({args.prefix_tokens}-token prefix) | TTFT s, repeated prefix | "
          "repeated / first (min-max) |")  # fmt: skip
    print("|---|---|---|---|")
    for name, pairs in rows.items():
        ratios = [b / a for a, b in pairs]
        print(f"| {name} | {statistics.median(a for a, _ in pairs):.3f} | {statistics.median(b for _, b in pairs):.3f} "
              f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip
    return {"bench": "engine_prefix_ttft", "model": args.model, "dtype": args.dtype, "rows": rows}


# ---- decode --------------------------------------------------------------------------------------
def _prompt(length: int) -> list[int]:
    rng = random.Random(length)
    return [rng.randrange(100, 150000) for _ in range(length)]


def engine_ms_per_token(model, tokenizer, prompt: list[int], new: int) -> float:
    """Median wall time of the engine's decode steps (one running request), in ms."""
    from qwenlm.engine import EngineArgs, LLMEngine
    from qwenlm.generation import SamplingParams

    engine = LLMEngine(model, tokenizer, engine_args(EngineArgs, max_num_seqs=1, max_model_len=len(prompt) + new))
    engine.add_request("d", prompt, SamplingParams(max_new_tokens=new, **NO_STOPS))
    engine.step()  # the prefill (and the first token)
    times = []
    while engine.has_work():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def generate_ms_per_token(model, tokenizer, prompt: list[int], new: int) -> float:
    """Median wall time of generate()'s decode steps (the text stage included, as the engine's), in ms."""
    from qwenlm.generation import SamplingParams
    from qwenlm.generation.generate import stream_batch

    steps = stream_batch(model, tokenizer, [prompt], SamplingParams(max_new_tokens=new, **NO_STOPS), compile=False)
    next(steps)  # the prefill (and the first token)
    times = []
    while True:
        start = time.perf_counter()
        if next(steps, None) is None:
            break
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def baseline_ms_per_token(args) -> tuple[float, float]:
    """(engine, generate()) ms per token in a subprocess importing qwenlm from the baseline checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.baseline, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--threads", str(args.threads),
           "--suite", "decode", "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--engine-only"]  # fmt: skip
    out = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    if not out["qwenlm"].startswith(os.path.abspath(args.baseline)):
        raise RuntimeError(f"the baseline run imported {out['qwenlm']}, not the checkout at {args.baseline}")
    return out["engine_ms"], out["generate_ms"]


def suite_decode(model, tokenizer, args) -> dict:
    prompt = _prompt(args.prompt_tokens)
    engine_ms_per_token(model, tokenizer, prompt, 8)  # warm-up
    generate_ms_per_token(model, tokenizer, prompt, 8)
    if args.engine_only:  # a baseline subprocess: one interleaved pair, as JSON
        import qwenlm

        return {"engine_ms": engine_ms_per_token(model, tokenizer, prompt, args.new_tokens),
                "generate_ms": generate_ms_per_token(model, tokenizer, prompt, args.new_tokens),
                "qwenlm": qwenlm.__file__}  # fmt: skip
    samples: dict[str, list[float]] = {"engine": [], "generate()": []}
    for _ in range(args.repeats):
        samples["engine"].append(engine_ms_per_token(model, tokenizer, prompt, args.new_tokens))
        samples["generate()"].append(generate_ms_per_token(model, tokenizer, prompt, args.new_tokens))
        if args.baseline:  # its own generate() beside it: the ratio holds even if the machine's speed drifts
            engine, generate = baseline_ms_per_token(args)
            samples.setdefault("previous engine", []).append(engine)
            samples.setdefault("generate() (previous engine's process)", []).append(generate)
    ratios = {"engine": [e / g for e, g in zip(samples["engine"], samples["generate()"], strict=True)]}
    if args.baseline:
        pairs = zip(samples["previous engine"], samples["generate() (previous engine's process)"], strict=True)
        ratios["previous engine"] = [e / g for e, g in pairs]
    print(f"| decode ({args.prompt_tokens}-token prompt, {args.new_tokens} tokens) | ms/token (median of rounds, "
          "min-max) | engine / generate() in the same process (min-max) |")  # fmt: skip
    print("|---|---|---|")
    for name, values in samples.items():
        ratio = ratios.get(name)
        shown = f"{statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f})" if ratio else ""
        print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | {shown} |")
    return {"bench": "engine_decode", "model": args.model, "dtype": args.dtype, "ms_per_token": samples,
            "engine_over_generate": ratios}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suite", choices=["chat", "prefix", "decode", "batch"], default="chat")
    parser.add_argument("--turns", type=int, default=4, help="chat: turns of the conversation")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (medians are reported)")
    parser.add_argument("--prefix-tokens", type=int, default=2048, help="prefix: the shared prefix's length")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="decode: the prompt's length")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: tokens decoded per round")
    parser.add_argument("--baseline", metavar="ROOT", help="decode: also the engine of the checkout at ROOT")
    parser.add_argument("--quantization", choices=["int8", "int4"], help="quantize the model while loading")
    parser.add_argument("--batch", type=int, default=24, help="batch: requests decoded together")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # the baseline subprocess
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from qwenlm import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=args.dtype, quantization=args.quantization,
                                                 progress=False)  # fmt: skip
    suite = {"chat": suite_chat, "prefix": suite_prefix, "decode": suite_decode, "batch": suite_batch}[args.suite]
    print(json.dumps(suite(model, tokenizer, args)))


if __name__ == "__main__":
    main()
