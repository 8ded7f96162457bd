"""Shared fixtures: the real `qwen.tiktoken` (fetched once per machine) and tiny checkpoints on disk,
made once per test session in the exact Hugging Face Qwen layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenlm.assets import qwen_tiktoken_path
from qwenlm.testing import make_random_checkpoint


@pytest.fixture(scope="session")
def tiktoken_file() -> Path:
    """A verified copy of the real qwen.tiktoken (from the dashscope 2.0.2 wheel)."""
    return qwen_tiktoken_path()


@pytest.fixture(scope="session")
def qwen_tokenizer(tiktoken_file):
    from qwenlm.tokenizer import QwenTokenizer

    return QwenTokenizer(vocab_file=str(tiktoken_file))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Tiny chat checkpoint (bf16 on disk like the real ones), sharded into several files."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny-chat"), preset="tiny", max_shard_size="8MB")


@pytest.fixture(scope="session")
def long_context_checkpoint(tmp_path_factory) -> Path:
    """seq_length=16, so dynamic NTK and LogN switch on for prompts of a few dozen tokens."""
    return make_random_checkpoint(
        tmp_path_factory.mktemp("tiny-long"), preset="tiny", seed=1, seq_length=16, max_position_embeddings=16
    )


@pytest.fixture(scope="session")
def finetune_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Even smaller chat and base checkpoints (1 layer, hidden 32) for finetuning tests: {"chat", "base"}."""
    shape = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, kv_channels=16, intermediate_size=64)
    root = tmp_path_factory.mktemp("finetune-ckpt")
    kinds = ("chat", "base")
    return {kind: make_random_checkpoint(root / kind, chat=kind == "chat", seed=3, **shape) for kind in kinds}


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from qwenlm.model import load_model

    return load_model(tiny_checkpoint, torch_dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def long_context_model(long_context_checkpoint):
    from qwenlm.model import load_model

    return load_model(long_context_checkpoint, torch_dtype=torch.float32, progress=False)
