"""Weights and KV caches on transparent huge pages: same values, advised mappings, a switch to turn it off."""

import ctypes
import mmap
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwenlm.model import huge_pages, load_model
from qwenlm.model.kv_cache import kv_buffers

needs_thp = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages on this OS/kernel")


def advised(tensor: torch.Tensor) -> bool:
    """Whether the mapping holding `tensor`'s first whole 2 MiB range carries MADV_HUGEPAGE (VmFlags 'hg')."""
    address = -(-tensor.data_ptr() // huge_pages.HUGE_PAGE) * huge_pages.HUGE_PAGE
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError("tensor not found in /proc/self/smaps")


@needs_thp
def test_loaded_large_weights_sit_on_advised_pages_and_small_ones_are_left(tiny_checkpoint):
    model = load_model(tiny_checkpoint, torch_dtype=torch.float32, progress=False)
    wte = model.transformer.wte.weight  # 151936 x 64 fp32: 39 MB
    assert wte.nbytes >= 2 * huge_pages.HUGE_PAGE and advised(wte)
    assert advised(model.lm_head.weight)
    quantized = load_model(tiny_checkpoint, quantization="int8", progress=False)
    assert quantized.lm_head.qdata.nbytes >= 2 * huge_pages.HUGE_PAGE and advised(quantized.lm_head.qdata)
    # mmap=True keeps the zero-copy file views: the stored dtype (bf16), so no tensor is converted into a new buffer
    mapped = load_model(tiny_checkpoint, torch_dtype=torch.bfloat16, progress=False, mmap=True)
    assert not advised(mapped.transformer.wte.weight)


def test_pack_keeps_values_parameters_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(1024, 2048, bias=False)
            self.b = nn.Linear(1024, 2048, bias=False)
            self.b.weight = self.a.weight  # one Parameter in two modules
            self.frozen = nn.Parameter(torch.randn(2048, 1024), requires_grad=False)
            self.register_buffer("codes", torch.randint(0, 255, (4 << 20,), dtype=torch.uint8))
            self.small = nn.Parameter(torch.randn(8))
            self.register_buffer("empty", torch.zeros(0, 3))

    model = Tied()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    packed = huge_pages.pack(model)
    assert packed >= 2048 * 1024 * 4 * 2 + (4 << 20) + 8 * 4  # the tied weight once
    assert packed < 2048 * 1024 * 4 * 3  # ... not twice
    if huge_pages.available():
        assert advised(model.a.weight) and advised(model.frozen) and advised(model.codes)
    assert model.b.weight is model.a.weight and isinstance(model.a.weight, nn.Parameter)
    assert model.a.weight.requires_grad and not model.frozen.requires_grad and model.small.requires_grad
    for name, t in model.state_dict().items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    # One mapping, but each tensor its own storage, so savers that refuse shared storage take them as before.
    storages = {t.untyped_storage().data_ptr() for t in (model.a.weight, model.frozen, model.codes, model.small)}
    assert len(storages) == 4
    with tempfile.TemporaryDirectory() as tmp:
        save_file(dict(model.state_dict()) | {"b.weight": model.b.weight.detach().clone()}, f"{tmp}/m.safetensors")
        assert torch.equal(load_file(f"{tmp}/m.safetensors")["frozen"], before["frozen"])
    model.a.weight.sum().backward()  # trainable as before
    assert model.a.weight.grad is not None
    with torch.no_grad():
        model.frozen.add_(1)  # writable in place
    assert torch.equal(model.frozen, before["frozen"] + 1)


def test_arena_tensors_start_zeroed_on_one_aligned_mapping():
    plan = {"x": ((3, 5), torch.float32), "y": ((4 << 20,), torch.uint8), "z": ((7,), torch.bfloat16)}
    arena = huge_pages.Arena(plan)
    x, y, z = (arena.tensor(n) for n in "xyz")
    assert x.shape == (3, 5) and y.dtype == torch.uint8 and z.dtype == torch.bfloat16
    assert not x.any() and not y.any() and not z.any()
    assert x.data_ptr() % huge_pages.HUGE_PAGE == 0 or not hasattr(mmap, "MAP_PRIVATE")
    assert y.data_ptr() - x.data_ptr() == 64 and z.data_ptr() - y.data_ptr() == 4 << 20  # 64-byte slots
    y.fill_(3)
    assert arena.tensor("y").eq(3).all()  # the same memory on every call
    if huge_pages.available():
        assert advised(y)


def test_quantizing_load_packs_what_quantization_made_into_one_mapping(tiny_checkpoint):
    model = load_model(tiny_checkpoint, quantization="int8", progress=False)
    made = [t for m in model.modules() if hasattr(m, "qdata") for t in m.buffers(recurse=False)]
    assert len(made) > 3
    start = min(t.data_ptr() for t in made)
    end = max(t.data_ptr() + t.nbytes for t in made)
    assert end - start <= sum(t.nbytes + huge_pages.Arena.ALIGN for t in made)  # back to back, nothing between
    if huge_pages.available():
        assert advised(model.lm_head.qdata)


@needs_thp
def test_kv_buffers_are_zeroed_and_on_huge_pages():
    keys, values, *scales = kv_buffers((2, 4, 4096, 128), torch.bfloat16, "cpu", num_layers=1, quantized=True)
    assert keys[0].dtype == torch.uint8 and not keys[0].any() and not values[0].any()
    assert advised(keys[0]) and advised(values[0])
    assert all(s[0].shape == (2, 4, 4096, 1) and not s[0].any() for s in scales)


def test_switch_off_keeps_4k_pages(monkeypatch):
    # Whether a heap allocation's pages carry the flag says nothing here: glibc may serve even 64 MB from heap
    # memory an earlier test advised (it did, once in a full run). So watch for the call itself, and check the
    # flag only on `pack`'s arena, which is always a fresh mapping.
    asked = []

    class WatchedLibc(ctypes.CDLL):
        def __getattr__(self, name):
            asked.append(name)
            return super().__getattr__(name)

    monkeypatch.setenv("QWENLM_HUGE_PAGES", "0")
    monkeypatch.setattr(huge_pages.ctypes, "CDLL", WatchedLibc)
    huge_pages._madvise.cache_clear()
    try:
        assert not huge_pages.available()
        huge_pages.empty((64 << 20,), torch.uint8).fill_(1)
        huge_pages.zeros((3 << 20,), torch.float32)
        layer = nn.Linear(2048, 2048)
        assert huge_pages.pack(layer) > 0 and not advised(layer.weight)
        assert "madvise" not in asked and "malloc_trim" in asked  # the watch sees libc calls (pack trims)
    finally:
        monkeypatch.undo()
        huge_pages._madvise.cache_clear()
