"""Weights on transparent huge pages (Linux, CPU).

A decode step streams every weight once. With 4 KiB pages that stream crosses a page, and costs a TLB miss,
every 4 KiB; on this project's AMX host a read stream over 2 MiB pages ran 34 GB/s against 27 GB/s over
4 KiB ones, and 1.8B decode 4% (int4) to 12% (bf16) faster (BENCHMARKS.md, bench_huge_pages.py).
Linux only backs memory with huge pages where asked (`/sys/kernel/mm/transparent_hugepage/enabled` is usually
`madvise`), and only when a 2 MiB range is first touched, so a tensor is placed by allocating fresh (untouched)
memory, advising it, then copying into it. The loader reads float weights this way, one allocation each, and
`pack`s what quantization made into one advised mapping (an `Arena`): allocated one by one, after the float
weights they replace were freed, most quantized tensors came from glibc's heap and stayed on 4 KiB pages.
KV caches are allocated on huge pages (at 16k tokens a 1.8B model's cache is as large as its bf16 weights, and
each decode step reads all of it).

Set QWENLM_HUGE_PAGES=0 to keep 4 KiB pages (for A/B measurements).
"""

from __future__ import annotations

import ctypes
import math
import mmap
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


class Arena:
    """Tensors carved out of one anonymous memory mapping, in the order they are planned.

    Why one mapping: a tensor allocated on its own starts and ends inside 2 MiB ranges it shares with other
    memory, which stay on 4 KiB pages (a 25 MB weight loses ~8% of itself to them, an 8 MB one a quarter), and
    allocations under glibc's mmap threshold (which rises to 32 MiB once big blocks are freed, as a quantizing
    load does) come from the heap, whose touched pages never become huge: after an int8 load of the 1.8B
    shape only a third of the codes sat on huge pages. One 2 MiB-aligned mapping advised as a whole puts
    every byte but the last partial range on huge pages.

    Each tensor is a `torch.frombuffer` view with a storage of its own (so safetensors and torch.save treat
    the tensors as separate, as they were); the mapping is released when its last tensor is.
    """

    ALIGN = 64  # bytes; every tensor starts on a cache line

    def __init__(self, plan: dict[str, tuple[Iterable[int], torch.dtype]]) -> None:
        """`plan`: name -> (shape, dtype) of every tensor this arena will hold, in the order to lay them out."""
        self._slots: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, (shape, dtype) in plan.items():
            shape = tuple(shape)
            self._slots[name] = (offset, shape, dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            offset += -(-nbytes // self.ALIGN) * self.ALIGN
        self.nbytes = offset
        self._buffer, self._start = _mapping(offset)

    def tensor(self, name: str) -> torch.Tensor:
        """The planned tensor `name` (zeros until written; the same memory on every call)."""
        offset, shape, dtype = self._slots[name]
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._buffer, dtype=dtype, count=numel, offset=self._start + offset).view(shape)


def _mapping(nbytes: int) -> tuple[object, int]:
    """A zeroed, writable buffer of at least `nbytes` and the offset in it where a 2 MiB-aligned range begins.

    A private anonymous mmap where the OS has one (advised for huge pages when `available()`), else a bytearray.
    """
    if not (hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")):
        return bytearray(max(nbytes, 1)), 0
    length = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE  # whole 2 MiB ranges (only touched pages cost memory)
    buffer = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr()
    start = -address % HUGE_PAGE
    madvise = _madvise()
    if madvise is not None:
        madvise(address + start, length, _MADV_HUGEPAGE)  # a refusal (EINVAL on an odd kernel) leaves 4 KiB pages
    return buffer, start


def _cpu_slots(modules: Iterable[nn.Module]) -> list[tuple[dict, str]]:
    """(slot dict, name) of every plain CPU parameter and buffer of `modules`, in module order (no tensor
    references kept, so `pack` can free each old tensor as soon as it is copied)."""
    found = []
    for top in modules:
        for module in top.modules():
            for slots in (module._parameters, module._buffers):
                for name, tensor in slots.items():
                    # Tensor subclasses (bitsandbytes' Params4bit, ...) carry state a plain copy would drop.
                    plain = type(tensor) in (torch.Tensor, nn.Parameter)
                    if plain and tensor.device.type == "cpu" and not tensor.is_meta:
                        found.append((slots, name))
    return found


_RELEASE_EVERY = 128 << 20  # bytes copied by `pack` between two release_free_memory calls


def pack(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Move every CPU parameter and buffer of `modules` into one new Arena; returns its bytes.

    Values, dtypes, shapes, `requires_grad` and sharing (a tied weight is one object) are kept; distinct tensors
    that were views of one storage become separate, contiguous copies. Each old tensor is freed as soon as it
    is copied (unless something else holds it), so peak memory grows by about the largest one; what the
    allocator keeps of the freed memory is handed back to the OS (`release_free_memory`).
    """
    holders = _cpu_slots([modules] if isinstance(modules, nn.Module) else modules)
    if not holders:
        return 0
    plan: dict[str, tuple[Iterable[int], torch.dtype]] = {}
    for slots, name in holders:  # keyed by id: the old tensors are all alive until copied, so ids are unique
        tensor = slots[name]
        plan.setdefault(str(id(tensor)), (tensor.shape, tensor.dtype))
    del tensor
    arena = Arena(plan)
    moved: dict[str, torch.Tensor] = {}  # id of the old tensor -> its replacement
    release_free_memory()
    unreleased = 0
    for slots, name in holders:
        tensor = slots[name]
        key = str(id(tensor))
        if key not in moved:
            with torch.no_grad():
                new = arena.tensor(key).copy_(tensor)
            moved[key] = nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
            unreleased += new.nbytes
        slots[name] = moved[key]
        del tensor
        if unreleased >= _RELEASE_EVERY:  # else the old copies stay resident beside the arena until the end
            release_free_memory()
            unreleased = 0
    release_free_memory()
    return arena.nbytes


def release_free_memory() -> None:
    """Hand memory that glibc's allocator holds free back to the OS (malloc_trim; nothing elsewhere).

    A quantizing load frees the float weights it read; glibc keeps much of that in its heap (1.3 GiB after an
    int8 load of the 1.8B shape), which stays in the process's resident set until trimmed.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass
