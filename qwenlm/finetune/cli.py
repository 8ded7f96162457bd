"""`qwenlm finetune` and `qwenlm merge-lora` (registered by qwenlm.cli).

    qwenlm finetune --model Qwen-1_8B-Chat --data chats.json --method lora --output out --max-steps 200
    torchrun --nproc_per_node 8 -m qwenlm finetune --model_name_or_path Qwen-7B --data_path d.json --bf16 True \\
        --output_dir out --use_lora --deepspeed ds_zero2.json ...      # the reference scripts' flags work too
    qwenlm merge-lora --adapter out --output merged

The reference's `finetune.py` flag names are accepted as aliases (`--model_name_or_path`, `--data_path`,
`--use_lora`, `--q_lora`, `--bf16 True`, ...); flags that mean nothing here (`--lazy_preprocess`,
`--report_to none`, ...) are accepted and ignored; what cannot be honoured is refused with a reason.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..chat_format import DEFAULT_SYSTEM

_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}
# transformers TrainingArguments the reference scripts pass that have no effect here (accepted, ignored).
_IGNORED = ("--lazy_preprocess", "--cache_dir", "--per_device_eval_batch_size", "--ddp_find_unused_parameters",
            "--dataloader_num_workers", "--remove_unused_columns", "--logging_dir", "--logging_strategy",
            "--save_safetensors", "--tf32", "--run_name", "--ddp_timeout", "--lora_weight_path", "--local_rank",
            "--local-rank", "--save_on_each_node")  # fmt: skip


def _bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _flag(group, *names: str, help: str, default=None) -> None:
    """A switch that also takes an explicit value, as transformers' parser does (`--bf16`, `--bf16 True`)."""
    group.add_argument(*names, type=_bool, nargs="?", const=True, default=default, help=help)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    about = "Finetune a Qwen checkpoint on conversations (see the README's Finetuning section)."
    p = sub.add_parser("finetune", help="full / LoRA / Q-LoRA finetuning on conversation data", description=about)
    g = p.add_argument_group("what to train")
    g.add_argument("--model", "--model_name_or_path", dest="model", required=True, help="checkpoint folder")
    g.add_argument("--data", "--data_path", dest="data", required=True, help="JSON list or JSONL of conversations")
    g.add_argument("--output", "--output_dir", dest="output", required=True, help="output folder")
    g.add_argument("--method", choices=["full", "lora", "qlora"],
                   help="default: full, or what --use_lora / --q_lora say (as the reference)")  # fmt: skip
    _flag(g, "--use_lora", help="reference flag: LoRA (with --q_lora: Q-LoRA)")
    _flag(g, "--q_lora", help="reference flag: Q-LoRA on a 4-bit base")
    g.add_argument("--eval-data", "--eval_data_path", dest="eval_data", help="held-out data for eval loss")
    g.add_argument("--val-size", type=float, default=0, help="hold out N samples (or a fraction < 1) for eval")
    g.add_argument(
        "--mask",
        choices=["assistant", "reference"],
        default="assistant",
        help="trained tokens: assistant replies only (default), or the reference finetune.py labels",
    )
    g.add_argument("--system-message", default=DEFAULT_SYSTEM, help="for samples without a system turn")
    _flag(g, "--allow-special-in-data", help="special-token text in the data becomes control tokens "
                                             "(default: only with --mask reference)")  # fmt: skip
    g.add_argument("--model-max-length", "--model_max_length", dest="model_max_length", type=int, default=2048)
    _flag(g, "--packing", help="pack several samples per row (no attention across them)", default=False)
    _add_optimisation(p.add_argument_group("optimisation"))
    _add_lora(p.add_argument_group("LoRA / Q-LoRA"))
    _add_run(p.add_argument_group("output, logging, scale-out"))
    for name in _IGNORED:
        p.add_argument(name, nargs="?", const=True, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_finetune)


def _add_optimisation(o) -> None:
    o.add_argument("--epochs", "--num_train_epochs", dest="epochs", type=float, default=5)
    o.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=-1)
    o.add_argument("--batch-size", "--per_device_train_batch_size", dest="batch_size", type=int, default=2)
    o.add_argument("--grad-accum", "--gradient_accumulation_steps", dest="grad_accum", type=int, default=8)
    o.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float,
                   help="default 1e-5 (full) / 3e-4 (lora, qlora)")  # fmt: skip
    o.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=0.1)
    o.add_argument("--adam-beta1", "--adam_beta1", dest="adam_beta1", type=float, default=0.9)
    o.add_argument("--adam-beta2", "--adam_beta2", dest="adam_beta2", type=float, default=0.95)
    o.add_argument("--adam-epsilon", "--adam_epsilon", dest="adam_epsilon", type=float, default=1e-8)
    o.add_argument("--max-grad-norm", "--max_grad_norm", dest="max_grad_norm", type=float, default=1.0)
    o.add_argument("--lr-scheduler", "--lr_scheduler_type", dest="lr_scheduler", default="cosine",
                   choices=["cosine", "linear", "constant", "constant_with_warmup"])  # fmt: skip
    o.add_argument("--warmup-ratio", "--warmup_ratio", dest="warmup_ratio", type=float, default=0.01)
    o.add_argument("--warmup-steps", "--warmup_steps", dest="warmup_steps", type=int, default=0)
    o.add_argument("--optim", default="adamw_torch", help="adamw_torch (the reference's); others are refused")
    o.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32", "bf16-pure"], default="auto",
                   help="bf16/fp16: autocast, fp32 master weights; bf16-pure: weights, gradients and AdamW in "
                        "bf16 (half the memory of full finetuning, stochastic rounding)")  # fmt: skip
    _flag(o, "--bf16", help="same as --precision bf16")
    _flag(o, "--pure-bf16", "--pure_bf16", help="same as --precision bf16-pure (LlamaFactory's name)")
    _flag(o, "--fp16", help="same as --precision fp16 (CUDA)")
    _flag(o, "--fp32", help="same as --precision fp32")
    _flag(o, "--gradient-checkpointing", "--gradient_checkpointing", help="recompute activations (default on)",
          default=True)  # fmt: skip
    o.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    o.add_argument("--loss-chunk-size", type=int, default=1024, help="tokens per lm_head + loss chunk")
    o.add_argument("--seed", type=int, default=42)


def _add_lora(lo) -> None:
    lo.add_argument("--lora-r", "--lora_r", dest="lora_r", type=int, default=64)
    lo.add_argument("--lora-alpha", "--lora_alpha", dest="lora_alpha", type=float, default=16)
    lo.add_argument("--lora-dropout", "--lora_dropout", dest="lora_dropout", type=float, default=0.05)
    lo.add_argument("--lora-target-modules", "--lora_target_modules", dest="lora_target_modules", nargs="+",
                    default=["c_attn", "c_proj", "w1", "w2"])  # fmt: skip
    lo.add_argument("--lora_bias", default="none", help="only 'none' (the reference's default)")
    lo.add_argument("--model-kind", choices=["auto", "chat", "base"], default="auto",
                    help="base: also train the control-token rows; auto: from generation_config.json")  # fmt: skip
    lo.add_argument("--quantization", choices=["auto", "int4", "int8", "nf4"], default="auto",
                    help="Q-LoRA base: a GPTQ checkpoint as is, else int4 on the fly (nf4: bitsandbytes)")  # fmt: skip
    lo.add_argument("--quant-group-size", type=int, default=128, help="int4 on the fly: inputs per scale group")


def _add_run(r) -> None:
    r.add_argument("--save-steps", "--save_steps", dest="save_steps", type=int, default=500)
    r.add_argument("--save_strategy", choices=["steps", "no", "epoch"], default="steps")
    r.add_argument("--save-total-limit", "--save_total_limit", dest="save_total_limit", type=int)
    r.add_argument("--logging-steps", "--logging_steps", dest="logging_steps", type=int, default=1)
    r.add_argument("--eval-steps", "--eval_steps", dest="eval_steps", type=int, default=0)
    r.add_argument("--evaluation-strategy", "--evaluation_strategy", "--eval_strategy", dest="evaluation_strategy",
                   choices=["no", "steps", "epoch"], default=None)  # fmt: skip
    r.add_argument("--report_to", default="none", help="only 'none': metrics go to DIR/train_log.jsonl")
    r.add_argument("--resume", "--resume_from_checkpoint", dest="resume", nargs="?", const="latest",
                   help="continue the output folder's run (or from the checkpoint folder given)")  # fmt: skip
    _flag(r, "--overwrite", "--overwrite_output_dir", help="start over in a used output folder", default=False)
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    r.add_argument("--fsdp", nargs="?", const="full_shard", default="",
                   help="FSDP full-shard over the torchrun processes")  # fmt: skip
    r.add_argument("--deepspeed", help="DeepSpeed JSON config (ds_zero2.json / ds_zero3.json are shipped)")
    r.add_argument("--dry-run", action="store_true", help="print the memory estimate and exit (loads nothing)")
    r.add_argument("--skip-memory-check", action="store_true", help="run even if the estimate says it won't fit")
    r.add_argument("--show-example", type=int, metavar="N", help="print sample N with its trained tokens marked")
    _flag(r, "--disable_tqdm", "--no-progress", help="no progress bar", default=False)


def _method(ns: argparse.Namespace) -> str:
    if ns.method is not None:
        if ns.use_lora is not None or ns.q_lora is not None:
            wanted = "qlora" if ns.q_lora else "lora" if ns.use_lora else "full"
            if wanted != ns.method:
                raise ValueError(f"--method {ns.method} contradicts --use_lora/--q_lora (which mean {wanted})")
        return ns.method
    if ns.q_lora:
        return "qlora"
    return "lora" if ns.use_lora else "full"


def _precision(ns: argparse.Namespace) -> str:
    chosen = [name for name in ("bf16", "fp16", "fp32") if getattr(ns, name)]
    if ns.pure_bf16:  # with --bf16 too, as LlamaFactory's pair `--bf16 --pure_bf16`
        chosen = ["bf16-pure"] + [name for name in chosen if name != "bf16"]
    if len(chosen) > 1 or chosen and ns.precision not in ("auto", chosen[0]):
        raise ValueError(f"conflicting precision flags: {chosen + ([ns.precision] if ns.precision != 'auto' else [])}")
    return chosen[0] if chosen else ns.precision


def _check_unsupported(ns: argparse.Namespace) -> None:
    if ns.optim not in ("adamw_torch", "adamw_hf", "adamw_torch_fused"):
        raise ValueError(f"--optim {ns.optim}: qwenlm trains with AdamW (adamw_torch) only")
    if ns.lora_bias != "none":
        raise ValueError(f"--lora_bias {ns.lora_bias}: only 'none' is supported (the reference's default)")
    if ns.save_strategy == "epoch":
        raise ValueError("--save_strategy epoch is not supported; use --save-steps N")
    if ns.evaluation_strategy == "epoch":
        raise ValueError("--evaluation_strategy epoch is not supported; use --eval-steps N")
    if ns.report_to not in ("none", "None", None):
        print(f"note: --report_to {ns.report_to} ignored: metrics go to OUTPUT/train_log.jsonl", file=sys.stderr)


def train_args_from(ns: argparse.Namespace):
    """TrainArgs from parsed `qwenlm finetune` flags (reference aliases translated).

    Raises:
        ValueError: contradicting or unsupported flags.
    """
    from .args import LoraArgs, TrainArgs

    _check_unsupported(ns)
    lora = LoraArgs(r=ns.lora_r, alpha=ns.lora_alpha, dropout=ns.lora_dropout,
                    target_modules=tuple(ns.lora_target_modules), model_kind=ns.model_kind,
                    quantization=ns.quantization, quant_group_size=ns.quant_group_size)  # fmt: skip
    eval_steps = ns.eval_steps if ns.evaluation_strategy != "no" else 0
    return TrainArgs(
        model=ns.model, data=ns.data, output=ns.output, method=_method(ns), eval_data=ns.eval_data,
        val_size=ns.val_size, epochs=ns.epochs, max_steps=ns.max_steps, batch_size=ns.batch_size,
        grad_accum=ns.grad_accum, learning_rate=ns.learning_rate, weight_decay=ns.weight_decay,
        adam_beta1=ns.adam_beta1, adam_beta2=ns.adam_beta2, adam_epsilon=ns.adam_epsilon,
        max_grad_norm=ns.max_grad_norm, lr_scheduler=ns.lr_scheduler, warmup_ratio=ns.warmup_ratio,
        warmup_steps=ns.warmup_steps, model_max_length=ns.model_max_length, mask=ns.mask,
        system_message=ns.system_message, allow_special_in_data=ns.allow_special_in_data,
        precision=_precision(ns), gradient_checkpointing=ns.gradient_checkpointing,
        loss_chunk_size=ns.loss_chunk_size, seed=ns.seed,
        save_steps=0 if ns.save_strategy == "no" else ns.save_steps, save_total_limit=ns.save_total_limit,
        logging_steps=ns.logging_steps, eval_steps=eval_steps, packing=ns.packing, device=ns.device,
        fsdp=bool(ns.fsdp), deepspeed=ns.deepspeed, resume=ns.resume, overwrite=ns.overwrite, lora=lora,
    )  # fmt: skip


def cmd_finetune(ns: argparse.Namespace) -> None:
    args = train_args_from(ns)
    if ns.show_example is not None:
        from .preview import show_example

        print(show_example(args, ns.show_example, color=sys.stdout.isatty()))
        return
    if ns.dry_run:
        from .memory import estimate_memory

        estimate = estimate_memory(args)
        how = f"{args.method} ({args.precision})" if args.pure_bf16 else args.method
        print(f"memory estimate for {how} on {args.model} (per process):\n{estimate.report()}")
        return
    from .trainer import train

    result = train(args, progress=not ns.disable_tqdm, skip_memory_check=ns.skip_memory_check)
    if os.environ.get("RANK", "0") != "0":
        return
    what = "model" if args.method == "full" else "adapter"
    loss = f", final loss {result.loss:.4f}" if result.loss is not None else ""
    eval_loss = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(f"done: {result.steps} steps{loss}{eval_loss}; {what} in {result.output}", file=sys.stderr)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-lora", help="merge a LoRA/Q-LoRA adapter into its float base (original layout)")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + weights)")
    p.add_argument("--output", "-o", required=True, help="new folder for the merged checkpoint")
    p.add_argument("--model", "--base", dest="model", help="float base checkpoint (default: the adapter's)")
    p.add_argument("--requantize", choices=["gptq", "rtn"], help="quantize the merged model (as qwenlm quantize)")
    p.add_argument("--bits", type=int, choices=[4, 8], help="with --requantize: 4 (default) or 8")
    p.add_argument("--group-size", type=int, help="with --requantize: 128 (default), or -1 for one group per row")
    p.add_argument("--calibration", help="calibration data for --requantize gptq (as qwenlm quantize)")
    p.set_defaults(func=cmd_merge)


def cmd_merge(ns: argparse.Namespace) -> None:
    from .merge import merge_lora

    given = [flag for flag, value in (("--bits", ns.bits), ("--group-size", ns.group_size),
                                      ("--calibration", ns.calibration)) if value is not None]  # fmt: skip
    if given and ns.requantize is None:
        raise ValueError(f"{', '.join(given)} only apply with --requantize gptq|rtn; add it or drop them")
    if ns.calibration is not None and ns.requantize == "rtn":
        raise ValueError("--calibration is for --requantize gptq; rtn needs no data")
    ns.bits = 4 if ns.bits is None else ns.bits
    ns.group_size = 128 if ns.group_size is None else ns.group_size
    out = merge_lora(ns.adapter, ns.output, ns.model, ns.requantize, ns.bits, ns.group_size, ns.calibration)
    quantized = f", re-quantized ({ns.requantize} {ns.bits}-bit)" if ns.requantize else ""
    print(f"wrote the merged checkpoint to {out}{quantized}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this room's subcommands to the `qwenlm` parser."""
    _add_finetune(sub)
    _add_merge(sub)
