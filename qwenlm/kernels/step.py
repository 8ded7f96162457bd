"""The fused decode step's native library (cpu_step.cpp): a whole one-token forward as one call.

    plan = decode_plan(tensors, ints, floats)        # None when the library is unavailable
    plan.bind(keys, values)                          # the cache; again when it moves to new buffers
    logits = plan.step(token, position, inv_freq)

It is a library of its own, built on first use and cached like cpu_gemv.cpp's (see cpu.py), so that the
matrix-vector kernels never wait for it or depend on it compiling; it calls those kernels through the
dispatcher. It is built for the kernels in use: AVX-512 next to cpu_gemv.cpp (torch.classes.qwenlm_kernels),
or AVX2 next to cpu_gemv_avx2.cpp on CPUs without AVX-512 (torch.classes.qwenlm_avx2). qwenlm.generation.fused
builds the plan from a model and documents its arguments.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from . import cpu
from .quant import QuantizedWeight

logger = logging.getLogger(__name__)

_STEP_SOURCE = Path(__file__).with_name("cpu_step.cpp")


def step_uses_avx2() -> bool:
    """Whether the fused step is (to be) built for AVX2: the AVX-512 kernels are not in use and AVX2's are. Its
    plan then takes each quantized weight's load order too (cpu_step.cpp's Reader)."""
    return not cpu.kernels_available() and cpu.avx2_kernel_available()


@functools.cache
def _load_step() -> cpu._LoadResult:
    if cpu.kernels_available():
        build = (_STEP_SOURCE, "qwenlm_step")
    elif cpu.avx2_kernel_available():
        build = (_STEP_SOURCE, "qwenlm_step_avx2", cpu._AVX2_CFLAGS, ("avx2", "fma"))
    else:
        return cpu._LoadResult(False, f"the CPU kernels are unavailable ({cpu.kernels_status()})")
    with cpu._load_lock:
        try:
            return cpu.build_and_load_library(*build)
        except Exception as e:  # no fused step means the Python forward, never an error for the caller
            logger.warning("qwenlm's fused decode step is unavailable, decoding op by op: %s", e)
            return cpu._LoadResult(False, f"build/load failed: {type(e).__name__}: {e}")


def fused_step_available() -> bool:
    """True when the fused step's library is built and loaded (building it on the first call)."""
    return cpu.layer_kernels_available() and _load_step().ok


def plan_weight(qw: QuantizedWeight) -> list[torch.Tensor]:
    """A quantized weight's tensors as the DecodePlan built here reads them: codes, scales and zeros, and on AVX2
    the codes' load order after them (the arguments the AVX2 ops take, cpu.py's _avx2_weight)."""
    if step_uses_avx2():
        order, q, scales, zeros, _, _ = cpu._avx2_weight(qw)
        return [q, scales, zeros, order]
    return [qw.qdata, qw.scales, qw.zeros]


def decode_plan(tensors: list[torch.Tensor], ints: list[int], floats: list[float]):
    """A `DecodePlan` over a model's tensors (layout: cpu_step.cpp's DecodePlan), or None without the library."""
    if not fused_step_available():
        return None
    library = torch.classes.qwenlm_avx2 if step_uses_avx2() else torch.classes.qwenlm_kernels
    return library.DecodePlan(tensors, ints, floats)
