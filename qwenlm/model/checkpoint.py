"""What a checkpoint folder holds and how it can be wrong: shared by the float loader (`model.loading`) and the
quantized one (`quant.loader`), which the float loader calls, so neither imports the other's module for them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the file and tensor."""


@dataclass
class CheckpointFiles:
    """The weight files of a checkpoint and the tensor names each one holds."""

    folder: Path
    tensors: dict[str, Path]  # tensor name -> file
    format: str  # "safetensors" or "bin"

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.tensors.values()))
