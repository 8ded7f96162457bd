"""`qwenlm merge-lora`: an adapter merged into its float base, written as a plain checkpoint (original
layout), optionally re-quantized to GPTQ. Tensors stream shard by shard, so memory stays near one shard.

A Q-LoRA adapter trained on a GPTQ base merges into the float checkpoint that base was made from
(`--model`), then `--requantize gptq|rtn` makes a new 4/8-bit checkpoint of the result:

    merge_lora("out/qlora", "merged-int4", base="Qwen-7B-Chat", requantize="gptq", bits=4)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from ..model.loading import find_checkpoint_files, iter_shards
from ..quant.config import QuantizationConfig
from .adapters import Adapter, AdapterError, merged_weight, read_adapter, replaced_rows, resolve_base
from .export import write_model_folder


def _merged_tensors(adapter: Adapter, base: Path, found: set[str], progress: bool) -> Iterator[tuple[str, Tensor]]:
    for _, tensors in iter_shards(find_checkpoint_files(base), progress=progress):
        for name, tensor in tensors:
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in adapter.lora:
                a, b = adapter.lora[module]
                tensor = merged_weight(tensor, a, b, adapter.scaling(module))
                found.add(module)
            if leaf == "weight" and module in adapter.token_rows:
                tensor = replaced_rows(tensor, *adapter.token_rows[module])
                found.add(module)
            yield name, tensor


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output folder {output} already exists and is not empty; choose a new folder")


def merge_lora(
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike,
    base: str | os.PathLike | None = None,
    requantize: str | None = None,
    bits: int = 4,
    group_size: int = 128,
    calibration: str | None = None,
    progress: bool = True,
) -> Path:
    """Merge `adapter_dir` into its base (or `base`) and write the result to `output`.

    Args:
        requantize: None, "gptq" (calibrated; `calibration` as `qwenlm quantize` reads it) or "rtn".

    Raises:
        FileNotFoundError: adapter or base missing.
        ValueError: a quantized base (merge into its float original instead), an output folder in use, an
            adapter module the base does not have.
    """
    adapter = read_adapter(adapter_dir)
    base_dir = resolve_base(adapter, base)
    if QuantizationConfig.from_pretrained(base_dir) is not None:
        raise ValueError(
            f"{base_dir} is a GPTQ (quantized) checkpoint and cannot be merged into. A Q-LoRA adapter merges into "
            "the float checkpoint the quantized one was made from: pass it with --model, and add --requantize "
            "gptq|rtn to get a quantized result again"
        )
    output = Path(output)
    _check_output(output)
    merged_dir = output if requantize is None else output.with_name(f".{output.name}.merged-{os.getpid()}")
    partial = merged_dir.with_name(f".{merged_dir.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        found: set[str] = set()
        write_model_folder(partial, _merged_tensors(adapter, base_dir, found, progress), base_dir)
        missing = sorted((set(adapter.lora) | set(adapter.token_rows)) - found)
        if missing:
            raise AdapterError(f"{base_dir} has no weight for adapter module(s) {missing[:5]}")
        if merged_dir.exists():
            merged_dir.rmdir()
        partial.rename(merged_dir)
        if requantize is not None:
            from ..quant.quantize import quantize_checkpoint

            quantize_checkpoint(merged_dir, output, bits, group_size, requantize, calibration, progress=progress)
    finally:
        for temp in (partial, merged_dir if requantize is not None else None):
            if temp is not None and temp.exists():
                shutil.rmtree(temp)
    return output
