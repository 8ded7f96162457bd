"""The fused decode step's native library (cpu_step.cpp): a whole one-token forward as one call.

    plan = decode_plan(tensors, ints, floats)        # None when the library is unavailable
    plan.bind(keys, values)                          # the cache; again when it moves to new buffers
    logits = plan.step(token, position, inv_freq)

It is a library of its own, built on first use and cached like cpu_gemv.cpp's (see cpu.py), so that the
matrix-vector kernels never wait for it or depend on it compiling; it calls those kernels through the
dispatcher. qwenlm.generation.fused builds the plan from a model and documents its arguments.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from . import cpu

logger = logging.getLogger(__name__)

_STEP_SOURCE = Path(__file__).with_name("cpu_step.cpp")


@functools.cache
def _load_step() -> cpu._LoadResult:
    if not cpu.kernels_available():
        return cpu._LoadResult(False, f"the CPU kernels are unavailable ({cpu.kernels_status()})")
    with cpu._load_lock:
        try:
            return cpu.build_and_load_library(_STEP_SOURCE, "qwenlm_step")
        except Exception as e:  # no fused step means the Python forward, never an error for the caller
            logger.warning("qwenlm's fused decode step is unavailable, decoding op by op: %s", e)
            return cpu._LoadResult(False, f"build/load failed: {type(e).__name__}: {e}")


def fused_step_available() -> bool:
    """True when the fused step's library is built and loaded (building it on the first call)."""
    return cpu.kernels_available() and _load_step().ok


def decode_plan(tensors: list[torch.Tensor], ints: list[int], floats: list[float]):
    """A `DecodePlan` over a model's tensors (layout: cpu_step.cpp's DecodePlan), or None without the library."""
    if not fused_step_available():
        return None
    return torch.classes.qwenlm_kernels.DecodePlan(tensors, ints, floats)
