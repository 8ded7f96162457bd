"""Time to first token across the turns of one growing chat, with the engine's prefix reuse on and off
(the peer), in one process, interleaved.

    python benchmarks/bench_engine.py --model /tmp/q18/ckpt --dtype bfloat16 --turns 4

Each turn's prompt is the whole conversation so far (ChatML) plus a new ~60-token question, as a chat
client sends it; the reply is 16 greedy tokens. Without reuse every turn re-reads the conversation;
with it, only the new tokens. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def run_chat(engine, tokenizer, turns: int, system: str) -> list[float]:
    from qwenlm.chat_format import make_context
    from qwenlm.generation import SamplingParams

    params = SamplingParams(max_new_tokens=16, eos_token_ids=(), stop_words_ids=())
    history: list[tuple[str, str]] = []
    ttft = []
    for turn in range(turns):
        query = f"Question {turn}: " + "please explain the history of the printing press in detail " * 6
        _, prompt = make_context(tokenizer, query, history, system)
        request_id = f"{id(engine)}-{turn}"
        start = time.perf_counter()
        engine.add_request(request_id, prompt, params)
        first, reply = None, []
        while engine.has_work():
            for out in engine.step():
                first = first or time.perf_counter()
                reply += out.token_ids
        ttft.append(first - start)
        history.append((query, tokenizer.decode(reply, skip_special_tokens=True)))
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from qwenlm import AutoModelForCausalLM, AutoTokenizer
    from qwenlm.engine import EngineArgs, LLMEngine

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=args.dtype, progress=False)
    system = "You are a meticulous research assistant. " * 20  # a long shared system prompt
    run_chat(LLMEngine(model, tokenizer, EngineArgs(max_num_seqs=1, max_model_len=4096)), tokenizer, 1, "warm-up")
    samples: dict[str, list[list[float]]] = {"reuse": [], "no reuse": []}
    for _ in range(args.repeats):
        for name, enabled in (("reuse", True), ("no reuse", False)):
            engine = LLMEngine(model, tokenizer, EngineArgs(max_num_seqs=2, max_model_len=4096,
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
    print(json.dumps({"bench": "engine_ttft", "model": args.model, "dtype": args.dtype, "ttft_s": table}))


if __name__ == "__main__":
    main()
