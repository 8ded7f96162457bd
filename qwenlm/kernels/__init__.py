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
    argmax,
    avx2_kernel_available,
    decode_attention,
    dequantize,
    fusable,
    kernels_available,
    kernels_status,
    layer_kernels_available,
    linear,
    linear_quantized,
    load_kernels,
    paged_decode_attention,
    rms_norm,
    rope,
)
from .quant import QuantizedWeight, pack_quantized, unpack_codes
from .reference import (
    dequantize_codes,
    gather_blocks,
    linear_quantized_reference,
    linear_reference,
    paged_decode_attention_reference,
)
from .step import decode_plan, fused_step_available, plan_weight

__all__ = [
    "DENSE_MAX_ROWS", "QUANT_MAX_ROWS", "argmax", "avx2_kernel_available", "decode_attention", "decode_plan",
    "dequantize", "dequantize_codes", "fusable", "fused_step_available", "gather_blocks", "kernels_available",
    "kernels_status", "layer_kernels_available", "linear", "linear_quantized", "linear_quantized_reference",
    "linear_reference", "load_kernels", "pack_quantized", "paged_decode_attention",
    "paged_decode_attention_reference", "plan_weight", "QuantizedWeight", "rms_norm", "rope", "unpack_codes",
]  # fmt: skip
