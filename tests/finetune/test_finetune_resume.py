"""A run killed (SIGKILL, a real process) and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from ft_data import write_chats
from safetensors.torch import load_file

from qwenlm.cli import main


def test_resume_after_kill_equals_an_uninterrupted_run(finetune_checkpoints, tmp_path):
    data = write_chats(tmp_path / "data.json")
    # LoRA with dropout (so the RNG state must be restored too) and gradient checkpointing on (the default).
    common = ["finetune", "--model", str(finetune_checkpoints["chat"]), "--data", str(data), "--method", "lora",
              "--max-steps", "12", "--batch-size", "1", "--grad-accum", "2", "--save-steps", "2", "--lora-r", "4",
              "--learning-rate", "1e-2", "--seed", "5", "--disable_tqdm", "--save-total-limit", "2"]  # fmt: skip
    main([*common, "--output", str(tmp_path / "whole")])

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qwenlm", *common, "--output", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    assert (killed / "latest").is_file(), err.decode()[-2000:]
    if (killed / "adapter_model.safetensors").is_file():
        pytest.fail("the run finished before it could be killed; make it longer")
    step = int((killed / "latest").read_text().split("-")[1])
    assert 2 <= step < 12

    main([*common, "--output", str(killed), "--resume"])
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(killed / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 13))  # lines after the checkpoint were replaced
    assert len(list(killed.glob("checkpoint-*"))) <= 2  # save_total_limit


def test_sigterm_saves_a_checkpoint_like_ctrl_c(finetune_checkpoints, tmp_path):
    """What schedulers and containers send before they kill: the run saves where it is and says how to go on."""
    import signal

    data = write_chats(tmp_path / "data.json")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "qwenlm", "finetune", "--model", str(finetune_checkpoints["chat"]), "--data",
            str(data), "--method", "lora", "--max-steps", "400", "--batch-size", "1", "--grad-accum", "1",
            "--save-steps", "1000", "--lora-r", "2", "--disable_tqdm", "--output", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, deadline = out / "train_log.jsonl", time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "no training step within two minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted after step" in err.decode(), err.decode()[-2000:]
    assert (out / "latest").is_file() and not (out / "adapter_model.safetensors").exists()
