"""The GPTQ quantization config of a checkpoint: `config.json["quantization_config"]` and/or
`quantize_config.json` (AutoGPTQ's file), parsed, cross-checked and written back in the layout that
AutoGPTQ, transformers and optimum read:

    qconfig = QuantizationConfig.from_pretrained("Qwen-7B-Chat-Int4")   # None for a float checkpoint
    qconfig.bits, qconfig.group_size, qconfig.desc_act
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..files import read_json_object, write_json_atomic

CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

# Fields that change how the tensors must be read; the two files have to agree on these. The others
# (damp_percent, true_sequential, ...) only describe how the checkpoint was made.
_FORMAT_FIELDS = ("bits", "group_size", "desc_act", "sym", "checkpoint_format", "quant_method")


class QuantizationConfigError(ValueError):
    """A quantization config that qwenlm cannot load; the message names the file and the field."""


@dataclass
class QuantizationConfig:
    """A GPTQ quantization config (spec 11.1); field names are AutoGPTQ's.

    `extra` keeps every other key (model_name_or_path, model_file_base_name, transformers' tokenizer,
    dataset, use_exllama, ...) so that a config read and written again loses nothing.
    """

    bits: int = 4
    group_size: int = 128  # -1: one group spanning all input features
    desc_act: bool = False  # act-order: g_idx is an arbitrary permutation of the groups
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    checkpoint_format: str = "gptq"  # "gptq": zero points stored minus one; "gptq_v2": stored as they are
    quant_method: str = "gptq"
    modules_to_not_convert: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source: str = field(default="quantization config", repr=False, compare=False)  # for error messages

    def __post_init__(self) -> None:
        where = self.source
        if self.quant_method != "gptq":
            raise QuantizationConfigError(
                f"{where}: quant_method {self.quant_method!r} is not supported; qwenlm loads GPTQ checkpoints "
                "(quant_method 'gptq'). For on-the-fly quantization use load_model(..., quantization='int8'|'int4')."
            )
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise QuantizationConfigError(
                f"{where}: bits={self.bits!r} is not supported; qwenlm reads 4- and 8-bit GPTQ weights "
                "(the 2- and 3-bit AutoGPTQ layouts are not implemented)"
            )
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or not (self.group_size == -1 or self.group_size > 0)
        ):
            raise QuantizationConfigError(
                f"{where}: group_size must be -1 or a positive integer, got {self.group_size!r}"
            )
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise QuantizationConfigError(
                f"{where}: checkpoint_format {self.checkpoint_format!r} is not supported; "
                f"use one of {CHECKPOINT_FORMATS}"
            )
        if self.extra.get("is_marlin_format"):
            raise QuantizationConfigError(
                f"{where}: is_marlin_format=true (weights repacked for the Marlin GPU kernel) is not supported; "
                "use the plain GPTQ checkpoint"
            )

    def group_size_for(self, in_features: int) -> int:
        """The number of input features per group for a linear with `in_features` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    # ---- reading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "quantization config") -> QuantizationConfig:
        """Build from a `quantization_config` / `quantize_config.json` dict (enum values accepted)."""
        data = _normalised(data, source)
        names = {f.name for f in fields(cls)} - {"extra", "source"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if isinstance(known.get("quant_method"), str):
            known["quant_method"] = known["quant_method"].lower()
        return cls(**known, extra=extra, source=source)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> QuantizationConfig | None:
        """Read a checkpoint folder's quantization config, or None when it has none.

        Both `config.json["quantization_config"]` (transformers/optimum) and `quantize_config.json`
        (AutoGPTQ) are read; when both exist they must agree on bits, group_size, desc_act, sym,
        checkpoint_format and quant_method.
        """
        folder = Path(path)
        from_config = (
            _read_json(folder / CONFIG_FILE).get("quantization_config") if (folder / CONFIG_FILE).is_file() else None
        )
        from_file = _read_json(folder / QUANTIZE_CONFIG_FILE) if (folder / QUANTIZE_CONFIG_FILE).is_file() else None
        if from_config is not None and not isinstance(from_config, dict):
            raise QuantizationConfigError(f"{folder / CONFIG_FILE}: 'quantization_config' must be an object")
        if from_config is None and from_file is None:
            return None
        if from_config is None:
            return cls.from_dict({"quant_method": "gptq", **from_file}, source=str(folder / QUANTIZE_CONFIG_FILE))
        config = cls.from_dict(from_config, source=f"{folder / CONFIG_FILE} (quantization_config)")
        if from_file is not None:
            other = cls.from_dict({"quant_method": "gptq", **from_file}, source=str(folder / QUANTIZE_CONFIG_FILE))
            stated = set(_normalised(from_config)) & set(
                _normalised(from_file)
            )  # a key absent from one file is no clash
            clashes = [k for k in _FORMAT_FIELDS if k in stated and getattr(config, k) != getattr(other, k)]
            if clashes:
                detail = ", ".join(f"{k}: {getattr(config, k)!r} vs {getattr(other, k)!r}" for k in clashes)
                raise QuantizationConfigError(
                    f"{folder / CONFIG_FILE} (quantization_config) and {folder / QUANTIZE_CONFIG_FILE} disagree "
                    f"({detail}); fix one of the two files"
                )
        return config

    # ---- writing -------------------------------------------------------------------------------
    def to_quantize_config_dict(self) -> dict[str, Any]:
        """The `quantize_config.json` object, as AutoGPTQ writes it (spec 11.1)."""
        data: dict[str, Any] = {
            "bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
            "desc_act": self.desc_act, "static_groups": self.static_groups, "sym": self.sym,
            "true_sequential": self.true_sequential, "model_name_or_path": None, "model_file_base_name": "model",
        }  # fmt: skip
        data.update({k: v for k, v in self.extra.items() if k in ("model_name_or_path", "model_file_base_name")})
        if self.checkpoint_format != "gptq":  # AutoGPTQ >= 0.7 and GPTQModel read it; older files lack it
            data["checkpoint_format"] = self.checkpoint_format
        if self.modules_to_not_convert:
            data["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return data

    def to_dict(self) -> dict[str, Any]:
        """The `config.json["quantization_config"]` object that transformers/optimum read."""
        data = {**self.extra, **self.to_quantize_config_dict(), "quant_method": self.quant_method}
        data["checkpoint_format"] = self.checkpoint_format
        return data

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `quantize_config.json` and set `quantization_config` in an existing `config.json`."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / QUANTIZE_CONFIG_FILE, self.to_quantize_config_dict())
        config_file = folder / CONFIG_FILE
        if config_file.is_file():
            data = _read_json(config_file)
            data["quantization_config"] = self.to_dict()
            write_json_atomic(config_file, data)


def checkpoint_quantization(config: Any) -> str | None:
    """What a loaded model's config.json says of its stored weights ("gptq-int4", ...), or None for float ones."""
    qc = config.extra.get("quantization_config") if hasattr(config, "extra") else None
    if isinstance(qc, dict) and qc.get("bits"):
        return f"{qc.get('quant_method', 'gptq')}-int{qc['bits']}"
    return None


def _normalised(data: dict[str, Any], source: str = "quantization config") -> dict[str, Any]:
    """Plain values (transformers uses str enums) and one name for the checkpoint format."""
    data = {key: getattr(value, "value", value) for key, value in data.items()}
    if "format" in data:  # transformers >= 5 writes the checkpoint format under both names
        fmt = data.pop("format")
        if data.setdefault("checkpoint_format", fmt) != fmt:
            raise QuantizationConfigError(
                f"{source}: 'format' ({fmt!r}) and 'checkpoint_format' ({data['checkpoint_format']!r}) disagree"
            )
    return data


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return read_json_object(file, "checkpoint file")
    except (OSError, ValueError) as err:
        raise QuantizationConfigError(str(err)) from None
