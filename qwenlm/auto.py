"""Drop-in stand-ins for the transformers `Auto*` classes, so Qwen's documented code runs unchanged
except for the import (no `trust_remote_code` needed; it is accepted and ignored):

    from qwenlm import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", trust_remote_code=True).eval()
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .model.config import GenerationConfig, QwenConfig
from .model.loading import load_model
from .model.qwen import QWenLMHeadModel
from .tokenizer import QwenTokenizer

# transformers/hub arguments that mean nothing for a local folder; accepted so old code runs.
_HUB_KWARGS = {
    "trust_remote_code", "revision", "code_revision", "cache_dir", "local_files_only", "resume_download",
    "force_download", "token", "use_auth_token", "low_cpu_mem_usage", "use_safetensors", "proxies",
    "mirror", "offload_folder", "offload_state_dict", "max_memory", "use_fast",
}  # fmt: skip
_LOAD_KWARGS = {
    "device_map", "torch_dtype", "bf16", "fp16", "fp32", "attn_implementation", "progress",
    "quantization", "quantization_group_size", "quantization_config", "mmap",
}  # fmt: skip
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(QwenConfig)} - {"extra"}


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, *args: Any, **kwargs: Any) -> QwenTokenizer:
        """Load `qwen.tiktoken` (+ tokenizer_config.json) from a checkpoint folder (for an adapter folder
        without tokenizer files: from its base)."""
        for key in _HUB_KWARGS:
            kwargs.pop(key, None)
        if not os.path.isfile(os.path.join(path, "qwen.tiktoken")):
            from .finetune.adapters import tokenizer_folder

            path = tokenizer_folder(path)
        return QwenTokenizer.from_pretrained(path, *args, **kwargs)


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> QWenLMHeadModel:
        """Load a Qwen v1 checkpoint folder; see `qwenlm.model.loading.load_model` for the options.

        Accepts transformers' `dtype=`/`torch_dtype=`, `device_map=`, the reference's
        `bf16=`/`fp16=`/`fp32=`, and any config.json field as an override (e.g. `use_logn_attn=False`).

        A LoRA adapter folder (adapter_config.json, as `qwenlm finetune` or peft write it) loads its base
        (the one it records, or `base_model=`) with these options and applies the adapter: merged into
        float weights, kept beside quantized ones (`merge_adapter=False` keeps it unmerged everywhere).
        """
        adapter_options = {k: kwargs.pop(k) for k in ("base_model", "merge_adapter") if k in kwargs}
        load: dict[str, Any] = {}
        overrides: dict[str, Any] = {}
        unknown = []
        if "dtype" in kwargs:  # the transformers 5 spelling
            if "torch_dtype" in kwargs and kwargs["torch_dtype"] != kwargs["dtype"]:
                raise ValueError("dtype and torch_dtype name the same setting; give one")
            kwargs.setdefault("torch_dtype", kwargs.pop("dtype"))
        for key, value in kwargs.items():
            if key in _HUB_KWARGS:
                continue
            if key in _LOAD_KWARGS:
                load[key] = value
            elif key in _CONFIG_FIELDS:
                overrides[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise TypeError(f"AutoModelForCausalLM.from_pretrained got unknown argument(s) {sorted(unknown)}")
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from .finetune.adapters import is_adapter_dir, load_adapted_model

            if is_adapter_dir(path):
                merge = adapter_options.get("merge_adapter", True)
                return load_adapted_model(path, adapter_options.get("base_model"), merge, **load, **overrides)
        if adapter_options:
            raise TypeError(f"{sorted(adapter_options)}: only for LoRA adapter folders, and {path} is not one")
        return load_model(path, **load, **overrides)


class AutoConfig:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> QwenConfig:
        for key in _HUB_KWARGS:
            kwargs.pop(key, None)
        return QwenConfig.from_pretrained(path, **kwargs)


__all__ = ["AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig"]
