"""The AutoGPTQ tensor layout (qwenlm.quant.formats) and the quantization config files."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenlm.quant.config import QuantizationConfig, QuantizationConfigError
from qwenlm.quant.formats import (
    default_g_idx,
    dequantize_gptq,
    gptq_shapes,
    gptq_tensors,
    pack_cols,
    pack_rows,
    read_gptq,
    unpack_cols,
    unpack_rows,
)

# The quantize_config.json of Qwen's GPTQ Int4 release (spec 11.1).
QWEN_INT4_QUANTIZE_CONFIG = {
    "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True,
    "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
}  # fmt: skip


def _loop_pack_rows(values: list[list[int]], bits: int) -> list[list[int]]:
    """AutoGPTQ's packing written as plain loops over Python ints: row r holds rows r*pf+j at bit b*j."""
    pf = 32 // bits
    rows, cols = len(values), len(values[0])
    out = []
    for r in range(rows // pf):
        row = []
        for n in range(cols):
            word = 0
            for j in range(pf):
                word |= values[r * pf + j][n] << (bits * j)
            row.append(word - (1 << 32) if word >= 1 << 31 else word)  # uint32 bits read as int32
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_rows_matches_loop_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (32 // bits * 3, 5), generator=gen)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5)
    assert packed.tolist() == _loop_pack_rows(values.tolist(), bits)


def test_pack_rows_is_lsb_first():
    values = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]])
    assert pack_rows(values, 4).item() == 0xF7654321 - 2**32
    assert pack_rows(torch.tensor([[0x01], [0x02], [0x03], [0xFF]]), 8).item() == 0xFF030201 - 2**32


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), words=st.integers(1, 4), cols=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, words, cols, seed):
    pf = 32 // bits
    values = torch.randint(0, 2**bits, (words * pf, cols), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_rows(pack_rows(values, bits), bits).long(), values)
    assert torch.equal(unpack_cols(pack_cols(values.t(), bits), bits).long(), values.t())
    assert pack_cols(values.t(), bits).shape == (cols, words)


@pytest.mark.parametrize("bits", [2, 3, 5, 16, True])
def test_pack_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="4- and 8-bit"):
        pack_rows(torch.zeros(32, 2, dtype=torch.int64), bits)


def test_pack_rejects_out_of_range_and_ragged():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_rows(torch.zeros(12, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="integers"):
        pack_rows(torch.zeros(8, 1), 4)


# --------------------------------------------------------------------------------------------------
# Module tensors
# --------------------------------------------------------------------------------------------------
def _random_quant(n: int, k: int, bits: int, group_size: int, act_order: bool, seed: int, zero_lo: int = 1):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-3).half()
    zeros = torch.randint(zero_lo, 2**bits, (groups, n), generator=gen).to(torch.int32)
    g_idx = default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return q, scales, zeros, g_idx


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    group_size=st.sampled_from([32, 128, -1]),
    act_order=st.booleans(),
    fmt=st.sampled_from(["gptq", "gptq_v2"]),
    seed=st.integers(0, 2**31),
)
def test_gptq_tensors_round_trip(bits, group_size, act_order, fmt, seed):
    n, k = 16, 256
    q, scales, zeros, g_idx = _random_quant(n, k, bits, group_size, act_order, seed, zero_lo=1 if fmt == "gptq" else 0)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed)).half()
    tensors = gptq_tensors(q, scales, zeros, g_idx, bias, bits, checkpoint_format=fmt)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == gptq_shapes(k, n, bits, group_size)
    assert tensors["qweight"].dtype == tensors["qzeros"].dtype == tensors["g_idx"].dtype == torch.int32
    assert tensors["scales"].dtype == tensors["bias"].dtype == torch.float16
    q2, scales2, zeros2, g_idx2 = read_gptq(tensors, bits, group_size, fmt)
    assert torch.equal(q2, q) and torch.equal(scales2, scales) and torch.equal(zeros2, zeros)
    assert torch.equal(g_idx2, g_idx) and torch.equal(tensors["bias"], bias)


@pytest.mark.parametrize("bits", [4, 8])
def test_classic_format_stores_zero_minus_one(bits):
    """Symmetric AutoGPTQ checkpoints hold 0x77777777 (Int4) / bytes of 127 (Int8) in qzeros (spec 11.2)."""
    n, k = 32, 128
    mid = 2 ** (bits - 1)
    zeros = torch.full((1, n), mid, dtype=torch.int32)
    q = torch.zeros(n, k, dtype=torch.uint8)
    classic = gptq_tensors(q, torch.ones(1, n), zeros, default_g_idx(k, 128), None, bits)
    word = 0x77777777 if bits == 4 else 0x7F7F7F7F
    assert (classic["qzeros"] == word).all()
    v2 = gptq_tensors(q, torch.ones(1, n), zeros, default_g_idx(k, 128), None, bits, checkpoint_format="gptq_v2")
    assert (v2["qzeros"] == (0x88888888 - 2**32 if bits == 4 else 0x80808080 - 2**32)).all()
    # The same file read with the wrong convention is off by one in every zero point.
    assert (read_gptq(classic, bits, 128, "gptq_v2")[2] == mid - 1).all()
    assert torch.equal(classic["bias"], torch.zeros(n, dtype=torch.float16))


def test_classic_format_cannot_store_zero_point_zero():
    q, scales, zeros, g_idx = _random_quant(8, 64, 4, 32, False, 0)
    zeros[0, 0] = 0
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_tensors(q, scales, zeros, g_idx, None, 4)
    tensors = gptq_tensors(q, scales, zeros, g_idx, None, 4, checkpoint_format="gptq_v2")
    assert read_gptq(tensors, 4, 32, "gptq_v2")[2][0, 0] == 0


def test_dequantize_gptq_formula():
    q, scales, zeros, g_idx = _random_quant(8, 64, 4, 32, True, 3)
    w = dequantize_gptq(q, scales, zeros, g_idx)
    n, k = 5, 41
    g = int(g_idx[k])
    assert w[n, k] == (int(q[n, k]) - int(zeros[g, n])) * scales[g, n].float()


def test_read_gptq_without_g_idx_uses_k_over_group_size():
    q, scales, zeros, g_idx = _random_quant(8, 64, 8, 32, False, 1)
    tensors = gptq_tensors(q, scales, zeros, g_idx, None, 8)
    del tensors["g_idx"]
    assert torch.equal(read_gptq(tensors, 8, 32)[3], torch.arange(64, dtype=torch.int32) // 32)


def test_read_gptq_errors_name_the_tensor():
    q, scales, zeros, g_idx = _random_quant(16, 128, 4, 32, False, 2)
    tensors = gptq_tensors(q, scales, zeros, g_idx, None, 4)
    with pytest.raises(ValueError, match=r"blk\.qzeros has shape \[4, 2\].*imply \[2, 2\]"):
        read_gptq(tensors, 4, 64, name="blk")  # group size contradicting the tensors
    with pytest.raises(ValueError, match=r"blk\.qzeros has shape \[4, 2\].*imply \[2, 4\]"):
        read_gptq(tensors, 8, 32, name="blk")  # bits contradicting: qweight then means K = 64
    with pytest.raises(ValueError, match=r"group_size 48 does not divide in_features 128"):
        read_gptq(tensors, 4, 48, name="blk")
    with pytest.raises(ValueError, match=r"blk\.scales is missing"):
        read_gptq({k: v for k, v in tensors.items() if k != "scales"}, 4, 32, name="blk")
    with pytest.raises(ValueError, match=r"blk\.qweight has dtype torch\.int64"):
        read_gptq({**tensors, "qweight": tensors["qweight"].long()}, 4, 32, name="blk")
    with pytest.raises(ValueError, match=r"blk\.g_idx values must lie in \[0, 4\)"):
        read_gptq({**tensors, "g_idx": torch.full((128,), 4, dtype=torch.int32)}, 4, 32, name="blk")
    with pytest.raises(ValueError, match="4- and 8-bit"):
        read_gptq(tensors, 3, 32)


def test_gptq_shapes_reject_group_size_not_dividing_k():
    with pytest.raises(ValueError, match="group_size 128 does not divide in_features 192"):
        gptq_shapes(192, 64, 4, 128)
    assert gptq_shapes(192, 64, 4, -1)["scales"] == (1, 64)


# --------------------------------------------------------------------------------------------------
# QuantizationConfig
# --------------------------------------------------------------------------------------------------
def _write(folder, name, data):
    (folder / name).write_text(json.dumps(data))


def test_config_reads_qwen_files_and_writes_them_back(tmp_path):
    _write(
        tmp_path,
        "config.json",
        {"fp16": True, "quantization_config": {**QWEN_INT4_QUANTIZE_CONFIG, "quant_method": "gptq"}},
    )
    _write(tmp_path, "quantize_config.json", QWEN_INT4_QUANTIZE_CONFIG)
    config = QuantizationConfig.from_pretrained(tmp_path)
    assert (config.bits, config.group_size, config.desc_act, config.sym) == (4, 128, False, True)
    assert config.checkpoint_format == "gptq"
    assert config.to_quantize_config_dict() == QWEN_INT4_QUANTIZE_CONFIG
    assert config.to_dict() == {**QWEN_INT4_QUANTIZE_CONFIG, "quant_method": "gptq", "checkpoint_format": "gptq"}


def test_config_from_either_file_alone(tmp_path):
    _write(tmp_path, "config.json", {"hidden_size": 64})
    assert QuantizationConfig.from_pretrained(tmp_path) is None
    _write(tmp_path, "quantize_config.json", {**QWEN_INT4_QUANTIZE_CONFIG, "bits": 8})
    assert QuantizationConfig.from_pretrained(tmp_path).bits == 8
    (tmp_path / "quantize_config.json").unlink()
    _write(tmp_path, "config.json", {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1}})
    assert QuantizationConfig.from_pretrained(tmp_path).group_size == -1


def test_config_files_must_agree(tmp_path):
    _write(tmp_path, "config.json", {"quantization_config": {**QWEN_INT4_QUANTIZE_CONFIG, "quant_method": "gptq"}})
    _write(tmp_path, "quantize_config.json", {**QWEN_INT4_QUANTIZE_CONFIG, "bits": 8})
    with pytest.raises(
        QuantizationConfigError,
        match=r"config\.json \(quantization_config\) and .*quantize_config\.json disagree \(bits: 4 vs 8\)",
    ):
        QuantizationConfig.from_pretrained(tmp_path)
    # damp_percent only describes how the weights were made: no clash.
    _write(tmp_path, "quantize_config.json", {**QWEN_INT4_QUANTIZE_CONFIG, "damp_percent": 0.1})
    assert QuantizationConfig.from_pretrained(tmp_path).damp_percent == 0.01


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
        ({"bits": 3}, "bits=3 is not supported"),
        ({"bits": 2}, "bits=2 is not supported"),
        ({"group_size": 0}, "group_size must be -1 or a positive integer"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        ({"is_marlin_format": True}, "is_marlin_format"),
        ({"format": "gptq_v2", "checkpoint_format": "gptq"}, "'format' .* disagree"),
    ],
)
def test_config_bad_values_name_the_file(tmp_path, change, message):
    _write(
        tmp_path,
        "config.json",
        {"quantization_config": {**QWEN_INT4_QUANTIZE_CONFIG, "quant_method": "gptq", **change}},
    )
    with pytest.raises(QuantizationConfigError, match=message) as err:
        QuantizationConfig.from_pretrained(tmp_path)
    assert "config.json" in str(err.value)


def test_config_round_trips_through_transformers_gptq_config():
    transformers = pytest.importorskip("transformers")
    ours = QuantizationConfig(bits=8, group_size=64, desc_act=True, checkpoint_format="gptq_v2")
    theirs = transformers.GPTQConfig.from_dict(ours.to_dict())
    fmt = getattr(theirs, "checkpoint_format", getattr(theirs, "format", None))  # renamed in transformers 5
    assert (theirs.bits, theirs.group_size, theirs.desc_act, theirs.sym, fmt) == (8, 64, True, True, "gptq_v2")
    back = QuantizationConfig.from_dict(theirs.to_dict())  # str enums, 'format' alias, extra keys
    assert (back.bits, back.group_size, back.desc_act, back.checkpoint_format) == (8, 64, True, "gptq_v2")


def test_config_save_pretrained_updates_config_json(tmp_path):
    _write(tmp_path, "config.json", {"hidden_size": 64})
    QuantizationConfig(bits=8).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert json.loads((tmp_path / "quantize_config.json").read_text())["bits"] == 8
    assert QuantizationConfig.from_pretrained(tmp_path) == QuantizationConfig(bits=8)
