"""One process or many (torchrun): plain, DDP, FSDP full-shard, or DeepSpeed ZeRO, behind one small interface.

`torchrun --nproc_per_node N -m qwenlm finetune ...` sets WORLD_SIZE/RANK/LOCAL_RANK; `setup` joins the
process group (nccl on GPUs, gloo on CPU). The runner owns the wrapped loss module and what differs per
engine: backward, the optimizer step, and gathering full state dicts on rank 0 for saving:

    env = setup("auto")
    runner = TorchRunner(CausalLMLoss(model), env, fsdp=True)
    loss_sum, n = runner.module(input_ids, labels)
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..files import read_json_object

SHIPPED_DEEPSPEED_CONFIGS = ("ds_zero2.json", "ds_zero3.json")


@dataclass
class Env:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # the process group was made here (and is destroyed by `shutdown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "auto", group_of_one: bool = False) -> Env:
    """Read torchrun's environment, pick the device and join the process group when there are several.

    `group_of_one`: also make a process group when running alone (DeepSpeed needs one; without torchrun's
    variables it would look for MPI, the reference's "single-GPU DeepSpeed" trap).

    Raises:
        RuntimeError: a CUDA device asked for where there is none.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} but CUDA is not available; use --device cpu")
        torch.cuda.set_device(chosen)
    if world == 1 and group_of_one and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")  # fmt: skip
    owns = (world > 1 or group_of_one) and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Env(rank, world, local_rank, chosen, owns)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(env: Env, value: float) -> float:
    """Sum of `value` over all processes (the value itself when alone)."""
    if not env.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item())


def shutdown(env: Env) -> None:
    """Leave the process group if `setup` made it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _strip(state: dict[str, Tensor], prefix: str = "model.") -> dict[str, Tensor]:
    """Names relative to the Qwen model (the loss wrapper adds `model.`)."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# torch: one process, DDP, FSDP2
# --------------------------------------------------------------------------------------------------
class TorchRunner:
    """Plain / DDP / FSDP (torch's `fully_shard`: every block its own unit, the rest in the root)."""

    def __init__(self, loss_module: nn.Module, env: Env, fsdp: bool = False) -> None:
        self.env, self.fsdp = env, fsdp
        self.inner = loss_module
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in loss_module.model.transformer.h:
                fully_shard(block)
            fully_shard(loss_module)
            self.module = loss_module
        elif env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [env.device.index] if env.device.type == "cuda" else None
            self.module = DistributedDataParallel(loss_module, device_ids=ids)
        else:
            self.module = loss_module

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.inner.named_parameters() if p.requires_grad]

    def accumulate(self, last: bool):
        """Context for one micro-batch: gradients are only synchronised on the last of a step (DDP/FSDP)."""
        if self.fsdp:
            self.module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.env.distributed and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, scaler=None) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def micro_step(self) -> None:
        """Nothing to do after a micro-batch (DeepSpeed's engine steps here)."""

    def step(self, optimizer, scheduler, max_grad_norm: float, scaler=None) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients; returns the gradient norm."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = self.parameters()
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def model_state(self, trainable_only: bool) -> dict[str, Tensor]:
        """Full (unsharded) tensors on the CPU, on rank 0 (other ranks get an empty dict under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return _strip(get_model_state_dict(self.module, options=options))

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.module, optimizer, options=options)

    def load_state(self, model_state: dict[str, Tensor], optimizer=None, optimizer_state=None) -> None:
        """Load full state dicts (as `model_state`/`optimizer_state` return them) on every rank."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        prefixed = {f"model.{k}": v for k, v in model_state.items()}
        set_model_state_dict(self.module, prefixed, options=options)
        if optimizer is not None and optimizer_state is not None:
            set_optimizer_state_dict(self.module, optimizer, optimizer_state, options=options)


# --------------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------------
def shipped_deepspeed_config(name: str) -> Path:
    """Path of a config shipped with qwenlm (`ds_zero2.json`, `ds_zero3.json`)."""
    return Path(str(resources.files("qwenlm.finetune") / "configs" / name))


def resolve_deepspeed_config(
    config: str | os.PathLike | dict, *, micro_batch: int, grad_accum: int, world: int, precision: str,
    max_grad_norm: float, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, hidden_size: int,
) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """A DeepSpeed config with every "auto" filled from qwenlm's flags, and what was changed, for a warning.

    A `scheduler` block is removed: qwenlm's schedule (cosine with warm-up by default) is the one that runs.
    The reference's configs carry `WarmupLR` there, which silently replaced `--lr_scheduler_type cosine`
    (its users' LR never decayed). `ds_zero2.json`/`ds_zero3.json` name the shipped configs.

    ZeRO bucket sizes left "auto" get transformers' values for the model's hidden size.

    Raises:
        FileNotFoundError / ValueError: a missing or invalid file, a value that contradicts the flags, an
            "auto" that nothing fills (named).
    """
    if isinstance(config, dict):
        data, source = copy.deepcopy(config), "config"
    else:
        path = Path(config)
        if not path.is_file() and path.name in SHIPPED_DEEPSPEED_CONFIGS and len(path.parts) == 1:
            path = shipped_deepspeed_config(path.name)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {config} does not exist (shipped: {SHIPPED_DEEPSPEED_CONFIGS})")
        data = read_json_object(path, "DeepSpeed config")
        source = str(path)
    notes = []
    if "scheduler" in data:
        kind = data.pop("scheduler", {}).get("type", "?")
        notes.append(f"{source}: removed its scheduler block ({kind}); qwenlm's --lr_scheduler_type schedule runs")
    filled = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world, "gradient_clipping": max_grad_norm,
    }  # fmt: skip
    for key, value in filled.items():
        if data.get(key, "auto") == "auto":
            data[key] = value
        elif data[key] != value:
            raise ValueError(f'{source}: {key}={data[key]} contradicts the command line ({value}); use "auto"')
    for block, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = data.setdefault(block, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
        elif bool(section["enabled"]) != wanted:
            raise ValueError(f"{source}: {block}.enabled={section['enabled']} contradicts --precision {precision}")
    params = data.get("optimizer", {}).get("params", {})
    defaults = {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay}
    for key, value in defaults.items():
        if params.get(key) == "auto":
            params[key] = value
    zero = data.get("zero_optimization", {})
    square = hidden_size * hidden_size
    buckets = {"reduce_bucket_size": square, "stage3_prefetch_bucket_size": int(0.9 * square),
               "stage3_param_persistence_threshold": 10 * hidden_size}  # fmt: skip
    for key, value in buckets.items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = _auto_keys(data)
    if left:
        raise ValueError(f'{source}: nothing fills "auto" for {", ".join(left)}; give values')
    return data, notes


def _auto_keys(data: Any, path: str = "") -> list[str]:
    if isinstance(data, dict):
        return [k for key, value in data.items() for k in _auto_keys(value, f"{path}{key}.")]
    return [path.rstrip(".")] if data == "auto" else []


class DeepSpeedRunner:
    """DeepSpeed engine around the loss module; it applies its own gradient accumulation and clipping."""

    def __init__(self, loss_module: nn.Module, env: Env, config: dict, optimizer, make_scheduler) -> None:
        ds = importlib.import_module("deepspeed")
        self.ds, self.env, self.inner = ds, env, loss_module
        self.stage = int(config.get("zero_optimization", {}).get("stage", 0))
        client_optimizer = None if "optimizer" in config else optimizer
        self.module, self.optimizer, _, self.scheduler = ds.initialize(
            model=loss_module, optimizer=client_optimizer, lr_scheduler=make_scheduler, config=config,
            model_parameters=[p for p in loss_module.parameters() if p.requires_grad],
        )  # fmt: skip

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.inner.named_parameters() if p.requires_grad]

    def accumulate(self, last: bool):
        self.module.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, scaler=None) -> None:
        self.module.backward(loss, scale_wrt_gas=False)  # the loss is already normalised per optimizer step

    def micro_step(self) -> None:
        """After every micro-batch's backward: the engine steps the optimizer and schedule at the boundary."""
        self.module.step()

    def step(self, optimizer, scheduler, max_grad_norm: float, scaler=None) -> float:
        norm = self.module.get_global_grad_norm()  # the engine already stepped (micro_step on the last batch)
        return float(norm) if norm is not None else float("nan")

    def model_state(self, trainable_only: bool) -> dict[str, Tensor]:
        named = [(n, p) for n, p in self.inner.named_parameters() if p.requires_grad or not trainable_only]
        context = (
            self.ds.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
            if self.stage == 3
            else contextlib.nullcontext()
        )
        with context:
            state = {n: p.detach().to("cpu", copy=True) for n, p in named} if self.env.is_main else {}
        return _strip(state)

    def save(self, folder: Path) -> None:
        self.module.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.module.load_checkpoint(str(folder), tag="deepspeed")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {folder / 'deepspeed'}")
