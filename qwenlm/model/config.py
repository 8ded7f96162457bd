"""The architecture config (`config.json`) and the decoding defaults (`generation_config.json`).

Field names copy the Hugging Face keys verbatim, so a released `config.json` maps onto
`QwenConfig` one to one:

    config = QwenConfig.from_pretrained("Qwen-7B-Chat")      # reads config.json
    gen = GenerationConfig.from_pretrained("Qwen-7B-Chat")   # reads generation_config.json
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import read_json_object, write_json_atomic

# Keys that released config.json files carry but the model never reads. Kept quiet on load.
_INFORMATIONAL_KEYS = {
    "architectures", "auto_map", "model_type", "padded_vocab_size", "rope_theta", "onnx_safe",
    "tokenizer_type", "tokenizer_class", "params_dtype", "torch_dtype", "transformers_version",
    "_name_or_path", "initializer_range", "use_flash_attn", "activation", "pos_emb",
    "bias_dropout_fusion", "apply_residual_connection_post_layernorm", "bos_token_id",
    "eos_token_id", "resid_pdrop", "quantization_config", "scale_attn_weights",
    "keys_to_ignore_at_inference", "dtype",
}  # fmt: skip

# v1.0 (2023-08) configs used GPT-2 style names; map them onto the current ones.
_LEGACY_NAMES = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_positions": "max_position_embeddings",
    "embd_pdrop": "emb_dropout_prob",
    "attn_pdrop": "attn_dropout_prob",
}

# The reference builds its LogN table for positions 0..32766; dynamic NTK was advertised up to 32K.
LONG_CONTEXT_LIMIT = 32768


class ContextLengthError(ValueError):
    """The sequence does not fit the model's context (`QwenConfig.max_context_length`)."""


@dataclass
class QwenConfig:
    """Qwen v1 hyper-parameters, exactly the keys of a released `config.json` (spec 1.2)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    kv_channels: int = 128
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = "auto"
    intermediate_size: int = 22016  # twice the real MLP width, see `mlp_width`
    no_bias: bool = True
    tie_word_embeddings: bool = False
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False
    softmax_in_fp32: bool = False
    # Not in the reference signature but required by its modeling code: the training context,
    # the reference length for dynamic NTK and LogN.
    seq_length: int = 8192
    model_type: str = "qwen"
    # Keys we carry but never read (informational, or from a newer/older release).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _check_field_types(self, "config")
        self._check_positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                             "kv_channels", "intermediate_size", "seq_length")  # fmt: skip
        if self.model_type != "qwen":
            raise ValueError(
                f"config field 'model_type' is {self.model_type!r}; qwenlm loads Qwen v1 checkpoints "
                "(model_type 'qwen'). Qwen1.5/Qwen2 checkpoints ('qwen2') use a different architecture."
            )
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"config fields 'kv_channels' ({self.kv_channels}) x 'num_attention_heads' "
                f"({self.num_attention_heads}) must equal 'hidden_size' ({self.hidden_size})"
            )
        if self.intermediate_size % 2:
            raise ValueError(f"config field 'intermediate_size' must be even, got {self.intermediate_size}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"config field 'rotary_pct' must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2 or self.rotary_dim < 2:
            raise ValueError(
                f"config field 'rotary_pct' ({self.rotary_pct}) gives an odd or empty rotary dim "
                f"{self.rotary_dim} for kv_channels {self.kv_channels}"
            )
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"config field 'layer_norm_epsilon' must be > 0, got {self.layer_norm_epsilon}")
        if self.rotary_emb_base <= 0:
            raise ValueError(f"config field 'rotary_emb_base' must be > 0, got {self.rotary_emb_base}")
        if sum(bool(x) for x in (self.bf16, self.fp16, self.fp32)) > 1:
            raise ValueError("config fields 'bf16', 'fp16' and 'fp32': at most one may be true")
        if self.tie_word_embeddings:
            raise ValueError("config field 'tie_word_embeddings' is true; Qwen v1 has an untied lm_head")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")

    # ---- derived values -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def mlp_width(self) -> int:
        """Width of w1/w2: the reference halves `intermediate_size` (it counts both branches)."""
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        if self.rotary_pct == 1.0:
            return self.kv_channels
        return int(self.kv_channels * self.rotary_pct)

    @property
    def max_context_length(self) -> int:
        """The longest sequence (prompt + generated) this model accepts.

        With dynamic NTK / LogN the reference runs up to its 32K LogN table; without them
        (72B) the trained context is the limit.
        """
        trained = max(self.seq_length, self.max_position_embeddings)
        if self.use_dynamic_ntk or self.use_logn_attn:
            return max(trained, LONG_CONTEXT_LIMIT)
        return trained

    @property
    def num_parameters(self) -> int:
        h, f, v, n = self.hidden_size, self.mlp_width, self.vocab_size, self.num_hidden_layers
        bias = 0 if self.no_bias else h + 2 * f + h
        per_layer = 2 * h + (3 * h * h + 3 * h) + h * h + 3 * h * f + bias
        return 2 * v * h + n * per_layer + h

    # ---- (de)serialisation ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QwenConfig:
        """Build from a `config.json` dict; unknown keys are kept in `extra` with a warning."""
        data = dict(data)
        for old, new in _LEGACY_NAMES.items():
            if old in data:
                data.setdefault(new, data.pop(old))
        if "ffn_hidden_size" in data:  # v1.0: the same doubled width under another name
            data.setdefault("intermediate_size", data.pop("ffn_hidden_size"))
        data.setdefault("model_type", "qwen")
        known, extra = _split_known(cls, data)
        unknown = sorted(set(extra) - _INFORMATIONAL_KEYS)
        if unknown:
            warnings.warn(f"config.json: ignoring unknown keys {unknown}", stacklevel=2)
        for key in ("rotary_emb_base", "rotary_pct", "layer_norm_epsilon"):
            if isinstance(known.get(key), int) and not isinstance(known.get(key), bool):
                known[key] = float(known[key])
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> QwenConfig:
        """Read `config.json` from a checkpoint folder (or the file itself).

        Raises:
            ValueError: a field has the wrong type or value (the message names the file and the field).
        """
        data = _read_json(path, "config.json", "model config")
        try:
            return cls.from_dict({**data, **overrides})
        except ValueError as err:
            file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
            given = f" with the overrides {sorted(overrides)}" if overrides else ""
            raise ValueError(f"{file}{given}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        data = {"architectures": ["QWenLMHeadModel"], **self.to_dict()}
        data["auto_map"] = {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        }
        _write_json(Path(path) / "config.json", data)


_GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 512, "max_length": None, "do_sample": False, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "repetition_penalty": 1.0, "eos_token_id": None, "pad_token_id": None,
    "bos_token_id": None, "chat_format": "chatml", "max_window_size": 6144, "stop_words_ids": None,
    "seed": None,
}  # fmt: skip


@dataclass
class GenerationConfig:
    """Decoding defaults from `generation_config.json`, Qwen's own keys included (spec 4.7).

    Unset fields take the Hugging Face defaults (top_k 50, temperature 1.0), as they would for
    the reference; released Qwen files override them (e.g. `top_k: 0` = off).
    """

    max_new_tokens: int | None = 512
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    chat_format: str = "chatml"
    max_window_size: int = 6144
    stop_words_ids: list[list[int]] | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.chat_format not in ("chatml", "raw"):
            raise ValueError(f"generation config field 'chat_format' must be 'chatml' or 'raw', got "
                             f"{self.chat_format!r}")  # fmt: skip
        if self.stop_words_ids is not None:
            ok = isinstance(self.stop_words_ids, list) and all(
                isinstance(seq, list) and seq and all(isinstance(i, int) and i >= 0 for i in seq)
                for seq in self.stop_words_ids
            )
            if not ok:
                raise ValueError(
                    "generation config field 'stop_words_ids' must be a list of non-empty lists of "
                    f"non-negative token ids, got {self.stop_words_ids!r}"
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)

    @classmethod
    def coerce(cls, config: Any) -> GenerationConfig | None:
        """Ours as it is; a dict, or anything with `to_dict()` (transformers' GenerationConfig, which the
        Qwen model cards assign to `model.generation_config`), read as generation_config.json would be."""
        if config is None or isinstance(config, cls):
            return config
        data = config if isinstance(config, dict) else getattr(config, "to_dict", lambda: None)()
        if not isinstance(data, dict):
            raise TypeError(f"a generation config must be a GenerationConfig or a dict, got {type(config).__name__}")
        return cls.from_dict({k: v for k, v in data.items() if not k.startswith("_")})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> GenerationConfig:
        """Read `generation_config.json` from a checkpoint folder; `trust_remote_code` is ignored."""
        overrides.pop("trust_remote_code", None)
        return cls.from_dict({**_read_json(path, "generation_config.json", "generation config"), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        _write_json(Path(path) / "generation_config.json", self.to_dict())

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with `overrides` applied; an unknown option is an error, not a silent no-op."""
        names = _field_names(self)
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


_SIMPLE_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_field_types(obj: Any, what: str) -> None:
    """Each field of a plain type (bool, int, float, str, or a union of them and None) holds such a value, so a
    quoted number or a "false" string in a JSON file is named here rather than failing somewhere later."""
    for f in dataclasses.fields(obj):
        allowed = [t.strip() for t in str(f.type).split("|")]
        if not allowed or any(t not in _SIMPLE_TYPES and t != "None" for t in allowed):
            continue
        value = getattr(obj, f.name)
        if value is None and "None" in allowed:
            continue
        ok = any(isinstance(value, _SIMPLE_TYPES[t]) for t in allowed if t != "None")
        if ok and "bool" not in allowed and isinstance(value, bool):
            ok = False  # True is an int to Python, not to a config
        if not ok:
            raise ValueError(f"{what} field {f.name!r} must be {' or '.join(allowed)}, got {value!r}")


def _field_names(cls_or_obj: Any) -> list[str]:
    """The dataclass fields that mirror JSON keys, in declaration order (`extra` is the overflow)."""
    return [f.name for f in dataclasses.fields(cls_or_obj) if f.name != "extra"]


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = set(_field_names(cls))
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


def _as_dict(obj: Any) -> dict[str, Any]:
    return {**obj.extra, **{name: getattr(obj, name) for name in _field_names(obj)}}


def _read_json(path: str | os.PathLike, filename: str, what: str) -> dict[str, Any]:
    """Read `filename` from a checkpoint folder (or `path` itself when it is the file)."""
    file = Path(path)
    if file.is_dir():
        file = file / filename
    if not file.is_file():
        raise FileNotFoundError(f"{what} not found: {file} does not exist")
    return read_json_object(file, what)


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(file, data)
