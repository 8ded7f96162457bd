"""Training checkpoints: `DIR/checkpoint-N/`, written whole or not at all, and `DIR/latest` naming the newest.

A checkpoint is written into `DIR/.checkpoint-N.tmp/` and renamed when complete (a rename is atomic), so a
run killed while saving leaves the previous checkpoint as `latest`. Each holds the model part (a full
checkpoint in the original layout, or the adapter), `optimizer.pt`, `scheduler.pt`, one `rng-R.pt` per
process and `trainer_state.json` (step, data position, the settings the data order depends on):

    folder = begin_checkpoint(out, step)    # ... write into it ...
    commit_checkpoint(out, folder, step, save_total_limit=3)
    latest = find_checkpoint(out, "latest")
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_text_atomic

LATEST = "latest"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"
ARGS_FILE = "finetune_args.json"
# What a run writes into its output folder besides checkpoints (its result too): what --overwrite removes.
RUN_FILES = (
    LATEST, LOG_FILE, ARGS_FILE, "adapter_config.json", "adapter_model.safetensors", "model.safetensors.index.json",
    "config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json",
)  # fmt: skip
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints in `output`, oldest first."""
    found = []
    for entry in output.glob("checkpoint-*"):
        match = _CHECKPOINT.fullmatch(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_checkpoint(output: Path, resume: str) -> Path:
    """The checkpoint `--resume` names: "latest" (the `latest` file, else the newest complete one) or a path.

    Raises:
        FileNotFoundError: nothing to resume from (named).
    """
    if resume != LATEST:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_FILE} in it)")
        return path
    pointer = output / LATEST
    if pointer.is_file():
        path = output / pointer.read_text(encoding="utf-8").strip()
        if (path / STATE_FILE).is_file():
            return path
    found = checkpoints(output)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {output} to continue from (start without --resume)")
    return found[-1][1]


def is_run_folder(output: Path) -> bool:
    """Whether `output` holds an earlier `qwenlm finetune` run (its arguments, log or checkpoints)."""
    return any((output / name).exists() for name in (ARGS_FILE, LOG_FILE, LATEST)) or bool(
        checkpoints(output) or list(output.glob(".checkpoint-*.tmp"))
    )


def has_result(output: Path) -> bool:
    """Whether a run finished in `output`: its result (the adapter or the full model) is written there."""
    return (output / "adapter_model.safetensors").is_file() or any(output.glob("model*.safetensors"))


def prepare_output(
    output: Path, resume: str | None, overwrite: bool, create: bool = True, model: str | os.PathLike | None = None
) -> None:
    """Refuse an output folder that holds something unless resuming or overwriting; --overwrite removes the
    previous run's checkpoints, log and result (nothing else), and only from a folder an earlier run wrote.
    `create=False` only checks.

    Raises:
        ValueError: the folder is the model being trained; or it exists, is not empty, and neither flag is
            given; or --overwrite names a folder that is not an earlier run's (nothing is removed then).
    """
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a folder")
    if model is not None and output.is_dir() and Path(model).is_dir() and output.samefile(model):
        raise ValueError(f"output {output} is the --model folder: the run would write over the model it trains; "
                         "choose a new folder")  # fmt: skip
    if resume is None and output.is_dir() and any(output.iterdir()):
        names = ", ".join(sorted(p.name for p in output.iterdir())[:5])
        if not overwrite:
            raise ValueError(
                f"output folder {output} already exists and is not empty ({names}); pass --resume to continue "
                "its run, --overwrite to start over, or choose a new folder"
            )
        if not is_run_folder(output):
            raise ValueError(
                f"--overwrite starts over only in a folder an earlier `qwenlm finetune` run wrote ({ARGS_FILE}, "
                f"{LOG_FILE} or checkpoints in it); {output} holds {names}: nothing was removed, choose a new folder"
            )
        if not create:
            return
        for path in [*(path for _, path in checkpoints(output)), *output.glob(".checkpoint-*.tmp")]:
            shutil.rmtree(path)
        for name in [*RUN_FILES, *(p.name for p in output.glob("model*.safetensors"))]:  # the last run's result too
            (output / name).unlink(missing_ok=True)
    if create:
        output.mkdir(parents=True, exist_ok=True)


def begin_checkpoint(output: Path, step: int) -> Path:
    """A fresh temporary folder for checkpoint `step` (call on the main process)."""
    temp = output / f".checkpoint-{step}.tmp"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    return temp


def commit_checkpoint(output: Path, temp: Path, step: int, save_total_limit: int | None) -> Path:
    """Rename the finished temporary folder into place, point `latest` at it, delete the oldest beyond the limit."""
    final = output / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(temp, final)
    write_text_atomic(output / LATEST, final.name + "\n")
    if save_total_limit is not None and save_total_limit > 0:
        for _, old in checkpoints(output)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """trainer_state.json: written last, so its presence marks a complete checkpoint."""
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random generator a training step draws from: the global ones (dropout, LoRA dropout) and the
    run's own `generators` (bf16-pure's stochastic rounding), by name."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generators:
        state["generators"] = {name: g.get_state() for name, g in generators.items()}
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what `rng_state` saved (`generators` by name).

    Raises:
        ValueError: a generator the run has is missing from the saved state.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"the checkpoint has no state for the {name} generator (made with other settings)")
        generator.set_state(saved[name])


def trim_log(output: Path, step: int) -> None:
    """Drop log lines after `step` (written by the run being resumed after its last checkpoint), and a line
    the killed run left half written."""
    log = output / LOG_FILE
    if not log.is_file():
        return
    kept = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # torn by the kill: its step is redone after the checkpoint anyway
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(log, "".join(line + "\n" for line in kept))
