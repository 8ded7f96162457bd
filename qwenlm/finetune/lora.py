"""LoRA for training (peft): adapters on c_attn/c_proj/w1/w2, control-token rows for base models, saving.

    model = load_model("Qwen-1_8B", torch_dtype=torch.float32)
    peft_model = add_lora(model, LoraArgs(), train_token_ids=[151643, 151644, 151645])
    save_adapter("out", trainable_state(model), LoraArgs(), base="/abs/Qwen-1_8B", token_ids=[...])

A base model never learned `<|im_start|>`/`<|im_end|>`; the reference trains full copies of wte and
lm_head for it (1.2 B parameters at 7B, the reason it cannot use ZeRO-3). Here only those rows train
(`adapters.TokenRows`), saved with the adapter in peft's TrainableTokens layout.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import save_safetensors
from .adapters import _PREFIX, _TOKEN_SUFFIX, ADAPTER_CONFIG, ADAPTER_WEIGHTS, TokenRows
from .args import LoraArgs

PEFT_INSTALL_HINT = 'LoRA and Q-LoRA need peft: pip install "qwenlm[finetune]" (or pip install peft)'
TOKEN_ROW_MODULES = ("transformer.wte", "lm_head")


def import_peft():
    try:
        return importlib.import_module("peft")
    except ImportError as err:
        raise RuntimeError(PEFT_INSTALL_HINT) from err


def model_kind(folder: str | os.PathLike) -> str:
    """Whether a checkpoint is a chat or a base model ("chat"/"base"), from its generation_config.json
    (chat_format chatml/raw), not its name.

    A folder without one counts as base (training the control-token rows then costs little and is safe).
    """
    file = Path(folder) / "generation_config.json"
    if not file.is_file():
        return "base"
    try:
        chat_format = json.loads(file.read_text(encoding="utf-8")).get("chat_format")
    except json.JSONDecodeError:
        return "base"
    return "chat" if chat_format == "chatml" else "base"


def _weight_rows(module: nn.Module, ids: list[int]) -> Tensor:
    """The current rows `ids` of an embedding's or a linear's weight (dequantized if need be), fp32."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight(torch.float32)[ids].clone()
    return module.weight.detach()[torch.tensor(ids, device=module.weight.device)].float().clone()


def add_lora(
    model: nn.Module,
    lora: LoraArgs,
    train_token_ids: list[int] | None = None,
    custom_modules: dict[type, type] | None = None,
):
    """Put peft LoRA layers on `lora.target_modules` (freezing everything else) and, when
    `train_token_ids` is given, trainable rows for those ids in wte and lm_head. Returns the PeftModel;
    `model` itself is modified in place (its module names stay, with `.lora_A.default` etc. added).

    `custom_modules` maps base layer types peft does not know to LoRA layer types (Q-LoRA passes
    `qlora.lora_layer_types()`); bitsandbytes layers get peft's own.
    """
    peft = import_peft()
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none",
    )  # fmt: skip
    if custom_modules:
        config._register_custom_module(custom_modules)
    with warnings.catch_warnings():  # peft warns about every layer type it does not know (ours are handled)
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        peft_model = peft.get_peft_model(model, config)  # freezes the base; fp32 adapters (autocast_adapter_dtype)
    if train_token_ids:
        for name in TOKEN_ROW_MODULES:
            base = model.get_submodule(name)
            model.set_submodule(name, TokenRows(base, list(train_token_ids), _weight_rows(base, train_token_ids)))
    return peft_model


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of `model` by name (the adapter, for a LoRA model)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# Adapter files (peft's layout, loadable by peft's PeftModel.from_pretrained and by qwenlm)
# --------------------------------------------------------------------------------------------------
def to_adapter_name(name: str) -> str | None:
    """Training parameter name -> adapter file name (None for a name that is not part of an adapter).

    `transformer.h.0.attn.c_attn.lora_A.default.weight` -> `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`;
    `transformer.wte.trainable_tokens_delta` -> `base_model.model.transformer.wte.token_adapter.trainable_tokens_delta`.
    """
    if ".lora_A." in name or ".lora_B." in name:
        return _PREFIX + name.replace(".default.", ".")
    if name.endswith(".trainable_tokens_delta"):
        return _PREFIX + name[: -len(".trainable_tokens_delta")] + _TOKEN_SUFFIX
    return None


def from_adapter_name(name: str) -> str:
    """Inverse of `to_adapter_name` (for resuming from a checkpoint's adapter files)."""
    key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
    if key.endswith(_TOKEN_SUFFIX):
        return key[: -len(_TOKEN_SUFFIX)] + ".trainable_tokens_delta"
    for part in (".lora_A.", ".lora_B."):
        key = key.replace(part, f"{part}default.")
    return key


def adapter_config(lora: LoraArgs, base: str, token_ids: list[int] | None) -> dict[str, Any]:
    """adapter_config.json: peft's LoraConfig fields, the absolute base path and the trained token rows."""
    peft = import_peft()
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", base_model_name_or_path=str(Path(base).resolve()), inference_mode=True,
    ).to_dict()  # fmt: skip
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items() if not k.startswith("_")}
    if token_ids:
        config["trainable_token_indices"] = {name.rsplit(".", 1)[-1]: list(token_ids) for name in TOKEN_ROW_MODULES}
    return config


def save_adapter(
    folder: str | os.PathLike, state: dict[str, Tensor], lora: LoraArgs, base: str, token_ids: list[int] | None
) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `folder` (which must exist).

    Raises:
        ValueError: `state` holds no adapter tensors.
    """
    tensors = {}
    for name, tensor in state.items():
        key = to_adapter_name(name)
        if key is not None:
            tensors[key] = tensor.detach().to("cpu").contiguous()
    if not tensors:
        raise ValueError(f"no LoRA tensors to save among {sorted(state)[:5]}")
    folder = Path(folder)
    save_safetensors(tensors, folder / ADAPTER_WEIGHTS)
    config = adapter_config(lora, base, token_ids)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
