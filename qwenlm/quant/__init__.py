"""Quantized Qwen: GPTQ checkpoint formats and config, weight-only quantized linears, load-time quantization.

    from qwenlm.model import load_model
    model = load_model("Qwen-7B-Chat-Int4")                   # a GPTQ checkpoint, as released
    model = load_model("Qwen-7B-Chat", quantization="int4")   # a float checkpoint, quantized while loading

`QuantLinear` and `QuantEmbedding` (which need `qwenlm.kernels`) are imported lazily, so the pure format
helpers load alone.
"""

from __future__ import annotations

from typing import Any

from .config import QuantizationConfig, QuantizationConfigError
from .formats import (
    dequantize_gptq,
    gptq_shapes,
    gptq_tensors,
    pack_cols,
    pack_rows,
    read_gptq,
    unpack_cols,
    unpack_rows,
)


def __getattr__(name: str) -> Any:
    if name == "QuantLinear":
        from .linear import QuantLinear

        return QuantLinear
    if name == "QuantEmbedding":
        from .embedding import QuantEmbedding

        return QuantEmbedding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QuantEmbedding", "QuantLinear", "QuantizationConfig", "QuantizationConfigError", "dequantize_gptq", "gptq_shapes",
    "gptq_tensors", "pack_cols", "pack_rows", "read_gptq", "unpack_cols", "unpack_rows",
]  # fmt: skip
