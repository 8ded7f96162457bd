"""The `qwen` model type for transformers' AutoConfig, so vLLM reads Qwen v1 configs without remote code.

The fields, defaults, legacy (v1.0) names and checks are qwenlm's own `QwenConfig`; this class only carries
them in the `PretrainedConfig` shape vLLM passes around. It lives at module level so that vLLM can pickle it
into its worker processes.

    AutoConfig.register("qwen", QWenConfig)      # done by qwenlm.integrations.vllm.register()
    qwen_config(vllm_config.model_config.hf_config).seq_length
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from transformers import PretrainedConfig

from ...model.config import QwenConfig

_FIELDS = tuple(f.name for f in dataclasses.fields(QwenConfig) if f.name != "extra")


class QWenConfig(PretrainedConfig):
    """Qwen v1 `config.json` as a transformers config (the name the checkpoints' `auto_map` uses)."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # keys qwenlm does not read are transformers' business here
            warnings.simplefilter("ignore")
            qwen = QwenConfig.from_dict(kwargs)  # validates; maps v1.0 names; fills Qwen's defaults
        fields = {name: getattr(qwen, name) for name in _FIELDS if name != "model_type"}
        qwen.extra.setdefault("architectures", ["QWenLMHeadModel"])
        # vLLM's standard names for what Qwen calls rotary_emb_base / rotary_pct (it warns on the old ones)
        qwen.extra.update(rope_theta=qwen.rotary_emb_base, partial_rotary_factor=qwen.rotary_pct)
        super().__init__(**qwen.extra, **fields)


def qwen_config(hf_config: Any) -> QwenConfig:
    """qwenlm's `QwenConfig` from a transformers config object (for the derived sizes and the checks)."""
    return QwenConfig(**{name: getattr(hf_config, name) for name in _FIELDS if hasattr(hf_config, name)})
