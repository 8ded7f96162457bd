"""Writing checkpoints in the original Qwen layout (safetensors with the released tensor names) + their
config, generation config and tokenizer files, so the result loads anywhere a released folder does:

    write_model_folder("out", model_state.items(), source="Qwen-1_8B-Chat", dtype=torch.bfloat16)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from ..files import read_json_object, write_json_atomic
from ..testing import _parse_size, _write_safetensors

TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json")
SUPPORT_FILES = ("generation_config.json", *TOKENIZER_FILES)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def copy_support_files(source: str | os.PathLike, folder: str | os.PathLike, names=SUPPORT_FILES) -> None:
    """Copy the generation/tokenizer files (and the reference's *.py/LICENSE/NOTICE) that `source` has."""
    source, folder = Path(source), Path(folder)
    extras = [source / name for name in names] + sorted(source.glob("*.py"))
    extras += sorted(source.glob("LICENSE*")) + sorted(source.glob("NOTICE*"))
    for file in extras:
        if file.is_file():
            shutil.copyfile(file, folder / file.name)


def stored_dtype(source: str | os.PathLike) -> torch.dtype:
    """The dtype `source`'s weights were released in (config.json `torch_dtype`; bf16 when it names none), which a
    finetuned copy keeps: fp32 master weights are for the optimizer, not a reason to double the folder's size."""
    config = read_json_object(Path(source) / "config.json", "model config")
    names = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
    return names.get(str(config.get("torch_dtype")).removeprefix("torch."), torch.bfloat16)


def write_config(source: str | os.PathLike, folder: str | os.PathLike, dtype: torch.dtype | None) -> None:
    """config.json of `source` with `torch_dtype` set to the dtype the weights are stored in."""
    config = read_json_object(Path(source) / "config.json", "model config")
    config.pop("quantization_config", None)  # a merged/trained folder holds float weights
    if dtype is not None:
        config["torch_dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    write_json_atomic(Path(folder) / "config.json", config)


def write_model_folder(
    folder: str | os.PathLike,
    tensors: Iterable[tuple[str, Tensor]],
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
) -> None:
    """Weights (converted to `dtype` if given) as safetensors shards + config and support files from `source`.

    `folder` must exist and hold no weights yet.
    """
    folder = Path(folder)

    def converted():
        for name, tensor in tensors:
            tensor = tensor.detach().to("cpu")
            yield name, (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()

    _write_safetensors(folder, converted(), _parse_size(max_shard_size))
    write_config(source, folder, dtype)
    copy_support_files(source, folder)
