"""Scale-out with real processes: torchrun with 2 CPU processes over gloo (FSDP full shard, DeepSpeed ZeRO-3)
trains the same global batches as one process and saves the same result; DeepSpeed config handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ft_data import write_chats
from safetensors.torch import load_file

from qwenlm.cli import main
from qwenlm.finetune.distributed import resolve_deepspeed_config, shipped_deepspeed_config

COMMON = ["--batch-size", "1", "--grad-accum", "2", "--max-steps", "3", "--lora-r", "4", "--lora-dropout", "0",
          "--learning-rate", "1e-2", "--seed", "1", "--disable_tqdm"]  # fmt: skip


def torchrun(args: list[str], extra_env: dict | None = None) -> None:
    env = {**os.environ, **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "qwenlm",
           "finetune", *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(finetune_checkpoints, tmp_path_factory):
    """One process, micro-batches of 2: the same global batches as 2 processes x 1."""
    root = tmp_path_factory.mktemp("ft-dist")
    data = write_chats(root / "data.json", count=12)
    out = root / "single"
    args = ["finetune", "--model", str(finetune_checkpoints["base"]), "--data", str(data), "--method", "lora",
            "--output", str(out), *COMMON]  # fmt: skip
    args[args.index("--batch-size") + 1] = "2"
    main(args)
    return data, out


def assert_same_adapter(folder: Path, single_out: Path, atol: float) -> None:
    mine, reference = (
        load_file(folder / "adapter_model.safetensors"),
        load_file(single_out / "adapter_model.safetensors"),
    )
    assert mine.keys() == reference.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], reference[name], rtol=0, atol=atol, msg=name)
    assert losses(folder) == pytest.approx(losses(single_out), abs=1e-5)


def test_torchrun_fsdp_two_cpu_processes(finetune_checkpoints, single, tmp_path):
    data, single_out = single
    out = tmp_path / "fsdp"
    torchrun(["--model", str(finetune_checkpoints["base"]), "--data", str(data), "--method", "lora", "--output",
              str(out), "--fsdp", "--save-steps", "2", *COMMON])  # fmt: skip
    assert_same_adapter(out, single_out, atol=1e-5)  # base-model LoRA: adapters + control-token rows, sharded
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]


def test_torchrun_deepspeed_zero3_two_cpu_processes(finetune_checkpoints, single, tmp_path):
    pytest.importorskip("deepspeed")
    data, single_out = single
    out = tmp_path / "ds"
    # ZeRO-3 with LoRA on a base model: the combination the reference refuses
    torchrun(["--model", str(finetune_checkpoints["base"]), "--data", str(data), "--method", "lora", "--output",
              str(out), "--deepspeed", "ds_zero3.json", *COMMON], {"DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert_same_adapter(out, single_out, atol=1e-5)


def test_deepspeed_config_drops_the_warmuplr_scheduler_and_fills_auto(tmp_path):
    reference = {  # the reference's finetune/ds_config_zero2.json, abridged
        "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": dict.fromkeys(("lr", "betas", "eps", "weight_decay"), "auto")},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    }  # fmt: skip
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(reference))
    options = dict(micro_batch=2, grad_accum=8, world=4, precision="bf16", max_grad_norm=1.0, lr=3e-4,
                   betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, hidden_size=64)  # fmt: skip
    config, notes = resolve_deepspeed_config(path, **options)
    assert "scheduler" not in config and "WarmupLR" in notes[0]
    assert config["train_batch_size"] == 64 and config["gradient_accumulation_steps"] == 8
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    for name in ("ds_zero2.json", "ds_zero3.json"):
        shipped, notes = resolve_deepspeed_config(name, **options)
        assert notes == [] and "scheduler" not in shipped and "optimizer" not in shipped
        assert shipped == resolve_deepspeed_config(shipped_deepspeed_config(name), **options)[0]
    with pytest.raises(ValueError, match=r"bf16.enabled=False contradicts --precision bf16"):
        resolve_deepspeed_config({**reference, "bf16": {"enabled": False}}, **options)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 contradicts"):
        resolve_deepspeed_config({**reference, "train_micro_batch_size_per_gpu": 4}, **options)
    with pytest.raises(ValueError, match=r"nothing fills \"auto\" for zero_optimization.stage"):
        resolve_deepspeed_config({"zero_optimization": {"stage": "auto"}}, **options)
