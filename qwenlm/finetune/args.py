"""Run settings for `qwenlm finetune`: what to train (TrainArgs) and how the adapter looks (LoraArgs).

Each field's docstring is its documentation (the CLI help is written from the same words). Defaults
follow the reference scripts (`finetune/*.sh`) unless a comment says why not.

    args = TrainArgs(model="Qwen-1_8B-Chat", data="chats.jsonl", output="out", method="lora", max_steps=100)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..chat_format import DEFAULT_SYSTEM, SFT_MASKS, SFTMask

Method = Literal["full", "lora", "qlora"]
METHODS: tuple[Method, ...] = ("full", "lora", "qlora")
Precision = Literal["auto", "bf16", "fp16", "fp32", "bf16-pure"]
PRECISIONS: tuple[Precision, ...] = ("auto", "bf16", "fp16", "fp32", "bf16-pure")
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
SCHEDULERS: tuple[Scheduler, ...] = ("cosine", "linear", "constant", "constant_with_warmup")
# The reference scripts' learning rates per method (finetune_ds.sh 1e-5; the LoRA/Q-LoRA scripts 3e-4).
DEFAULT_LR = {"full": 1e-5, "lora": 3e-4, "qlora": 3e-4}


@dataclass
class LoraArgs:
    """The LoRA adapter (also used by Q-LoRA)."""

    r: int = 64
    """Rank of the update B @ A (the reference's lora_r)."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r (0.25 with the defaults)."""
    dropout: float = 0.05
    """Dropout on the adapter's input while training."""
    target_modules: tuple[str, ...] = ("c_attn", "c_proj", "w1", "w2")
    """Module-name suffixes to adapt; `c_proj` matches both attn.c_proj and mlp.c_proj (5 linears a block)."""
    model_kind: Literal["auto", "chat", "base"] = "auto"
    """base: also train the rows of <|endoftext|>, <|im_start|>, <|im_end|> in wte and lm_head (a base model
    never learned them); chat: adapters only; auto: read generation_config.json's chat_format."""
    quantization: Literal["auto", "int4", "int8", "nf4"] = "auto"
    """Q-LoRA base: auto = a GPTQ checkpoint as it is, else int4 on the fly; nf4 needs bitsandbytes."""
    quant_group_size: int = 128
    """Inputs per scale group for int4 on the fly (must divide every layer's input size)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora target_modules is empty")


@dataclass
class TrainArgs:
    """One finetuning run."""

    model: str
    """Checkpoint folder to start from (Hugging Face layout; a GPTQ one for Q-LoRA)."""
    data: str
    """Training data: JSON list or JSONL of {"conversations": [{"from", "value"}]} or {"messages": [{"role",
    "content"}]} records."""
    output: str
    """Folder for checkpoints, train_log.jsonl and the final model or adapter."""
    method: Method = "lora"
    """full (every weight), lora (adapters on a float base) or qlora (adapters on a 4-bit base)."""
    eval_data: str | None = None
    """Held-out data in the same format, for eval loss."""
    val_size: float = 0
    """Hold out this many training samples (>= 1) or this fraction (< 1) for eval loss instead."""
    epochs: float = 5
    """Passes over the data (the reference scripts use 5); ignored when max_steps > 0."""
    max_steps: int = -1
    """Optimizer steps to run; > 0 overrides epochs."""
    batch_size: int = 2
    """Samples per micro-batch per process (the reference's per_device_train_batch_size)."""
    grad_accum: int = 8
    """Micro-batches per optimizer step."""
    learning_rate: float | None = None
    """Peak learning rate; default 1e-5 for full, 3e-4 for lora/qlora (the reference scripts')."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2 (the reference scripts' 0.95)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    lr_scheduler: Scheduler = "cosine"
    """Schedule after warm-up: cosine (to 0), linear (to 0), constant, constant_with_warmup."""
    warmup_ratio: float = 0.01
    """Warm-up length as a fraction of all steps (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Warm-up length in steps (overrides warmup_ratio)."""
    model_max_length: int = 2048
    """Tokens per sample; longer samples are cut here (and counted)."""
    mask: SFTMask = "assistant"
    """Which tokens are trained: assistant (assistant replies + their <|im_end|>\\n) or reference (the
    reference finetune.py labels, token for token)."""
    system_message: str = DEFAULT_SYSTEM
    """System message for samples whose data has none."""
    allow_special_in_data: bool | None = None
    """Let special-token text in the data become control tokens (the reference does); default: only with
    mask=reference."""
    precision: Precision = "auto"
    """Compute precision: bf16 / fp16 (autocast, fp32 master weights for what is trained) or fp32; auto =
    bf16 on a GPU that has it, else fp32. bf16-pure: what is trained is held in bf16 too, with its gradients
    and AdamW moments (8 bytes per parameter instead of 16, no fp32 copy), the weight update rounded
    stochastically (qwenlm.finetune.optim.BF16AdamW)."""
    gradient_checkpointing: bool = True
    """Recompute each block's activations in backward instead of keeping them (less memory, ~30% slower)."""
    loss_chunk_size: int = 1024
    """Trained tokens per lm_head + cross-entropy chunk (the full fp32 logits are never held at once)."""
    seed: int = 42
    """Seed for data order, adapter init and dropout."""
    save_steps: int = 500
    """Write a checkpoint every N optimizer steps (0 = only at the end)."""
    save_total_limit: int | None = None
    """Keep at most this many periodic checkpoints (oldest deleted first)."""
    logging_steps: int = 1
    """Log loss and learning rate every N steps (train_log.jsonl and the progress bar)."""
    eval_steps: int = 0
    """Compute eval loss every N steps (0 = only at the end, when there is eval data)."""
    packing: bool = False
    """Pack several samples into each model_max_length row (no attention across samples, positions restart)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK when there are GPUs)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the torchrun processes (FSDP full shard)."""
    deepspeed: str | None = None
    """A DeepSpeed JSON config (ZeRO-2/3); qwenlm's own optimizer and schedule always run."""
    resume: str | None = None
    """Continue from a checkpoint: "latest" (the output folder's) or a checkpoint-N folder."""
    overwrite: bool = False
    """Start over in an output folder that already has a run in it."""
    lora: LoraArgs = field(default_factory=LoraArgs)
    """Adapter settings (lora and qlora)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.mask not in SFT_MASKS:
            raise ValueError(f"mask must be one of {', '.join(SFT_MASKS)}, got {self.mask!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.pure_bf16 and self.deepspeed:
            raise ValueError("bf16-pure with --deepspeed: DeepSpeed keeps its own fp32 master weights; use "
                             "--precision bf16 with DeepSpeed, or bf16-pure alone or with --fsdp")  # fmt: skip
        for name in ("batch_size", "grad_accum", "model_max_length", "loss_chunk_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"give max_steps > 0 or epochs > 0 (got epochs={self.epochs}, max_steps={self.max_steps})")
        if self.val_size < 0 or self.eval_data and self.val_size:
            raise ValueError("val_size must be >= 0, and not given together with eval_data")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise ValueError("warmup_ratio must be in [0, 1) and warmup_steps >= 0")
        if self.fsdp and self.deepspeed:
            raise ValueError("choose one of fsdp and deepspeed")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other; choose one")

    @property
    def peak_lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    @property
    def pure_bf16(self) -> bool:
        """Trained parameters, their gradients and AdamW moments are bf16 (no fp32 master copy)."""
        return self.precision == "bf16-pure"

    @property
    def encode_special(self) -> bool:
        """Whether special-token text in the data is encoded as control tokens."""
        if self.allow_special_in_data is not None:
            return self.allow_special_in_data
        return self.mask == "reference"
