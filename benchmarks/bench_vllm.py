"""Qwen v1 on vLLM (the qwenlm plugin) on a GPU machine: greedy tokens against qwenlm's own engine with
tensor parallel 1 and 2, at lengths below and past seq_length, then throughput against qwenlm's engine.

    pip install "qwenlm[vllm]"            # a CUDA vLLM 0.32.x
    python benchmarks/bench_vllm.py --preset 1.8b --tp 1 2            # random 1.8B-shaped weights, seq_length 256
    python benchmarks/bench_vllm.py --model ~/models/Qwen-7B-Chat --tp 1 2 --prompts 64 --new-tokens 128

1. Exactness (fp32): for each TP size and each NTK alpha a prompt up to --max-model-len gets, one vLLM
   engine with that alpha (what `qwenlm serve --backend vllm` runs) generates greedily for prompts of its
   bucket; the tokens are compared with qwenlm's engine on the same GPU. A random checkpoint gets
   seq_length 256 so that 2-3 buckets fit a short run.
2. Throughput (--dtype, default bf16): the same batch of prompts within seq_length, eos ignored, through
   vLLM (each TP size) and through qwenlm's engine; generated tokens per second over --rounds rounds
   (median, min-max) and the ratio to qwenlm's.

Each vLLM engine runs in a subprocess (this script with --worker), so GPU memory is returned between them.
Prints a table per part, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(spec: dict) -> dict:
    """One vLLM engine: greedy tokens for spec["prompts"], or timed rounds of a batch."""
    from vllm import LLM, SamplingParams

    llm = LLM(spec["model"], dtype=spec["dtype"], tensor_parallel_size=spec["tp"], max_model_len=spec["max_model_len"],
              hf_overrides={"qwenlm_ntk_alpha": spec["alpha"]}, gpu_memory_utilization=0.85)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=spec["new_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    if not spec.get("rounds"):
        return {"tokens": [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]}
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    seconds = []
    for _ in range(spec["rounds"]):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        assert all(len(o.outputs[0].token_ids) == spec["new_tokens"] for o in outs)
    return {"seconds": seconds}


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(spec), capture_output=True,
                          text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def qwenlm_engine(model_path: Path, dtype: torch.dtype, max_model_len: int, max_num_seqs: int):
    from qwenlm.engine import EngineArgs, LLMEngine
    from qwenlm.model import load_model
    from qwenlm.tokenizer import QwenTokenizer

    model = load_model(model_path, torch_dtype=dtype, device_map="cuda", progress=False)
    args = EngineArgs(max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    return LLMEngine(model, QwenTokenizer.from_pretrained(model_path), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: a random --preset checkpoint)")
    parser.add_argument("--preset", default="1.8b", help="shape of the random checkpoint (qwenlm.testing presets)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes")
    parser.add_argument("--max-model-len", type=int, help="default: 4 x seq_length")
    parser.add_argument("--prompts", type=int, default=32, help="prompts in the throughput batch")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
        return

    from qwenlm.generation.params import SamplingParams
    from qwenlm.integrations.vllm.routing import alpha_buckets
    from qwenlm.model.config import QwenConfig
    from qwenlm.testing import make_random_checkpoint

    if not torch.cuda.is_available():
        raise SystemExit("bench_vllm.py needs a CUDA GPU (and a CUDA build of vLLM)")
    model_path = args.model
    if model_path is None:
        model_path = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / args.preset
        print(f"making a random {args.preset} checkpoint in {model_path} ...", file=sys.stderr)
        make_random_checkpoint(model_path, preset=args.preset, seq_length=256, max_position_embeddings=256)
    config = QwenConfig.from_pretrained(model_path)
    max_model_len = args.max_model_len or 4 * config.seq_length
    tps = [tp for tp in args.tp if tp <= torch.cuda.device_count()]
    new = 16  # greedy tokens compared per prompt
    gen = torch.Generator().manual_seed(0)

    # ---- 1. exactness, fp32, per alpha bucket ------------------------------------------------------
    buckets = alpha_buckets(config.seq_length, max_model_len - new, config.use_dynamic_ntk)
    lengths = {b.alpha: sorted({b.min_prompt, (b.min_prompt + b.max_prompt) // 2, b.max_prompt}) for b in buckets}
    prompts = {a: [torch.randint(0, 151643, (n,), generator=gen).tolist() for n in ls] for a, ls in lengths.items()}
    reference = qwenlm_engine(model_path, torch.float32, max_model_len, 4)
    params = SamplingParams(max_new_tokens=new, eos_token_ids=(), stop_words_ids=())
    expected = {a: [o.token_ids for o in reference.generate_batch(ps, params)] for a, ps in prompts.items()}
    del reference
    torch.cuda.empty_cache()
    rows = []
    for tp in tps:
        for alpha, ps in prompts.items():
            spec = {"model": str(model_path), "dtype": "float32", "tp": tp, "alpha": alpha, "prompts": ps,
                    "max_model_len": max_model_len, "new_tokens": new}  # fmt: skip
            got = run_worker(spec)["tokens"]
            equal = sum(g == e for g, e in zip(got, expected[alpha], strict=True))
            rows.append({"tp": tp, "alpha": alpha, "prompt_lens": lengths[alpha], "equal": equal, "of": len(ps)})
    print(f"\ngreedy tokens, vLLM vs qwenlm (fp32, {new} tokens, seq_length {config.seq_length})")
    print(f"{'TP':>3} {'alpha':>6} {'prompt lengths':>22} {'equal':>8}")
    for r in rows:
        print(f"{r['tp']:>3} {r['alpha']:>6} {str(r['prompt_lens']):>22} {r['equal']:>4}/{r['of']}")

    # ---- 2. throughput ----------------------------------------------------------------------------
    length = min(args.prompt_len, config.seq_length)
    batch = [torch.randint(0, 151643, (length,), generator=gen).tolist() for _ in range(args.prompts)]
    dtype = getattr(torch, args.dtype)
    engine = qwenlm_engine(model_path, dtype, length + args.new_tokens, args.prompts)
    params = SamplingParams(max_new_tokens=args.new_tokens, eos_token_ids=(), stop_words_ids=())
    engine.generate_batch(batch[:2], params)  # warm-up
    own = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        engine.generate_batch(batch, params)
        own.append(time.perf_counter() - start)
    del engine
    torch.cuda.empty_cache()
    tokens = args.prompts * args.new_tokens
    results = {"qwenlm": [tokens / s for s in own]}
    for tp in tps:
        spec = {"model": str(model_path), "dtype": args.dtype, "tp": tp, "alpha": 1, "prompts": batch,
                "max_model_len": length + args.new_tokens, "new_tokens": args.new_tokens,
                "rounds": args.rounds}  # fmt: skip
        results[f"vllm tp={tp}"] = [tokens / s for s in run_worker(spec)["seconds"]]
    base = statistics.median(results["qwenlm"])
    print(f"\nthroughput, {args.prompts} prompts x {length} tokens -> {args.new_tokens} new ({args.dtype})")
    print(f"{'engine':>12} {'tok/s median':>13} {'min-max':>17} {'vs qwenlm':>10}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:>12} {med:>13.0f} {min(values):>8.0f}-{max(values):<8.0f} {med / base:>9.2f}x")
    print(json.dumps({"exactness": rows, "throughput_tok_s": results, "gpu": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
