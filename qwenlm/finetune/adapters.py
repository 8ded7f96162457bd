"""LoRA adapter folders (peft's layout) read and applied without peft: merge at load, or wrap a quantized base.

An adapter folder holds `adapter_config.json` (r, lora_alpha, target_modules, base_model_name_or_path,
trainable_token_indices) and `adapter_model.safetensors` with tensors named
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, and for a base model's control tokens
`base_model.model.<wte|lm_head>.token_adapter.trainable_tokens_delta` (the new rows themselves, as peft
stores them). Applying it is W += (alpha / r) * B @ A per module, and a row swap for the tokens:

    model = load_adapted_model("out/lora")                        # the base recorded in the adapter
    model = AutoModelForCausalLM.from_pretrained("out/lora")      # the same, through qwenlm.auto
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..files import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"


class AdapterError(ValueError):
    """An adapter folder that cannot be used as it is; the message names the file and tensor."""


@dataclass
class Adapter:
    """A LoRA adapter read from disk: per module the (A [r, in], B [out, r]) pair, and replaced token rows."""

    folder: Path
    base_model: str | None
    alpha: float
    use_rslora: bool
    lora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    token_rows: dict[str, tuple[list[int], Tensor]] = field(default_factory=dict)  # module -> (ids, rows)
    config: dict[str, Any] = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA), r read from the module's A."""
        r = self.lora[module][0].shape[0]
        return self.alpha / (math.sqrt(r) if self.use_rslora else r)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A folder with adapter_config.json and no config.json of its own."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read and check an adapter folder.

    Raises:
        FileNotFoundError: no adapter_config.json or weights.
        AdapterError: a config peft features qwenlm does not apply (DoRA, alpha_pattern, ...), or tensors that
            do not pair up (named).
    """
    folder = Path(path)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not an adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = read_json_object(config_file, "adapter config")
    except ValueError as err:
        raise AdapterError(str(err)) from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_file}: peft_type {config.get('peft_type')!r}; qwenlm applies LoRA adapters")
    for key in ("use_dora", "alpha_pattern", "layer_replication", "modules_to_save"):
        if config.get(key):
            raise AdapterError(f"{config_file}: {key}={config[key]!r} is not supported by qwenlm's adapter loader")
    adapter = Adapter(
        folder, config.get("base_model_name_or_path"), float(config.get("lora_alpha", 8)),
        bool(config.get("use_rslora", False)), config=config,
    )  # fmt: skip
    _read_tensors(adapter, _open_weights(folder))
    indices = config.get("trainable_token_indices") or {}
    for module, rows in list(adapter.token_rows.items()):
        ids = indices.get(module.rsplit(".", 1)[-1], indices.get(module))
        if ids is None or len(ids) != rows[1].shape[0]:
            raise AdapterError(
                f"{folder / ADAPTER_WEIGHTS}: {module} has {rows[1].shape[0]} token rows, but {ADAPTER_CONFIG} "
                f"trainable_token_indices lists {ids!r}"
            )
        adapter.token_rows[module] = (list(ids), rows[1])
    return adapter


def _open_weights(folder: Path) -> dict[str, Tensor]:
    file = folder / ADAPTER_WEIGHTS
    if file.is_file():
        try:
            with safe_open(str(file), framework="pt") as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise AdapterError(f"{file} is not a readable safetensors file: {err}") from None
    legacy = folder / "adapter_model.bin"  # peft < 0.7
    if legacy.is_file():
        return torch.load(str(legacy), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"adapter folder {folder} has no {ADAPTER_WEIGHTS} (or adapter_model.bin)")


def _read_tensors(adapter: Adapter, tensors: dict[str, Tensor]) -> None:
    pairs: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        if key.endswith(_TOKEN_SUFFIX):
            adapter.token_rows[key[: -len(_TOKEN_SUFFIX)]] = ([], tensor)
        elif key.endswith(_LORA_SUFFIXES):
            module, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            pairs.setdefault(module, {})[part] = tensor
        else:
            raise AdapterError(f"{adapter.folder / ADAPTER_WEIGHTS}: unexpected tensor {name}")
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterError(
                f"{adapter.folder / ADAPTER_WEIGHTS}: {module} has {sorted(parts)}, needs lora_A and lora_B"
            )
        a, b = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{adapter.folder / ADAPTER_WEIGHTS}: {module} lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                "do not form B @ A"
            )
        adapter.lora[module] = (a, b)


# --------------------------------------------------------------------------------------------------
# The math, shared by load-time merging and `qwenlm merge-lora`
# --------------------------------------------------------------------------------------------------
def merged_weight(weight: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """W + scaling * B @ A, computed in fp32 and returned in W's dtype."""
    if tuple(weight.shape) != (b.shape[0], a.shape[1]):
        raise AdapterError(f"LoRA B @ A is {[b.shape[0], a.shape[1]]}, but the weight is {list(weight.shape)}")
    delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * scaling
    return (weight.float() + delta).to(weight.dtype)


def replaced_rows(weight: Tensor, ids: list[int], rows: Tensor) -> Tensor:
    """`weight` with rows `ids` replaced by `rows` (a copy)."""
    out = weight.clone()
    out[torch.tensor(ids, device=weight.device)] = rows.to(weight.device, weight.dtype)
    return out


class LoraLinear(nn.Module):
    """base(x) + scaling * B(A(x)) for a base that cannot be merged into (a quantized linear)."""

    def __init__(self, base_layer: nn.Module, a: Tensor, b: Tensor, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        h = x.to(self.lora_A.dtype)  # the order of operations of peft's lora.Linear, so outputs match it
        return (result + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(result.dtype)


class TokenRows(nn.Module):
    """Chosen rows of an embedding's or lm_head's weight replaced by this module's own (trainable) rows.

    Works over any base (float or quantized), costs a lookup (embedding) or an [N, H] x [H, n] product
    (lm_head), and trains n rows instead of the whole matrix (2 x 151,936 x 4096 parameters at 7B).
    The parameter keeps peft's name, `trainable_tokens_delta`, which holds the rows themselves.
    """

    def __init__(self, base_layer: nn.Module, ids: list[int], rows: Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_embedding = isinstance(base_layer, nn.Embedding) or hasattr(base_layer, "num_embeddings")
        size = base_layer.num_embeddings if self.is_embedding else base_layer.out_features
        if max(ids) >= size or min(ids) < 0:
            raise AdapterError(f"token ids {ids} do not fit a vocabulary of {size}")
        device = rows.device
        self.register_buffer("token_indices", torch.tensor(ids, device=device), persistent=False)
        slots = torch.full((size,), -1, dtype=torch.long, device=device)
        slots[self.token_indices] = torch.arange(len(ids), device=device)
        self.register_buffer("slots", slots, persistent=False)
        self.trainable_tokens_delta = nn.Parameter(rows)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        rows = self.trainable_tokens_delta
        if self.is_embedding:
            slot = self.slots[x]
            return torch.where((slot >= 0)[..., None], rows[slot.clamp(min=0)].to(out.dtype), out)
        columns = F.linear(x.to(rows.dtype), rows).to(out.dtype)  # [..., n] logits of the chosen tokens
        # In place where autograd allows it (the base's backward needs its input, not its output): a copy of
        # [N, vocab] logits is costly. Views (a custom Function's output, e.g. Q-LoRA's) are copied.
        if out._is_view():
            return out.index_copy(out.dim() - 1, self.token_indices, columns)
        return out.index_copy_(out.dim() - 1, self.token_indices, columns)


def _is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.is_floating_point()


def apply_adapter(model: nn.Module, adapter: Adapter, merge: bool = True) -> nn.Module:
    """Apply `adapter` to `model` in place: merged into float weights (when `merge`), else wrapped.

    Quantized modules (GPTQ, on the fly, bitsandbytes) are always wrapped: their weights stay as they are.

    Raises:
        AdapterError: a module the adapter names is not in the model, or shapes differ (named).
    """
    modules = dict(model.named_modules())
    for name in [*adapter.lora, *adapter.token_rows]:
        if name not in modules:
            raise AdapterError(f"{adapter.folder}: module {name} is not in the model (another architecture?)")
    with torch.no_grad():
        for name, (a, b) in adapter.lora.items():
            module, scaling = modules[name], adapter.scaling(name)
            if merge and _is_float_linear(module):
                module.weight.data = merged_weight(module.weight.data, a, b, scaling)
            else:
                device = next(module.buffers(), next(module.parameters(), a)).device
                model.set_submodule(name, LoraLinear(module, a.to(device), b.to(device), scaling))
        for name, (ids, rows) in adapter.token_rows.items():
            module = modules[name]
            if merge and _is_float_linear(module):
                module.weight.data = replaced_rows(module.weight.data, ids, rows)
            else:
                device = next(module.buffers(), next(module.parameters(), rows)).device
                model.set_submodule(name, TokenRows(module, ids, rows.to(device)).requires_grad_(False))
    return model


def resolve_base(adapter: Adapter, base_model: str | os.PathLike | None = None) -> Path:
    """The base checkpoint folder: `base_model` if given, else the one recorded in adapter_config.json.

    Raises:
        FileNotFoundError: no base recorded and none given, or the recorded one is not on this machine.
    """
    if base_model is not None:
        return Path(base_model)
    recorded = adapter.base_model
    if not recorded:
        raise FileNotFoundError(
            f"{adapter.folder / ADAPTER_CONFIG} records no base_model_name_or_path; pass the base checkpoint "
            "(base_model= in Python, --model for merge-lora)"
        )
    path = Path(recorded)
    if not path.is_dir():
        raise FileNotFoundError(
            f"adapter {adapter.folder} was trained on {recorded}, which is not a folder here; pass the base "
            "checkpoint (base_model= in Python, --model for merge-lora)"
        )
    return path


def tokenizer_folder(path: str | os.PathLike) -> Path:
    """Where an adapter folder's tokenizer is: the folder itself, else its recorded base (any other folder is
    returned as it is, for the tokenizer loader to report)."""
    folder = Path(path)
    if not is_adapter_dir(folder) or (folder / "qwen.tiktoken").is_file():
        return folder
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return folder
    return Path(base) if base and Path(base).is_dir() else folder


def load_adapted_model(
    path: str | os.PathLike, base_model: str | os.PathLike | None = None, merge: bool = True, **load_kwargs: Any
) -> nn.Module:
    """Load an adapter's base (see `resolve_base`) with `load_kwargs` (as `load_model` takes), then apply it."""
    from ..model.loading import load_model

    adapter = read_adapter(path)
    model = load_model(resolve_base(adapter, base_model), **load_kwargs)
    model = apply_adapter(model, adapter, merge=merge)
    model.adapter = str(Path(path).resolve())
    return model
