"""Finetuning Qwen checkpoints: full, LoRA and Q-LoRA on conversation data (`qwenlm finetune`).

    from qwenlm.finetune import TrainArgs, train, tokenize_conversation
    ids, labels = tokenize_conversation(tokenizer, {"conversations": [...]}, max_len=512, mask="assistant")
    train(TrainArgs(model="Qwen-1_8B-Chat", data="chats.json", output="out", method="lora", max_steps=100))

Importing this package needs neither peft nor deepspeed; they load when a run uses them.
"""

from __future__ import annotations

from typing import Any

from .adapters import apply_adapter, is_adapter_dir, load_adapted_model, read_adapter
from .args import LoraArgs, TrainArgs
from .data import IGNORE_INDEX, DataError, build_dataset, parse_conversation, read_records, tokenize_conversation


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from . import trainer as module

        return getattr(module, name)
    if name == "merge_lora":
        from .merge import merge_lora

        return merge_lora
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX", "DataError", "LoraArgs", "TrainArgs", "TrainResult", "apply_adapter", "build_dataset",
    "is_adapter_dir", "load_adapted_model", "merge_lora", "parse_conversation", "read_adapter", "read_records",
    "tokenize_conversation", "train",
]  # fmt: skip
