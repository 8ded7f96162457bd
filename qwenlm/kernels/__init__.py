"""Fast CPU kernels for decoding (bf16/fp32 dense and int8/int4 weight-only matrix-vector products, one-token
attention, fused RMSNorm and RoPE) with torch fallbacks.

    from qwenlm.kernels import linear, linear_quantized, pack_quantized
    y = linear(x, layer.weight, layer.bias)

Nothing is compiled at import: the C++ extension builds on the first kernel call (or load_kernels()).
"""

from __future__ import annotations

from .cpu import (
    DENSE_MAX_ROWS,
    QUANT_MAX_ROWS,
    decode_attention,
    dequantize,
    fusable,
    kernels_available,
    kernels_status,
    linear,
    linear_quantized,
    load_kernels,
    rms_norm,
    rope,
)
from .quant import QuantizedWeight, pack_quantized, unpack_codes
from .reference import dequantize_codes, linear_quantized_reference, linear_reference

__all__ = [
    "DENSE_MAX_ROWS", "QUANT_MAX_ROWS", "QuantizedWeight", "decode_attention", "dequantize",
    "dequantize_codes", "fusable", "kernels_available", "kernels_status", "linear", "linear_quantized",
    "linear_quantized_reference", "linear_reference", "load_kernels", "pack_quantized", "rms_norm", "rope",
    "unpack_codes",
]  # fmt: skip
