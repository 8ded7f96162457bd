"""Weights on transparent huge pages (Linux, CPU).

A decode step streams every weight once. With 4 KiB pages that stream crosses a page, and costs a TLB miss,
every 4 KiB; on this project's AMX host a read stream over 2 MiB pages ran 34 GB/s against 27 GB/s over
4 KiB ones, and 1.8B decode 4% (int4) to 12% (bf16) faster (BENCHMARKS.md, bench_huge_pages.py).
Linux only backs memory with huge pages where asked (`/sys/kernel/mm/transparent_hugepage/enabled` is usually
`madvise`), and only when a 2 MiB range is first touched, so a tensor is placed by allocating fresh (untouched)
memory, advising it, then copying into it. The loader reads dense weights this way and moves what quantization
made afterwards; KV caches are allocated on huge pages (at 16k tokens a 1.8B model's cache is as large as its
bf16 weights, and each decode step reads all of it).

Set QWENLM_HUGE_PAGES=0 to keep 4 KiB pages (for A/B measurements).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from functools import cache

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size
_MADV_HUGEPAGE = 14
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


@cache
def _madvise():
    """libc's madvise, or None where transparent huge pages cannot be asked for."""
    if not sys.platform.startswith("linux") or os.environ.get("QWENLM_HUGE_PAGES", "1") == "0":
        return None
    try:
        with open(_THP_ENABLED) as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def available() -> bool:
    """Whether tensors can be placed on huge pages in this process."""
    return _madvise() is not None


def empty(shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose whole 2 MiB ranges are advised to be huge pages before first touch.

    Only a fresh mapping is untouched: glibc serves allocations above its mmap threshold (at most 32 MiB) with
    one, smaller ones may reuse touched heap pages, which then stay 4 KiB (harmless, just no gain).
    """
    out = torch.empty(tuple(shape), dtype=dtype)
    madvise = _madvise()
    start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (out.data_ptr() + out.numel() * out.element_size()) // HUGE_PAGE * HUGE_PAGE
    if madvise is not None and end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)  # a refusal (EINVAL on an odd kernel) leaves 4 KiB pages
    return out


def zeros(shape: Iterable[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.zeros, on huge pages when on the CPU (a KV cache: long-context decode streams it like a weight)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    return empty(shape, dtype).zero_()


def copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of `tensor` on huge pages."""
    out = empty(tensor.shape, tensor.dtype)
    with torch.no_grad():
        return out.copy_(tensor)


def move_weights(model: nn.Module, min_bytes: int = 2 * HUGE_PAGE) -> int:
    """Copy every CPU parameter and buffer of at least `min_bytes` onto huge pages; returns the bytes moved.

    One tensor at a time, so peak memory grows by the largest tensor only. Values, dtypes, shapes and
    `requires_grad` are unchanged; a tensor held by two modules (tied weights) is moved once and stays shared.
    """
    if not available():
        return 0
    moved: dict[int, torch.Tensor] = {}  # id of the old tensor -> its replacement (a tied weight is one object)
    total = 0
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for name, tensor in slots.items():
                if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
                    continue
                if tensor.numel() * tensor.element_size() < min_bytes or tensor.storage_offset() != 0:
                    continue
                if id(tensor) not in moved:
                    new = copy(tensor)
                    moved[id(tensor)] = (
                        nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
                    )
                    total += new.numel() * new.element_size()
                slots[name] = moved[id(tensor)]
    return total
