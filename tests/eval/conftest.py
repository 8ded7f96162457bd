"""Fixtures of the eval tests: the benchmark files (benchmark_files.py writes them) and a tiny base checkpoint
beside the shared tiny chat one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_files import write_ceval, write_cmmlu, write_gsm8k, write_humaneval, write_mmlu, write_plugin

from qwenlm.testing import make_random_checkpoint


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    write_ceval(root / "ceval")
    write_mmlu(root / "mmlu")
    write_cmmlu(root / "cmmlu")
    write_gsm8k(root / "gsm8k")
    write_humaneval(root / "humaneval")
    write_plugin(root / "plugin")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. 天地玄黄，宇宙洪荒。\n" * 20)
    return root


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory) -> Path:
    """A tiny base (raw chat format) checkpoint."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny-base"), preset="tiny", seed=3, chat=False)


@pytest.fixture(scope="session")
def base_model(base_checkpoint):
    from qwenlm.model import load_model

    return load_model(base_checkpoint, torch_dtype=torch.float32, progress=False)
