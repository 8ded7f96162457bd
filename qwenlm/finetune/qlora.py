"""Q-LoRA: a frozen 4-bit base (qwenlm's GPTQ checkpoints, int4 on the fly, or bitsandbytes NF4) + LoRA.

The quantized linear never gets a gradient, but its input does; `frozen_quant_linear` computes the
forward with the quantized kernels and, in backward, dequantizes the weight again for grad_x = grad_y @ W
instead of keeping a dequantized copy per layer alive between forward and backward:

    model = load_quantized_base("Qwen-1_8B-Chat-Int4", LoraArgs(), torch.bfloat16, "cpu")  # QuantLinears frozen
    peft_model = add_lora(model, LoraArgs(), custom_modules=lora_layer_types())
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor, nn

from ..model.loading import load_model
from ..quant.config import QuantizationConfig
from ..quant.linear import QuantLinear
from .args import LoraArgs
from .lora import import_peft


class _FrozenQuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = ctx.layer.dequantized_weight(grad.dtype)  # [out, in], original column order
        return (grad @ weight).to(ctx.x_dtype), None


def frozen_quant_linear(x: Tensor, layer: QuantLinear) -> Tensor:
    """layer(x), differentiable with respect to x only (the quantized weight is frozen)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenQuantMatmul.apply(x, layer)
    return layer(x)


class FrozenQuantLinear(nn.Module):
    """A `QuantLinear` as a frozen training base: differentiable with respect to its input only.

    peft wraps it with its GPTQ LoRA layer (it finds the device through `qweight`, as on AutoGPTQ layers).
    """

    def __init__(self, quant: QuantLinear) -> None:
        super().__init__()
        self.quant = quant
        self.in_features, self.out_features = quant.in_features, quant.out_features

    @property
    def qweight(self) -> Tensor:
        return self.quant.qdata

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.quant.dequantized_weight(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_quant_linear(x, self.quant)


def lora_layer_types() -> dict[type, type]:
    """peft's custom-module mapping for Q-LoRA on qwenlm's quantized linears."""
    import_peft()
    return {FrozenQuantLinear: importlib.import_module("peft.tuners.lora.gptq").GPTQLoraLinear}


def freeze_quantized(model: nn.Module) -> nn.Module:
    """Wrap every `QuantLinear` of `model` (blocks, and lm_head when quantized) in `FrozenQuantLinear`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            model.set_submodule(name, FrozenQuantLinear(module))
    return model


def load_quantized_base(folder: str | os.PathLike, lora: LoraArgs, dtype: torch.dtype, device: str) -> nn.Module:
    """The frozen 4-bit base for Q-LoRA, computing in `dtype`.

    A GPTQ checkpoint loads as it is (its wte/lm_head stay float, as stored); a float checkpoint is quantized
    while loading: int4 (group 128, qwenlm's kernels), int8, or bitsandbytes NF4 with double quantization.

    Raises:
        ValueError: a quantization asked for a checkpoint that is already GPTQ.
        RuntimeError: nf4 without bitsandbytes installed.
    """
    if QuantizationConfig.from_pretrained(folder) is not None:  # a GPTQ checkpoint
        if lora.quantization not in ("auto",):
            raise ValueError(
                f"{folder} is already a GPTQ checkpoint; drop --quantization {lora.quantization} (it trains on the "
                "stored 4-bit weights as they are)"
            )
        return freeze_quantized(load_model(folder, torch_dtype=dtype, device_map=device, progress=False))
    scheme = "int4" if lora.quantization == "auto" else lora.quantization
    if scheme == "nf4":
        try:
            importlib.import_module("bitsandbytes")
        except ImportError as err:
            raise RuntimeError(
                "--quantization nf4 needs bitsandbytes (pip install bitsandbytes); or use int4 (qwenlm's own)"
            ) from err
        config = {
            "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype,
        }  # fmt: skip
        return load_model(folder, torch_dtype=dtype, device_map=device, quantization_config=config, progress=False)
    group = {"quantization_group_size": lora.quant_group_size} if scheme == "int4" else {}
    model = load_model(folder, torch_dtype=dtype, device_map=device, quantization=scheme, progress=False, **group)
    return freeze_quantized(model)
