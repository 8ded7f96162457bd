"""Loading quantized models: GPTQ checkpoints as written by AutoGPTQ, int8/int4 on the fly, bitsandbytes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from token_ids import random_ids

from qwenlm import AutoModelForCausalLM
from qwenlm.model import load_model
from qwenlm.model.loading import CheckpointError
from qwenlm.quant.embedding import QuantEmbedding
from qwenlm.quant.formats import gptq_tensors
from qwenlm.quant.linear import QuantLinear
from qwenlm.testing import make_random_checkpoint

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# A checkpoint whose every input size is a multiple of 128, so int4 with Qwen's group size 128 applies
# (the shared tiny checkpoint has hidden size 64), with a small vocabulary to keep it fast.
QUANT_SHAPE = dict(hidden_size=256, num_attention_heads=4, kv_channels=64, intermediate_size=1024, vocab_size=4096)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _float_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _copy_metadata(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken"):
        shutil.copyfile(src / name, dst / name)


def _rtn(w: torch.Tensor, bits: int, g_idx: torch.Tensor, groups: int, sym: bool):
    """Round-to-nearest with AutoGPTQ's conventions, one (scale, zero) per (group, output row)."""
    maxq = 2**bits - 1
    member = F.one_hot(g_idx.long(), groups).bool().t()  # [G, K]
    big = torch.finfo(torch.float32).max
    hi = torch.stack([torch.where(member[g], w, -big).amax(1) for g in range(groups)])  # [G, N]
    lo = torch.stack([torch.where(member[g], w, big).amin(1) for g in range(groups)])
    if sym:
        scales = (torch.maximum(hi.abs(), lo.abs()) * 2 / maxq).half()
        zeros = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.int32)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scales = ((hi - lo) / maxq).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, maxq).to(torch.int32)
    s, z = scales.float()[g_idx.long()].t(), zeros[g_idx.long()].t()
    q = torch.clamp(torch.round(w / s) + z, 0, maxq).to(torch.uint8)
    return q, scales, zeros


def write_gptq_checkpoint(
    src: Path, dst: Path, bits: int, group_size: int, fmt: str = "gptq", act_order: bool = False, sym: bool = True
) -> dict[str, torch.Tensor]:
    """Quantize `src`'s block linears by RTN into an AutoGPTQ-layout checkpoint at `dst`.

    Returns the float32 tensors of the float model that computes exactly what the checkpoint holds:
    the dequantized weights, and every other tensor as stored (fp16, like the released files).
    """
    _copy_metadata(src, dst)
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    stored, float_twin = {}, {}
    source = _float_tensors(src)
    for name, tensor in source.items():
        module, _, kind = name.rpartition(".")
        if not module.endswith(BLOCK_LINEARS):
            stored[name] = tensor.half()
            float_twin[name] = stored[name].float()
            continue
        if kind == "bias":
            continue  # written with its weight
        w = tensor.float()
        n, k = w.shape
        size = k if group_size == -1 else group_size
        g_idx = torch.arange(k, dtype=torch.int32) // size
        if act_order:  # desc_act: groups are formed in a permuted column order
            g_idx = g_idx[torch.randperm(k, generator=gen)]
        q, scales, zeros = _rtn(w, bits, g_idx, k // size, sym)
        bias = source.get(f"{module}.bias")
        for key, value in gptq_tensors(q, scales, zeros, g_idx, bias, bits, checkpoint_format=fmt).items():
            stored[f"{module}.{key}"] = value
        g = g_idx.long()
        float_twin[name] = (q.float() - zeros[g].t().float()) * scales[g].t().float()
        if bias is not None:
            float_twin[f"{module}.bias"] = bias.half().float()
    save_file(stored, str(dst / "model.safetensors"))
    qconfig = {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": act_order,
               "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
               "model_file_base_name": "model"}  # fmt: skip
    if fmt != "gptq":
        qconfig["checkpoint_format"] = fmt
    config = json.loads((dst / "config.json").read_text())
    config.update(fp16=True, torch_dtype="float16", quantization_config={**qconfig, "quant_method": "gptq"})
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "quantize_config.json").write_text(json.dumps(qconfig))
    return float_twin


def write_float_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    _copy_metadata(src, dst)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        data[key] = value if not isinstance(value, dict) else {**data.get(key, {}), **value}
    file.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def quant_checkpoint(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("quant-shape"), preset="tiny", seed=3, **QUANT_SHAPE)


@pytest.fixture(scope="module")
def quant_reference(quant_checkpoint):
    """The fp32 model and its logits on 4 x 64 random tokens (256 positions)."""
    model = load_model(quant_checkpoint, torch_dtype=torch.float32, progress=False)
    ids = random_ids(4, 64, seed=5, high=QUANT_SHAPE["vocab_size"])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    return model, ids, logits


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """The shared tiny shape (hidden size 64) with a 4096-token vocabulary: GPTQ tests write several copies."""
    folder = tmp_path_factory.mktemp("tiny-small-vocab")
    return make_random_checkpoint(folder, preset="tiny", vocab_size=4096, max_shard_size="200KB")


@pytest.fixture(scope="module")
def gptq_checkpoint(small_checkpoint, tmp_path_factory) -> Path:
    """A classic-format 4-bit group-32 GPTQ checkpoint made from the tiny checkpoint."""
    folder = tmp_path_factory.mktemp("gptq") / "int4"
    write_gptq_checkpoint(small_checkpoint, folder, bits=4, group_size=32)
    return folder


# --------------------------------------------------------------------------------------------------
# QuantLinear
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group_size, act_order", [(8, -1, False), (4, 128, False), (4, 32, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_its_dequantized_weight(bits, group_size, act_order, dtype):
    gen = torch.Generator().manual_seed(bits + group_size)
    k, n = 256, 96
    weight, bias = 0.02 * torch.randn(n, k, generator=gen), 0.01 * torch.randn(n, generator=gen)
    size = k if group_size == -1 else group_size
    g_idx = torch.arange(k, dtype=torch.int32) // size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    q, scales, zeros = _rtn(weight, bits, g_idx, k // size, sym=True)
    layer = QuantLinear.from_gptq(gptq_tensors(q, scales, zeros, g_idx, bias, bits), bits, group_size, dtype=dtype)
    assert (layer.perm is not None) == act_order
    w = layer.dequantized_weight(torch.float32)
    assert ((w - weight).norm() / weight.norm()) < (0.01 if bits == 8 else 0.12)  # it is the weight, quantized
    for rows in (1, 3, 40):  # few rows: the CPU kernel; many: dequantize + F.linear
        x = torch.randn(rows, k, generator=gen).to(dtype)
        expected = F.linear(x.float(), w, layer.bias.float())
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(layer(x).float(), expected, **tolerance)
        layer.use_kernels = False
        torch.testing.assert_close(layer(x).float(), expected, **tolerance)
        layer.use_kernels = True
    assert not hasattr(layer, "weight") and not list(layer.parameters())  # integer buffers, no float weight


def test_quant_linear_follows_its_buffers_after_load_and_conversion():
    """QuantLinear keeps its kernel-layout weight between calls: a state_dict loaded in place, a dtype
    conversion of the scales and a replaced buffer must all show in the next output."""
    gen = torch.Generator().manual_seed(7)
    a, b = (QuantLinear.from_float(torch.randn(64, 256, generator=gen), None, bits=4, group_size=128) for _ in "ab")
    x = torch.randn(1, 256, generator=gen)
    with torch.inference_mode():
        a(x)  # builds and keeps a's weight
        a.load_state_dict(b.state_dict())  # copies into a's existing buffers
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        a.half()  # fp16 scales: the kernel path converts them back to fp32 on every call
        torch.testing.assert_close(a(x), F.linear(x, a.dequantized_weight(torch.float32)), rtol=1e-3, atol=1e-3)
        a.float()
        a.zeros = torch.zeros_like(a.zeros)  # a new buffer object
        torch.testing.assert_close(a(x), F.linear(x, a.dequantized_weight(torch.float32)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# GPTQ checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits, group_size, fmt, act_order, sym",
    [
        (4, 32, "gptq", False, True),  # Qwen's recipe (group 128 needs K >= 128; the tiny model has 64)
        (8, 32, "gptq", False, True),
        (4, 64, "gptq_v2", True, False),  # act-order, asymmetric (zero points of 0 need v2)
        (8, 32, "gptq", True, True),
        (8, -1, "gptq", False, True),
    ],
)
def test_gptq_checkpoint_loads_bit_exact(small_checkpoint, tmp_path, bits, group_size, fmt, act_order, sym):
    twin = write_gptq_checkpoint(small_checkpoint, tmp_path / "q", bits, group_size, fmt, act_order, sym)
    model = load_model(tmp_path / "q", torch_dtype=torch.float32, progress=False)

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(quantized) == sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in BLOCK_LINEARS)
    assert isinstance(model.lm_head, torch.nn.Linear)  # stored float: stays float
    for name, module in quantized.items():
        assert not hasattr(module, "weight")
        several_groups = 0 < group_size < module.in_features
        assert module.bits == bits and (module.perm is not None) == (act_order and several_groups)
        assert torch.equal(module.dequantized_weight(torch.float32), twin[f"{name}.weight"]), name
        if name.endswith("c_attn"):
            assert torch.equal(module.bias, twin[f"{name}.bias"])
        else:
            assert module.bias is None  # the all-zero biases GPTQ writers store are dropped

    float_twin = write_float_checkpoint(small_checkpoint, tmp_path / "f", twin)
    reference = load_model(float_twin, torch_dtype=torch.float32, progress=False)
    ids = random_ids(2, 24, seed=1, high=4096)
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, rtol=1e-4, atol=1e-5)
        out = model(ids[:, :-1])  # then one decode step: few rows take the CPU kernel path
        step = model(ids[:, -1:], past_key_values=out.past_key_values).logits
        torch.testing.assert_close(step[:, -1], expected[:, -1], rtol=1e-4, atol=1e-5)


def test_gptq_checkpoint_defaults_to_bf16_on_cpu(gptq_checkpoint):
    """Its config says fp16 (slow on CPU); bf16 keeps the float tensors at the stored size."""
    model = load_model(gptq_checkpoint, progress=False)
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert model.quantization == "GPTQ 4-bit"
    logits = model(random_ids(1, 8, seed=2, high=4096), use_cache=False).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_gptq_module_set_comes_from_tensor_names(small_checkpoint, tmp_path):
    """A linear stored as a float weight in a GPTQ checkpoint stays an nn.Linear (here: layer 1's w1)."""
    write_gptq_checkpoint(small_checkpoint, tmp_path / "q", 4, 32)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    for key in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        del tensors[f"transformer.h.1.mlp.w1.{key}"]
    tensors["transformer.h.1.mlp.w1.weight"] = _float_tensors(small_checkpoint)["transformer.h.1.mlp.w1.weight"]
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"))
    model = load_model(tmp_path / "q", torch_dtype=torch.float32, progress=False)
    assert isinstance(model.transformer.h[1].mlp.w1, torch.nn.Linear)
    assert isinstance(model.transformer.h[0].mlp.w1, QuantLinear)


def _gptq_copy(gptq_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(gptq_checkpoint, folder)
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 3}, r"config\.json \(quantization_config\): bits=3 is not supported"),
        ({"quant_method": "awq"}, r"config\.json \(quantization_config\): quant_method 'awq' is not supported"),
        ({"bits": 8}, r"quantize_config\.json disagree \(bits: 8 vs 4\)"),
        (
            {"group_size": 48},
            r"transformer\.h\.0\.attn\.c_attn \(64 inputs, 192 outputs\) cannot be GPTQ-quantized"
            r".*group_size 48 does not divide in_features 64",
        ),
    ],
)
def test_gptq_bad_config_is_a_clear_error(gptq_checkpoint, tmp_path, change, message):
    folder = _gptq_copy(gptq_checkpoint, tmp_path)
    _edit_json(folder / "config.json", quantization_config=change)
    if "disagree" not in message:
        _edit_json(folder / "quantize_config.json", **change)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, progress=False)


def test_gptq_shapes_contradicting_config_name_file_and_tensor(gptq_checkpoint, tmp_path):
    folder = _gptq_copy(gptq_checkpoint, tmp_path)
    for name in ("config.json",):
        _edit_json(folder / name, quantization_config={"bits": 8})
    _edit_json(folder / "quantize_config.json", bits=8)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, progress=False)
    message = str(err.value)
    assert "tensor transformer.h.0.attn.c_attn.qweight in model.safetensors has shape [8, 192]" in message
    assert "bits=8, group_size=32" in message and "imply [16, 192]" in message


def test_gptq_tensors_without_config_or_on_the_fly_requantization(gptq_checkpoint, tmp_path):
    folder = _gptq_copy(gptq_checkpoint, tmp_path)
    with pytest.raises(CheckpointError, match=r"already quantized \(GPTQ 4-bit\).*quantization='int8'"):
        load_model(folder, quantization="int8", progress=False)
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(folder, quantization_config={"load_in_8bit": True}, progress=False)
    # A transformers GPTQConfig restating the checkpoint's settings (Qwen's Q-LoRA recipe) is fine...
    assert isinstance(
        load_model(folder, quantization_config={"quant_method": "gptq", "bits": 4}, progress=False)
        .transformer.h[0]
        .mlp.w1,
        QuantLinear,
    )
    with pytest.raises(CheckpointError, match="quantization_config says bits=8"):  # ...a contradicting one is not
        load_model(folder, quantization_config={"quant_method": "gptq", "bits": 8}, progress=False)
    (folder / "quantize_config.json").unlink()
    _edit_json(folder / "config.json", quantization_config=None)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"GPTQ tensors \(e\.g\. .*\.qweight in model\.safetensors\) but neither"):
        load_model(folder, progress=False)


def test_gptq_checkpoint_with_transformers_gptq_config(gptq_checkpoint):
    """Qwen's Q-LoRA recipe passes GPTQConfig(bits=4, disable_exllama=True); its defaults are no claim."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTQConfig(bits=4, group_size=64, disable_exllama=True)  # the file's group size wins
    model = AutoModelForCausalLM.from_pretrained(gptq_checkpoint, quantization_config=config, trust_remote_code=True)
    assert model.transformer.h[0].attn.c_attn.group_size == 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantized_models_on_cuda(gptq_checkpoint, quant_checkpoint):
    for folder, options in ((gptq_checkpoint, {}), (quant_checkpoint, {"quantization": "int4"})):
        ids = random_ids(1, 12, seed=4, high=4096)
        cpu = load_model(folder, torch_dtype=torch.float32, progress=False, **options)
        gpu = load_model(folder, device_map="cuda", torch_dtype=torch.float32, progress=False, **options)
        assert all(t.device.type == "cuda" for t in gpu.buffers())
        with torch.no_grad():
            expected = cpu(ids, use_cache=False).logits
            torch.testing.assert_close(gpu(ids.cuda(), use_cache=False).logits.cpu(), expected, rtol=1e-3, atol=1e-4)


def test_gptq_act_order_with_unequal_groups_is_refused(small_checkpoint, tmp_path):
    write_gptq_checkpoint(small_checkpoint, tmp_path / "q", 4, 32, act_order=True)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    g_idx = tensors["transformer.h.0.mlp.w2.g_idx"]
    g_idx[:40] = 0  # group 0 now has more than 32 members
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.mlp\.w2\.g_idx puts .* group_size=32"):
        load_model(tmp_path / "q", progress=False)


# --------------------------------------------------------------------------------------------------
# On the fly
# --------------------------------------------------------------------------------------------------
def _compare(model, ids, reference_logits) -> tuple[float, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    cosine = F.cosine_similarity(logits.flatten(1), reference_logits.flatten(1)).min().item()
    return cosine, logits.argmax(-1), logits


def _relative_error(module: QuantLinear, weight: torch.Tensor) -> float:
    return ((module.dequantized_weight() - weight).norm() / weight.norm()).item()


def test_int8_on_the_fly_accuracy(quant_checkpoint, quant_reference):
    reference, ids, ref_logits = quant_reference
    model = AutoModelForCausalLM.from_pretrained(quant_checkpoint, quantization="int8", torch_dtype=torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 2 * 5 + 1 and linears["lm_head"].bits == 8  # lm_head included
    for name, module in linears.items():  # per-channel symmetric int8: ~0.7% error on Gaussian rows
        assert module.bits == 8 and module.group_size == module.in_features
        assert _relative_error(module, reference.get_submodule(name).weight) < 0.01, name
    wte = model.transformer.wte  # per-row int8 table, dequantized per lookup
    assert isinstance(wte, QuantEmbedding) and (wte.bits, wte.group_size) == (8, wte.embedding_dim)
    assert _relative_error(wte, reference.transformer.wte.weight) < 0.01

    cosine, top1, logits = _compare(model, ids, ref_logits)
    assert cosine >= 0.999
    # Random weights give flat logits: the top two of 4096 are often closer than int8 noise moves them,
    # which a trained model's confident predictions are not. Top-1 is compared where fp32 is not a near
    # tie (top-1/top-2 gap >= 5% of the logit spread), and overall it must still agree almost always.
    top2 = ref_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) >= 0.05 * ref_logits.std()
    agree = top1 == ref_logits.argmax(-1)
    assert clear.sum() >= 150  # "a few hundred positions" of 256 are clear
    assert agree[clear].float().mean() >= 0.99
    assert agree.float().mean() >= 0.95


def test_int4_on_the_fly_accuracy(quant_checkpoint, quant_reference):
    """Group-wise RTN int4 errs ~10% per weight on Gaussian weights (step ~5.2 sigma / 15, error step/sqrt(12));
    with random blocks dominating the residual stream that compounds to a logit cosine near 0.98 here with a
    float embedding, 0.974 with the int4 embedding too, so 0.99 is out of reach for any RTN int4 on this
    random model (see the report); 0.97 with g128 and a strict improvement with smaller groups are asserted
    instead."""
    reference, ids, ref_logits = quant_reference
    model = load_model(quant_checkpoint, quantization="int4", torch_dtype=torch.float32, progress=False)
    quantized = ((n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    for name, module in quantized:  # the blocks and the embedding in int4 g128, lm_head in int6 (Q4_0 files: Q6_K)
        assert (module.bits, module.group_size) == ((6 if name == "lm_head" else 4), 128), name
        assert _relative_error(module, reference.get_submodule(name).weight) < (0.03 if name == "lm_head" else 0.11)
    assert isinstance(model.transformer.wte, QuantEmbedding)
    cosine_g128, _, logits = _compare(model, ids, ref_logits)
    assert cosine_g128 >= 0.97

    finer = load_model(
        quant_checkpoint, quantization="int4", quantization_group_size=32, torch_dtype=torch.float32, progress=False
    )
    cosine_g32, _, _ = _compare(finer, ids, ref_logits)
    assert cosine_g128 < cosine_g32
    with torch.no_grad():  # the cached decode path (CPU kernel) agrees with the full forward
        out = model(ids[:1, :-1])
        step = model(ids[:1, -1:], past_key_values=out.past_key_values).logits.float()
    torch.testing.assert_close(step[0, -1], logits[0, -1], rtol=1e-4, atol=1e-4)


def test_quantized_model_memory(quant_checkpoint, quant_reference):
    """Parameters + buffers shrink to bits/8 bytes per linear and embedding weight plus per-group scale and zero."""
    reference = quant_reference[0]
    tables = {n: m.weight.numel() for n, m in reference.named_modules() if isinstance(m, (torch.nn.Linear,
              torch.nn.Embedding))}  # fmt: skip
    rest = model_bytes(reference) - sum(tables.values()) * 4  # norms, c_attn bias
    for scheme in ("int8", "int4"):
        model = load_model(quant_checkpoint, quantization=scheme, torch_dtype=torch.float32, progress=False)
        expected = rest
        for name, count in tables.items():
            module = model.get_submodule(name)
            per_weight = module.bits / 8
            bias = getattr(module, "bias", None)
            own = model_bytes(module) - (bias.numel() * 4 if bias is not None else 0)
            assert count * per_weight <= own <= count * per_weight * 1.1, (scheme, name, own)  # + scales/zeros
            expected += count * per_weight
        assert expected <= model_bytes(model) <= expected * 1.1  # fp32 scale + int16 zero per group: +9% at int4 g128
        # From fp32, the weights' bytes drop ~4x (int8) or ~5-7x (int4, with lm_head in int6).
        assert model_bytes(reference) - model_bytes(model) >= 0.7 * sum(tables.values()) * 4


def test_int4_schemes_int6_head_keeps_the_logits_of_an_int8_head(quant_reference):
    """Issue 19's bar for a smaller lm_head: on the same final hidden states, the int4 scheme's head (int6 g128)
    gives logits with a cosine >= 0.999 to those of an int8 per-channel head, and reads ~3/4 of its bytes."""
    from qwenlm.quant.onthefly import quantize_packed, recipe_for

    reference, ids, _ = quant_reference
    with torch.no_grad():
        hidden = reference(ids, use_cache=False).hidden_states.reshape(-1, QUANT_SHAPE["hidden_size"])
    weight = reference.lm_head.weight.detach()
    heads = {}
    for scheme in ("int8", "int4"):
        r = recipe_for("lm_head", scheme)
        heads[scheme] = QuantLinear(quantize_packed(weight, r.bits, r.group_size, r.sym))
    assert (heads["int4"].bits, heads["int8"].bits) == (6, 8)
    with torch.no_grad():
        logits = {scheme: head(hidden).float() for scheme, head in heads.items()}
    assert F.cosine_similarity(logits["int4"], logits["int8"], dim=-1).min() >= 0.999
    assert heads["int4"].qdata.numel() == heads["int8"].qdata.numel() * 3 // 4


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (8, -1, True), (4, 32, False), (6, 128, False)])
def test_quantize_packed_in_slabs_equals_packing_the_whole_matrix(monkeypatch, bits, group_size, sym):
    """Quantizing and packing slab by slab (what keeps a load's peak low) changes no byte of the result."""
    import qwenlm.quant.onthefly as onthefly
    from qwenlm.kernels.quant import pack_quantized

    weight = torch.randn(1000, 256, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(onthefly, "_CHUNK_ELEMENTS", 256 * 37)  # slabs of 37 rows, the last one short
    slabbed = onthefly.quantize_packed(weight, bits, group_size, sym)
    whole = pack_quantized(*onthefly.quantize_weight(weight, bits, group_size, sym), bits, 256 if group_size == -1
                           else group_size)  # fmt: skip
    for a, b in ((slabbed.qdata, whole.qdata), (slabbed.scales, whole.scales), (slabbed.zeros, whole.zeros)):
        assert torch.equal(a, b)
    assert (slabbed.group_size, slabbed.in_features) == (whole.group_size, whole.in_features)


def test_quantized_embedding_lookup_matches_its_dequantized_table(quant_checkpoint, quant_reference):
    """A lookup returns exactly the rows of the dequantized table, in the model dtype, for any id shape."""
    model = load_model(quant_checkpoint, quantization="int4", progress=False)
    wte = model.transformer.wte
    table = wte.dequantized_weight(torch.float32)
    ids = random_ids(2, 7, seed=5, high=QUANT_SHAPE["vocab_size"])
    rows = wte(ids)
    assert rows.shape == (2, 7, QUANT_SHAPE["hidden_size"]) and rows.dtype == torch.bfloat16
    assert torch.equal(rows, table[ids].to(torch.bfloat16))
    assert torch.equal(wte(ids[0, 3]), rows[0, 3])  # a 0-d id, as nn.Embedding takes
    with pytest.raises(IndexError):
        wte(torch.tensor([QUANT_SHAPE["vocab_size"]]))


def test_bf16_default_on_cpu_and_device_moves(quant_checkpoint):
    model = load_model(quant_checkpoint, quantization="int4", progress=False)
    assert model.dtype == torch.bfloat16  # documented CPU default for quantized loads
    logits = model(random_ids(1, 6, seed=3, high=QUANT_SHAPE["vocab_size"]), use_cache=False).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    layer = model.transformer.h[0].mlp.w1
    moved = layer.to("meta")
    assert all(t.device.type == "meta" for t in moved.buffers())


def test_on_the_fly_bad_options(small_checkpoint, quant_checkpoint):
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model(quant_checkpoint, quantization="int3", progress=False)
    with pytest.raises(
        ValueError, match=r"quantization_group_size 128 does not divide the 64 inputs of transformer\.h\.0"
    ):
        load_model(small_checkpoint, quantization="int4", progress=False)  # hidden size 64
    for scheme in ("int8", None):
        with pytest.raises(ValueError, match="quantization_group_size applies to quantization='int4' only"):
            load_model(quant_checkpoint, quantization=scheme, quantization_group_size=64, progress=False)
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        load_model(quant_checkpoint, quantization_config={"quant_method": "gptq", "bits": 4}, progress=False)
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        load_model(quant_checkpoint, quantization_config={"quant_method": "awq"}, progress=False)


def test_on_the_fly_keeps_no_float_weight_matrix(quant_checkpoint):
    """Each linear and the embedding are replaced as their tensors arrive: no float matrix is left."""
    model = load_model(quant_checkpoint, quantization="int8", torch_dtype=torch.float32, progress=False)
    matrices = [n for n, t in model.state_dict().items() if t.is_floating_point() and t.dim() == 2]
    assert all(n.endswith(".scales") for n in matrices), matrices


# --------------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------------
def test_bnb_missing_is_a_clear_import_error(quant_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r'pip install "qwenlm\[bnb\]".*quantization="int8"'):
        load_model(quant_checkpoint, quantization_config={"load_in_4bit": True}, progress=False)


@pytest.mark.parametrize("settings", [{"load_in_8bit": True}, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}])
def test_bnb_layers_when_installed(quant_checkpoint, quant_reference, settings):
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    _, ids, ref_logits = quant_reference
    config = transformers.BitsAndBytesConfig(**settings, bnb_4bit_compute_dtype=torch.float32)
    model = load_model(quant_checkpoint, quantization_config=config, torch_dtype=torch.float32, progress=False)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, bnb.nn.Linear8bitLt if "load_in_8bit" in settings else bnb.nn.Linear4bit)
    assert isinstance(model.lm_head, torch.nn.Linear)  # transformers' default: lm_head stays float
    cosine, _, _ = _compare(model, ids[:1, :16], ref_logits[:1, :16])
    assert cosine >= (0.99 if "load_in_8bit" in settings else 0.9)


@pytest.mark.parametrize("kernels", [True, False])
def test_quantizing_onto_a_cpu_without_the_kernels_warns_once_with_the_way_out(tiny_checkpoint, monkeypatch, caplog,
                                                                               kernels):  # fmt: skip
    """Without qwenlm's kernels (an ARM Mac; an x86 CPU without AVX2, or without a compiler) quantized linears
    dequantize every weight at every step: the load says so, and what to do, instead of leaving a user with a model
    ~100x slower than bf16."""
    from qwenlm.quant import loader

    monkeypatch.setattr(loader, "kernels_available", lambda: kernels)
    monkeypatch.setattr(loader, "avx2_kernel_available", lambda: False)  # no kernel of any kind, or the AVX-512 one
    monkeypatch.setattr(loader, "kernels_status", lambda: "CPU lacks avx512f")
    with caplog.at_level("WARNING", logger="qwenlm.quant.loader"):
        load_model(tiny_checkpoint, quantization="int8", progress=False)
    warned = [r.getMessage() for r in caplog.records if r.name == "qwenlm.quant.loader"]
    if kernels:
        assert warned == []
    else:
        assert len(warned) == 1 and "CPU lacks avx512f" in warned[0] and "unquantized (bf16)" in warned[0]
