"""Finetuning speed (tokens/s) and peak memory (RSS) of full, LoRA and Q-LoRA: qwenlm beside transformers'
Qwen2ForCausalLM + peft on the same weights (converted with `qwenlm.convert`), same data, same steps,
interleaved round by round. Every run is a fresh process, so its peak RSS (VmHWM) is its own.

    python benchmarks/bench_finetune.py --shape tiny                                   # a few seconds
    python benchmarks/bench_finetune.py --shape 1.8b --methods full full-pure lora qlora --seq-len 512 --steps 3

Settings per step: one sequence of --seq-len tokens (a synthetic chat, assistant-only labels), batch 1,
no accumulation, gradient checkpointing on, AdamW; bf16 compute (autocast) where the method allows it,
LoRA r 64 / alpha 16 on every linear of the blocks. `full` keeps fp32 master weights (16 bytes per
parameter); `full-pure` is `--precision bf16-pure` (weights, gradients, AdamW moments in bf16: 8 bytes per
parameter, stochastic rounding), beside the peer with bf16 parameters and torch's AdamW (round to nearest, as
torchtune's full-finetune recipes in bf16). A method whose `--dry-run` estimate does not fit in --memory-gib
is reported as such, not run. The peer has no Q-LoRA on CPU (its 4-bit paths, bitsandbytes and AutoGPTQ,
need CUDA), so that row has no peer. Prints a table, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwenlm.bench import vmhwm_mb

LORA_PEER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --methods name -> (qwenlm method, precision; None = --precision)
VARIANTS = {"full": ("full", None), "full-pure": ("full", "bf16-pure"), "lora": ("lora", None),
            "qlora": ("qlora", None)}  # fmt: skip
LABELS = {"full-pure": "full (bf16-pure)"}


def _data(path: Path, seq_len: int, count: int) -> Path:
    """`count` chats whose tokens come to about `seq_len` (a long reply to a short question)."""
    words = " ".join(f"word{i}" for i in range(seq_len))  # ~2 tokens per word: cut to seq_len anyway
    records = [{"conversations": [{"from": "user", "value": f"Question {i}: please write at length."},
                                  {"from": "assistant", "value": words}]} for i in range(count)]  # fmt: skip
    path.write_text(json.dumps(records))
    return path


def _lora_args(model: str):
    """The default LoRA settings; int4 groups of 128 where they divide the layers (the tiny shape needs 32)."""
    from qwenlm.finetune import LoraArgs
    from qwenlm.model.config import QwenConfig

    config = QwenConfig.from_pretrained(model)
    divides = config.hidden_size % 128 == 0 and config.mlp_width % 128 == 0
    return LoraArgs(quant_group_size=128 if divides else 32)


def worker_qwenlm(model: str, method: str, data: str, seq_len: int, steps: int, precision: str) -> dict:
    from qwenlm.finetune import TrainArgs
    from qwenlm.finetune.trainer import prepare, train_step

    with tempfile.TemporaryDirectory() as out:
        args = TrainArgs(model=model, data=data, output=out, method=method, batch_size=1, grad_accum=1,
                         max_steps=steps + 1, model_max_length=seq_len, precision=precision, save_steps=0,
                         warmup_steps=1, lora=_lora_args(model))  # fmt: skip
        run = prepare(args, progress=False, skip_memory_check=True)
        train_step(run, 0)  # warm-up step, not timed
        start, tokens = time.perf_counter(), 0
        for step in range(1, steps + 1):
            tokens += train_step(run, step)["tokens"]
        seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "peak_rss_mb": vmhwm_mb(), "step_s": seconds / steps}


def worker_peer(model: str, method: str, data: str, seq_len: int, steps: int, precision: str) -> dict:
    """transformers Qwen2ForCausalLM (+ peft LoRA) on the converted weights, the same token ids and labels."""
    import torch
    from transformers import Qwen2ForCausalLM

    from qwenlm.finetune.data import build_dataset, collate, read_records
    from qwenlm.tokenizer import QwenTokenizer

    torch.manual_seed(0)
    pure = precision == "bf16-pure"  # bf16 parameters, torch AdamW on them (torchtune's bf16 full finetuning)
    dtype = torch.bfloat16 if pure or (precision == "bf16" and method != "full") else torch.float32
    tokenizer = QwenTokenizer.from_pretrained(Path(model).parent / "qwen")
    examples = build_dataset(tokenizer, read_records(data), seq_len, progress=False).examples
    peer = Qwen2ForCausalLM.from_pretrained(model, dtype=dtype)
    peer.config.use_cache = False
    peer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        peer = get_peft_model(
            peer, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_PEER_TARGETS)
        )
    params = [p for p in peer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    peer.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision in ("bf16", "bf16-pure"))
    timed, tokens = 0.0, 0
    for step in range(steps + 1):
        batch = collate([examples[step % len(examples)]], tokenizer.eod_id)
        start = time.perf_counter()
        with autocast:
            loss = peer(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            timed += time.perf_counter() - start
            tokens += batch["input_ids"].numel()
    return {"tokens_per_s": tokens / timed, "peak_rss_mb": vmhwm_mb(), "step_s": timed / steps}


def _run_worker(engine: str, model: str, variant: str, data: Path, args) -> dict:
    method, precision = VARIANTS[variant]
    cmd = [sys.executable, __file__, "--worker", engine, "--model", model, "--method", method, "--data", str(data),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--precision", precision or args.precision]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fits(model: Path, variant: str, args) -> tuple[bool, float]:
    from qwenlm.finetune import TrainArgs
    from qwenlm.finetune.memory import GiB, estimate_memory

    method, precision = VARIANTS[variant]
    run = TrainArgs(model=str(model), data="-", output="-", method=method, batch_size=1, model_max_length=args.seq_len,
                    precision=precision or args.precision, lora=_lora_args(str(model)))  # fmt: skip
    estimate = estimate_memory(run, world=1)
    return estimate.total <= args.memory_gib * GiB, estimate.total / GiB


def _prepare_checkpoints(root: Path, shape: str) -> tuple[Path, Path]:
    from qwenlm.convert import convert_to_qwen2
    from qwenlm.testing import make_random_checkpoint

    qwen, peer = root / "qwen", root / "qwen2"
    if not (qwen / "config.json").is_file():
        print(f"writing a random {shape} checkpoint to {qwen} ...", file=sys.stderr, flush=True)
        make_random_checkpoint(qwen, preset=shape)
    if not (peer / "config.json").is_file():
        convert_to_qwen2(qwen, peer)
    return qwen, peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", help="checkpoint preset (tiny, 1.8b)")
    parser.add_argument("--workdir", help="where checkpoints are kept between runs (default: a temp folder)")
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp32", "bf16-pure"],
        help="compute precision of full/lora/qlora (full-pure is always bf16-pure)",
    )
    parser.add_argument("--memory-gib", type=float, default=24, help="memory budget for the fit check")
    parser.add_argument("--worker", choices=["qwenlm", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(2)
        work = worker_qwenlm if args.worker == "qwenlm" else worker_peer
        print(json.dumps(work(args.model, args.method, args.data, args.seq_len, args.steps, args.precision)))
        return
    with tempfile.TemporaryDirectory() as temp:
        root = Path(args.workdir or temp)
        root.mkdir(parents=True, exist_ok=True)
        qwen, peer = _prepare_checkpoints(root, args.shape)
        data = _data(root / "bench_data.json", args.seq_len, args.steps + 1)
        results = {m: {"qwenlm": [], "peer": []} for m in args.methods}
        fits = {m: _fits(qwen, m, args) for m in args.methods}
        for round_index in range(args.rounds):
            for method in args.methods:
                if not fits[method][0]:
                    continue
                engines = ["qwenlm"] + (["peer"] if method != "qlora" else [])
                for engine in engines if round_index % 2 == 0 else engines[::-1]:
                    print(f"round {round_index + 1}: {method} {engine} ...", file=sys.stderr, flush=True)
                    results[method][engine].append(_run_worker(engine, str(qwen if engine == "qwenlm" else peer),
                                                               method, data, args))  # fmt: skip
        report(results, fits, args)


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def report(results: dict, fits: dict, args) -> None:
    keys = ("shape", "seq_len", "steps", "rounds", "precision")
    summary = {**{key: getattr(args, key) for key in keys}, "methods": {}}
    print(f"\n{args.shape}, {args.seq_len} tokens/step, {args.precision}, {args.rounds} rounds x {args.steps} steps")
    print("| method | qwenlm tok/s | peer tok/s | ratio (min-max) | qwenlm peak RSS MiB | peer peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for method, engines in results.items():
        ok, estimate_gib = fits[method]
        label = LABELS.get(method, method)
        entry = {"estimate_gib": estimate_gib, "fits": ok, **engines}
        if not ok:
            print(f"| {label} | does not fit in {args.memory_gib:g} GiB (estimate {estimate_gib:.1f} GiB) | | | | |")
        else:
            ours, theirs = _median(engines["qwenlm"], "tokens_per_s"), _median(engines["peer"], "tokens_per_s")
            pairs = zip(engines["qwenlm"], engines["peer"], strict=False)
            ratios = [
                a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs if "tokens_per_s" in a and "tokens_per_s" in b
            ]
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "n/a"
            errors = [r["error"] for runs in engines.values() for r in runs if "error" in r]
            peer_speed = f"{theirs:.0f}" if theirs else ("n/a (no CPU Q-LoRA)" if method == "qlora" else "error")
            ours_mem, peer_mem = _median(engines["qwenlm"], "peak_rss_mb"), _median(engines["peer"], "peak_rss_mb")
            peer_rss = f"{peer_mem:.0f}" if peer_mem else "-"
            if ours:
                print(f"| {label} | {ours:.0f} | {peer_speed} | {ratio} | {ours_mem:.0f} | {peer_rss} |")
            else:
                print(f"| {label} | error: {errors[:1]} | | | | |")
            entry.update(ratio_median=statistics.median(ratios) if ratios else None, errors=errors)
        summary["methods"][method] = entry
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
