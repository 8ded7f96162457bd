"""Fake (shape-only) implementations of qwenlm's C++ CPU ops, so `torch.compile` can trace code that calls them.

    from qwenlm.kernels import fake
    fake.register()                                   # idempotent
    step = torch.compile(step, fullgraph=True)        # Linear layers keep calling the kernels

The ops are defined in cpu_gemv.cpp with CPU implementations only. Tracing runs on fake tensors and needs
each op's output shape, given here; the compiled graph then calls the real op (an opaque call, as eager
does). The wrappers' `kernels_available()` (which takes a lock on its first call, something Dynamo
cannot trace) is marked constant for Dynamo: it is fixed for the life of the process once answered.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import Tensor

from . import cpu

logger = logging.getLogger(__name__)

_OPS = "qwenlm_kernels"


def _rows_out(x: Tensor, n: int) -> Tensor:
    """[..., N] for x [..., K], in x's dtype (what every linear op returns)."""
    return x.new_empty((*x.shape[:-1], n))


def _linear_dense(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return _rows_out(x, w.shape[0])


def _linear_quantized(x: Tensor, q: Tensor, scales: Tensor, zeros: Tensor, group: int, k: int,
                      bias: Tensor | None) -> Tensor:  # fmt: skip
    return _rows_out(x, q.shape[0])  # q holds one row of packed codes per output feature


def _dequantize(q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group: int, k: int, dtype: torch.dtype) -> Tensor:
    return q.new_empty((q.shape[0], k), dtype=dtype)


def _dequantize_out(q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group: int, k: int, out: Tensor) -> Tensor:
    return out


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    return q.new_empty(q.shape)  # [B, n, 1, D] in q's dtype


def _argmax_last(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.long)


def _same_shape(x: Tensor, *_) -> Tensor:
    return x.new_empty(x.shape)  # rms_norm, rope: x's shape and dtype (rope's output is contiguous)


_FAKES = {
    "linear_dense": _linear_dense,
    "linear_int8": _linear_quantized,
    "linear_int4": _linear_quantized,
    "linear_int6": _linear_quantized,
    "dequantize": _dequantize,
    "dequantize_out": _dequantize_out,
    "decode_attention": _decode_attention,
    "rms_norm": _same_shape,
    "rope": _same_shape,
    "argmax_last": _argmax_last,
}
_lock = threading.Lock()
_done = False


def register() -> bool:
    """Make the kernels traceable by torch.compile; returns whether the kernels are in use.

    Safe to call many times and from several threads. An op the loaded library lacks, or that already has
    a fake/meta implementation, is skipped.
    """
    global _done
    with _lock:
        if _done:
            return cpu.kernels_available()
        available = cpu.kernels_available()  # loads (or builds) the library, so the ops exist
        if available:
            for name, fake in _FAKES.items():
                if not hasattr(getattr(torch.ops, _OPS), name):
                    logger.warning("qwenlm kernel op %s::%s not found; torch.compile may fail on it", _OPS, name)
                    continue
                try:
                    torch.library.register_fake(f"{_OPS}::{name}")(fake)
                except RuntimeError as err:  # e.g. the C++ side registered a Meta kernel meanwhile
                    logger.debug("not registering a fake for %s::%s: %s", _OPS, name, err)
        torch._dynamo.assume_constant_result(cpu.kernels_available)
        _done = True
        return available
