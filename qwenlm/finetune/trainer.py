"""The training loop for full, LoRA and Q-LoRA: one loop, one process or many.

AdamW, warm-up + cosine (or linear/constant) that actually runs and is logged every step, gradient
accumulation with the loss normalised by the trained tokens of the whole step, clipping, periodic atomic
checkpoints, exact resume, eval loss, a progress bar and `DIR/train_log.jsonl`:

    result = train(TrainArgs(model="Qwen-1_8B-Chat", data="chats.json", output="out", method="lora"))
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..model.loading import find_checkpoint_files, iter_shards, load_model
from ..quant.config import QuantizationConfig
from ..tokenizer import QwenTokenizer
from . import checkpoint as ckpt
from .args import TrainArgs
from .data import SFTDataset, build_dataset, collate, pack, read_records, split_validation, trained_tokens
from .distributed import (
    DeepSpeedRunner,
    Env,
    TorchRunner,
    all_reduce_sum,
    barrier,
    resolve_deepspeed_config,
    setup,
    shutdown,
)
from .export import TOKENIZER_FILES, copy_support_files, stored_dtype, write_model_folder
from .loss import CausalLMLoss, enable_gradient_checkpointing
from .memory import estimate_memory, parameter_count
from .optim import BF16AdamW
from .schedule import Plan, lr_factor, make_plan

# The settings the data order, the meaning of a step and the learning-rate schedule (restored from the
# checkpoint, not rebuilt) depend on: a resumed run must match them.
RESUME_KEYS = ("method", "batch_size", "grad_accum", "seed", "model_max_length", "mask", "packing", "pure_bf16",
               "peak_lr", "lr_scheduler", "warmup_ratio", "warmup_steps")  # fmt: skip


@dataclass
class TrainResult:
    """What a finished run produced."""

    output: Path
    steps: int
    loss: float | None = None  # the last logged training loss
    eval_loss: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Run:
    """Everything the loop needs, built once."""

    args: TrainArgs
    env: Env
    output: Path
    tokenizer: QwenTokenizer
    train_set: SFTDataset
    eval_set: SFTDataset | None
    plan: Plan
    model: torch.nn.Module
    token_ids: list[int] | None
    runner: Any
    optimizer: Any
    scheduler: Any
    dtype: torch.dtype
    scaler: Any = None
    log_lines: list[dict[str, Any]] = field(default_factory=list)


def _say(env: Env, text: str) -> None:
    if env.is_main:
        tqdm.write(text, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Building the run
# --------------------------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else fp32. fp16 needs a GPU. bf16-pure computes in bf16 too.

    Raises:
        ValueError: fp16 on CPU.
    """
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs a CUDA GPU (loss scaling); on CPU use --bf16 True or fp32")
    dtypes = {"bf16": torch.bfloat16, "bf16-pure": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return dtypes[precision]


def load_datasets(args: TrainArgs, tokenizer: QwenTokenizer, progress: bool) -> tuple[SFTDataset, SFTDataset | None]:
    """Tokenize the training data (and eval data or a held-out split); counts are reported, not hidden.

    Raises:
        DataError: a malformed file or sample; no sample left to train.
    """
    records = read_records(args.data)
    eval_records = read_records(args.eval_data) if args.eval_data else None
    if args.val_size:
        records, eval_records = split_validation(records, args.val_size, args.seed)
    options = dict(system_message=args.system_message, mask=args.mask, encode_special=args.encode_special)
    train_set = build_dataset(tokenizer, records, args.model_max_length, progress=progress, **options)
    if not train_set.examples:
        raise ValueError(f"{args.data}: no sample has anything to train at --model-max-length {args.model_max_length}")
    eval_set = None
    if eval_records is not None:
        eval_set = build_dataset(tokenizer, eval_records, args.model_max_length, progress=progress, **options)
    if args.packing:
        train_set = _packed(train_set, args)
    return train_set, eval_set


def _packed(dataset: SFTDataset, args: TrainArgs) -> SFTDataset:
    """Rows of several samples each (their order shuffled once with the seed before packing)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    rows = pack([dataset.examples[i] for i in order], args.model_max_length)
    return SFTDataset(rows, dataset.stats, [f"packed row {i}" for i in range(len(rows))])


def _is_gptq(path: str) -> bool:
    return QuantizationConfig.from_pretrained(path) is not None


def build_model(args: TrainArgs, env: Env, dtype: torch.dtype, tokenizer: QwenTokenizer):
    """Load the model for `args.method` (full: fp32 master weights, or bf16 with bf16-pure; lora: the base in
    `dtype`; qlora: a 4-bit base), add the adapter (bf16 with bf16-pure), switch on gradient checkpointing.
    Returns (model, trained token rows or None).

    Raises:
        ValueError: full/lora asked on a GPTQ checkpoint.
    """
    device = str(env.device)
    if args.method in ("full", "lora") and _is_gptq(args.model):
        raise ValueError(f"{args.model} is a GPTQ (quantized) checkpoint: use --method qlora, or its float original")
    token_ids = None
    if args.method == "full":
        master = torch.bfloat16 if args.pure_bf16 else torch.float32
        model = load_model(args.model, torch_dtype=master, device_map=device, progress=False)
    else:
        from .lora import add_lora, model_kind

        custom = None
        if args.method == "lora":
            model = load_model(args.model, torch_dtype=dtype, device_map=device, progress=False)
        else:
            from .qlora import load_quantized_base, lora_layer_types

            model = load_quantized_base(args.model, args.lora, dtype, device)
            custom = lora_layer_types()
        kind = args.lora.model_kind if args.lora.model_kind != "auto" else model_kind(args.model)
        if kind == "base":
            token_ids = [tokenizer.eod_id, tokenizer.im_start_id, tokenizer.im_end_id]
        torch.manual_seed(args.seed)  # adapter init
        add_lora(model, args.lora, token_ids, custom)
        if args.pure_bf16:  # peft makes fp32 adapters
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, token_ids


def make_optimizer(named_params, args: TrainArgs):
    """AdamW; no weight decay on biases and norm weights (1-d tensors), as transformers' Trainer. bf16-pure:
    BF16AdamW (bf16 moments, stochastic rounding seeded with the run's seed)."""
    decay = [p for _, p in named_params if p.dim() >= 2]
    rest = [p for _, p in named_params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (args.adam_beta1, args.adam_beta2)
    if args.pure_bf16:
        return BF16AdamW(groups, lr=args.peak_lr, betas=betas, eps=args.adam_epsilon, seed=args.seed)
    return torch.optim.AdamW(groups, lr=args.peak_lr, betas=betas, eps=args.adam_epsilon)


def make_scheduler(optimizer, plan: Plan, args: TrainArgs):
    def factor(step: int) -> float:
        return lr_factor(step, plan.total_steps, plan.warmup_steps, args.lr_scheduler)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _build_runner(args: TrainArgs, env: Env, model, plan: Plan, dtype: torch.dtype):
    loss_module = CausalLMLoss(model, args.loss_chunk_size)
    if args.deepspeed:
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        config, notes = resolve_deepspeed_config(
            args.deepspeed, micro_batch=args.batch_size, grad_accum=args.grad_accum, world=env.world,
            precision=precision, max_grad_norm=args.max_grad_norm, lr=args.peak_lr,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
            hidden_size=model.config.hidden_size,
        )  # fmt: skip
        for note in notes:
            _say(env, f"warning: {note}")
        named = [(n, p) for n, p in loss_module.named_parameters() if p.requires_grad]
        optimizer = make_optimizer(named, args)
        runner = DeepSpeedRunner(loss_module, env, config, optimizer, lambda opt: make_scheduler(opt, plan, args))
        return runner, runner.optimizer, runner.scheduler
    runner = TorchRunner(loss_module, env, fsdp=args.fsdp)
    named = [(n, p) for n, p in runner.module.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(named, args)
    return runner, optimizer, make_scheduler(optimizer, plan, args)


def prepare(args: TrainArgs, progress: bool = True, skip_memory_check: bool = False) -> _Run:
    """Everything before the first step: process group, output folder, data, memory check, model, optimizer."""
    env = setup(args.device, group_of_one=args.deepspeed is not None)
    output = Path(args.output)
    ckpt.prepare_output(output, args.resume, args.overwrite, create=False, model=args.model)  # refuse before any work
    if args.resume and ckpt.has_result(output):
        raise ValueError(f"{output} holds a finished run (its result is written); --resume continues an interrupted "
                         "one: pass --overwrite to train again, or choose a new folder")  # fmt: skip
    dtype = resolve_precision(args.precision, env.device)
    if args.fsdp and not env.distributed:
        _say(env, "note: --fsdp with one process shards nothing; start with torchrun --nproc_per_node N")
    if dtype == torch.float16 and args.fsdp:
        raise ValueError("fp16 with --fsdp is not supported (it needs a sharded loss scaler); use bf16")
    tokenizer = QwenTokenizer.from_pretrained(args.model)
    train_set, eval_set = load_datasets(args, tokenizer, progress and env.is_main)
    _say(env, train_set.stats.summary(f"train data {args.data}"))
    if eval_set is not None:
        _say(env, eval_set.stats.summary("eval data"))
    estimate = estimate_memory(args, env.world, str(env.device))
    if estimate.fits is False:
        message = f"this run is estimated not to fit in memory:\n{estimate.report()}"
        if not skip_memory_check:
            raise RuntimeError(f"{message}\n(an estimate; --skip-memory-check runs anyway)")
        _say(env, f"warning: {message}")
    if env.is_main:
        ckpt.prepare_output(output, args.resume, args.overwrite, model=args.model)
    barrier(env)
    plan = make_plan(len(train_set), args.batch_size, args.grad_accum, env.world, args.epochs, args.max_steps,
                     args.warmup_ratio, args.warmup_steps, args.seed)  # fmt: skip
    model, token_ids = build_model(args, env, dtype, tokenizer)
    runner, optimizer, scheduler = _build_runner(args, env, model, plan, dtype)
    torch.manual_seed(args.seed + env.rank)  # dropout: each process its own stream (the init above is shared)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and not args.deepspeed else None
    run = _Run(args, env, output, tokenizer, train_set, eval_set, plan, model, token_ids, runner, optimizer,
               scheduler, dtype, scaler)  # fmt: skip
    trainable = sum(getattr(p, "ds_numel", p.numel()) for _, p in runner.named_trainable())  # ZeRO-3: partitioned
    total = parameter_count(model.config)
    _say(env, f"{args.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%); "
              f"{plan.total_steps} steps of {args.batch_size} x {args.grad_accum} x {env.world} samples; "
              f"peak lr {args.peak_lr:g}, {args.lr_scheduler} after {plan.warmup_steps} warm-up steps")  # fmt: skip
    return run


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------
def _batch(run: _Run, indices: list[int]) -> dict[str, torch.Tensor]:
    examples = [run.train_set.examples[i] for i in indices]
    return _to_batch(run, examples)


def _to_batch(run: _Run, examples) -> dict[str, torch.Tensor]:
    """Dynamic padding; packed rows (input_ids, labels, segment) also get their segment numbers (0 = pad)."""
    batch = collate([(e[0], e[1]) for e in examples], run.tokenizer.eod_id)
    if len(examples[0]) == 3:
        segments = torch.zeros_like(batch["input_ids"])
        for row, (_, _, segment) in enumerate(examples):
            segments[row, : len(segment)] = torch.tensor(segment)
        batch["segments"] = segments
    return {k: v.to(run.env.device) for k, v in batch.items()}


def _autocast(run: _Run):
    if run.dtype == torch.float32 or run.args.deepspeed:
        return contextlib.nullcontext()
    return torch.autocast(run.env.device.type, dtype=run.dtype)


def train_step(run: _Run, step: int) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches; returns its log entry."""
    plan, env, runner = run.plan, run.env, run.runner
    every_rank = [plan.micro_batches(step, r) for r in range(env.world)]
    step_tokens = sum(trained_tokens(run.train_set.examples[i][1]) for mbs in every_rank for mb in mbs for i in mb)
    seen_tokens = sum(len(run.train_set.examples[i][0]) for mbs in every_rank for mb in mbs for i in mb)
    lr = run.scheduler.get_last_lr()[0]
    run.model.train()
    loss_sum, empty = 0.0, 0
    mine = every_rank[env.rank]
    for i, indices in enumerate(mine):
        batch = _batch(run, indices)
        with runner.accumulate(last=i == len(mine) - 1), _autocast(run):
            total, count = runner.module(**batch)
            loss = total * (env.world / max(step_tokens, 1))
        empty += count == 0
        runner.backward(loss, run.scaler)
        runner.micro_step()
        loss_sum += float(total.detach())
    grad_norm = runner.step(run.optimizer, run.scheduler, run.args.max_grad_norm, run.scaler)
    loss_sum = all_reduce_sum(env, loss_sum)
    empty = int(all_reduce_sum(env, empty))
    entry = {
        "step": step + 1, "epoch": round(plan.epoch_at(step + 1), 4), "loss": loss_sum / max(step_tokens, 1),
        "learning_rate": lr, "grad_norm": grad_norm, "tokens": seen_tokens, "trained_tokens": step_tokens,
    }  # fmt: skip
    if empty:
        entry["empty_batches"] = empty
    return entry


def evaluate(run: _Run) -> float | None:
    """Mean token loss over the eval set (every process takes a share; all run the same number of batches)."""
    if run.eval_set is None or not run.eval_set.examples:
        return None
    env, examples, size = run.env, run.eval_set.examples, run.args.batch_size
    mine = list(range(env.rank, len(examples), env.world))
    per_rank = -(-len(examples) // env.world)
    batches = -(-per_rank // size)
    run.runner.module.eval()
    total = count = 0.0
    with torch.no_grad(), _autocast(run):
        for b in range(batches):
            chunk = mine[b * size : (b + 1) * size]
            real = len(chunk)
            chunk = chunk or [0]  # a process with no samples left still joins the collective forward
            loss, n = run.runner.module(**_to_batch(run, [examples[i] for i in chunk]))
            if real:
                total, count = total + float(loss), count + n
    run.runner.module.train()
    total, count = all_reduce_sum(env, total), all_reduce_sum(env, count)
    return total / count if count else None


# --------------------------------------------------------------------------------------------------
# Saving and resuming
# --------------------------------------------------------------------------------------------------
def _write_model_part(run: _Run, folder: Path, final: bool = False) -> None:
    """The model in `folder`: a full checkpoint in the original layout, or the adapter (+ tokenizer files).

    A full model's final save keeps the base's released dtype; periodic checkpoints keep the trained dtype (fp32
    master weights), so that `--resume` continues bit for bit."""
    args = run.args
    state = run.runner.model_state(trainable_only=args.method != "full")
    if not run.env.is_main:
        return
    if args.method == "full":
        dtype = torch.bfloat16 if args.pure_bf16 else (stored_dtype(args.model) if final else None)
        write_model_folder(folder, state.items(), args.model, dtype)
        return
    from .lora import save_adapter

    save_adapter(folder, state, args.lora, args.model, run.token_ids)
    copy_support_files(args.model, folder, TOKENIZER_FILES)


def _state(run: _Run, step: int) -> dict[str, Any]:
    keys = {k: getattr(run.args, k) for k in RESUME_KEYS}
    return {"step": step, "epoch": run.plan.epoch_at(step), "total_steps": run.plan.total_steps,
            "world": run.env.world, "num_examples": run.plan.num_examples, "settings": keys,
            "model": str(Path(run.args.model).resolve()), "data": str(Path(run.args.data).resolve()),
            "deepspeed": bool(run.args.deepspeed)}  # fmt: skip


def _generators(run: _Run) -> dict[str, torch.Generator]:
    """The run's own random generators, saved with each checkpoint (bf16-pure's stochastic rounding)."""
    generator = getattr(run.optimizer, "generator", None)
    return {"stochastic_rounding": generator} if generator is not None else {}


def save_checkpoint(run: _Run, step: int, rng: dict[str, Any]) -> Path | None:
    """checkpoint-`step` (atomic): model part, optimizer, schedule, each process's RNG state, trainer state."""
    env, output = run.env, run.output
    temp = ckpt.begin_checkpoint(output, step) if env.is_main else output / f".checkpoint-{step}.tmp"
    barrier(env)
    temp.mkdir(parents=True, exist_ok=True)  # a node without the shared folder keeps its RNG state locally
    _write_model_part(run, temp)
    if isinstance(run.runner, DeepSpeedRunner):
        run.runner.save(temp)
    else:
        optimizer_state = run.runner.optimizer_state(run.optimizer)
        if env.is_main:
            torch.save(optimizer_state, temp / "optimizer.pt")
            torch.save(run.scheduler.state_dict(), temp / "scheduler.pt")
            if run.scaler is not None:
                torch.save(run.scaler.state_dict(), temp / "scaler.pt")
    torch.save(rng, temp / f"rng-{env.rank}.pt")
    barrier(env)
    final = None
    if env.is_main:
        ckpt.write_state(temp, _state(run, step))
        final = ckpt.commit_checkpoint(output, temp, step, run.args.save_total_limit)
    barrier(env)
    return final


def _read_model_part(run: _Run, folder: Path) -> dict[str, torch.Tensor]:
    if run.args.method == "full":
        files = find_checkpoint_files(folder)
        return {name: t for _, tensors in iter_shards(files, progress=False) for name, t in tensors}
    from .adapters import ADAPTER_WEIGHTS
    from .lora import from_adapter_name

    return {from_adapter_name(k): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}


def resume(run: _Run) -> int:
    """Restore a checkpoint's full state; returns the step to continue from.

    Raises:
        ValueError: the checkpoint was made with settings that change the data order or the step.
    """
    folder = ckpt.find_checkpoint(run.output, run.args.resume)
    state = ckpt.read_state(folder)
    expected = {k: getattr(run.args, k) for k in RESUME_KEYS}
    changed = {k: (v, expected[k]) for k, v in state["settings"].items() if expected.get(k) != v}
    if state["world"] != run.env.world:
        changed["processes"] = (state["world"], run.env.world)
    if state["num_examples"] != run.plan.num_examples:
        changed["training samples"] = (state["num_examples"], run.plan.num_examples)
    if state["total_steps"] != run.plan.total_steps:
        changed["total steps (--max-steps / --epochs)"] = (state["total_steps"], run.plan.total_steps)
    for key, new in (("model", run.args.model), ("data", run.args.data)):
        old = state.get(key)  # a folder or file that no longer exists there was moved: nothing to compare with
        if old and Path(old).exists() and Path(new).exists() and not Path(old).samefile(new):
            changed[f"--{key}"] = (old, str(Path(new).resolve()))
    if changed:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"cannot resume from {folder}: it was made with different settings ({what})")
    if isinstance(run.runner, DeepSpeedRunner):
        run.runner.load(folder)
    else:
        optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        run.runner.load_state(_read_model_part(run, folder), run.optimizer, optimizer_state)
        run.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
        if run.scaler is not None and (folder / "scaler.pt").is_file():
            run.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=False))
    ckpt.set_rng_state(torch.load(folder / f"rng-{run.env.rank}.pt", weights_only=False), _generators(run))
    if run.env.is_main:
        ckpt.trim_log(run.output, state["step"])
    _say(run.env, f"resumed from {folder} at step {state['step']}")
    return int(state["step"])


def save_final(run: _Run) -> None:
    """The result in the output folder itself: the full model in the original layout, or the adapter."""
    _write_model_part(run, run.output, final=True)
    barrier(run.env)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def _log(run: _Run, entry: dict[str, Any]) -> None:
    run.log_lines.append(entry)
    if run.env.is_main:
        with open(run.output / ckpt.LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _warn_empty(run: _Run, entry: dict[str, Any]) -> None:
    if entry.get("empty_batches"):
        count = entry["empty_batches"]
        _say(run.env, f"warning: step {entry['step']}: {count} micro-batch(es) with no trained token (all labels "
                      "-100), the usual cause of 'loss 0': check --mask and --model-max-length")  # fmt: skip


def _evaluate_and_log(run: _Run, step: int) -> float | None:
    eval_loss = evaluate(run)
    if eval_loss is not None:
        _log(run, {"step": step, "eval_loss": eval_loss})
        _say(run.env, f"step {step}: eval loss {eval_loss:.4f}")
    return eval_loss


@contextlib.contextmanager
def _sigterm_as_interrupt(enabled: bool):
    """SIGTERM (what schedulers, containers and `kill` send) ends the loop as Ctrl-C does: with a checkpoint."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_loop(run: _Run, start: int, progress: bool = True) -> TrainResult:
    """Steps `start`..end with logging, eval and checkpoints; then the final eval and save."""
    args, env, plan = run.args, run.env, run.plan
    bar = tqdm(total=plan.total_steps, initial=start, desc=f"finetune ({args.method})", unit="step",
               disable=not (progress and env.is_main), dynamic_ncols=True)  # fmt: skip
    last_loss, started, tokens = None, time.perf_counter(), 0
    # completed steps, and the RNG state as of the next step's start
    done, rng = start, ckpt.rng_state(_generators(run))
    with _sigterm_as_interrupt(not env.distributed):
        try:
            for step in range(start, plan.total_steps):
                entry = train_step(run, step)
                done, rng = step + 1, ckpt.rng_state(_generators(run))
                tokens += entry["tokens"]
                entry["tokens_per_second"] = round(tokens / (time.perf_counter() - started), 1)
                last_loss = entry["loss"]
                _warn_empty(run, entry)
                if done % args.logging_steps == 0 or done == plan.total_steps:
                    _log(run, entry)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{entry['learning_rate']:.2e}",
                                tok_s=f"{entry['tokens_per_second']:.0f}")  # fmt: skip
                bar.update(1)
                if args.eval_steps and done % args.eval_steps == 0 and done < plan.total_steps:
                    _evaluate_and_log(run, done)
                if args.save_steps and done % args.save_steps == 0 and done < plan.total_steps:
                    save_checkpoint(run, done, rng)
        except KeyboardInterrupt:
            bar.close()
            if env.distributed:
                raise
            # A step cut short left only unapplied gradients: the state after `done` steps is what gets saved.
            saved = save_checkpoint(run, done, rng)
            raise RuntimeError(f"interrupted after step {done}; saved {saved}, continue with --resume") from None
    bar.close()
    eval_loss = _evaluate_and_log(run, plan.total_steps)
    save_final(run)
    return TrainResult(run.output, plan.total_steps, last_loss, eval_loss, run.log_lines)


def train(args: TrainArgs, progress: bool = True, skip_memory_check: bool = False) -> TrainResult:
    """Run `args` to the end (or from its checkpoint, with `args.resume`) and save the result.

    Raises:
        FileNotFoundError / ValueError / RuntimeError: bad input, named (data file and line, output folder, ...).
    """
    run = prepare(args, progress, skip_memory_check)
    try:
        start = resume(run) if args.resume else 0
        if run.env.is_main:
            (run.output / ckpt.ARGS_FILE).write_text(json.dumps(asdict(args), indent=2, default=str) + "\n")
        return run_loop(run, start, progress)
    finally:
        shutdown(run.env)
