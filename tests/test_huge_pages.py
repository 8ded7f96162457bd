"""Weights and KV caches on transparent huge pages: same values, advised mappings, a switch to turn it off."""

import pytest
import torch
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
    mapped = load_model(tiny_checkpoint, torch_dtype=torch.float32, progress=False, mmap=True)
    assert not advised(mapped.transformer.wte.weight)  # mmap=True keeps the zero-copy file views


def test_move_keeps_values_parameters_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(1024, 2048, bias=False)
            self.b = nn.Linear(1024, 2048, bias=False)
            self.b.weight = self.a.weight  # one Parameter in two modules
            self.frozen = nn.Parameter(torch.randn(2048, 1024), requires_grad=False)
            self.register_buffer("codes", torch.randint(0, 255, (4 << 20,), dtype=torch.uint8))
            self.small = nn.Parameter(torch.randn(8))

    model = Tied()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    small = model.small
    moved = huge_pages.move_weights(model)
    if huge_pages.available():
        assert moved == 2048 * 1024 * 4 * 2 + (4 << 20)  # the tied weight once, the frozen one, the buffer
        assert advised(model.a.weight) and advised(model.frozen) and advised(model.codes)
    assert model.b.weight is model.a.weight and isinstance(model.a.weight, nn.Parameter)
    assert model.a.weight.requires_grad and not model.frozen.requires_grad
    assert model.small is small  # under the size floor: untouched
    for name, t in model.state_dict().items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name


@needs_thp
def test_kv_buffers_are_zeroed_and_on_huge_pages():
    keys, values, *scales = kv_buffers((2, 4, 4096, 128), torch.bfloat16, "cpu", num_layers=1, quantized=True)
    assert keys[0].dtype == torch.uint8 and not keys[0].any() and not values[0].any()
    assert advised(keys[0]) and advised(values[0])
    assert all(s[0].shape == (2, 4, 4096, 1) and not s[0].any() for s in scales)


def test_switch_off_keeps_4k_pages(monkeypatch):
    monkeypatch.setenv("QWENLM_HUGE_PAGES", "0")
    huge_pages._madvise.cache_clear()
    try:
        assert not huge_pages.available()
        t = huge_pages.empty((64 << 20,), torch.uint8).fill_(1)  # above any mmap threshold: a fresh mapping
        if advised(t):
            # Once in a full-suite run the allocator handed out memory that an earlier test had advised; then a
            # plain allocation beside it is advised too, and only an advised t next to an unadvised one is an error.
            control = torch.empty((64 << 20,), dtype=torch.uint8).fill_(1)
            assert advised(control), "huge_pages.empty advised its memory with QWENLM_HUGE_PAGES=0"
        assert huge_pages.move_weights(nn.Linear(2048, 2048)) == 0
    finally:
        monkeypatch.undo()
        huge_pages._madvise.cache_clear()
