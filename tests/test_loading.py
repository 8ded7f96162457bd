"""Checkpoint loading: layouts, dtypes, devices, and a clear error for every broken input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from token_ids import random_ids

from qwenlm import AutoModelForCausalLM, AutoTokenizer, CheckpointError, GenerationConfig
from qwenlm.model.loading import device_for, load_model, plan_device_map, resolve_dtype
from qwenlm.testing import make_random_checkpoint, preset_config


def _shards(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return [folder / name for name in sorted(set(index["weight_map"].values()))]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _load(path, **kw):
    return load_model(path, torch_dtype=torch.float32, progress=False, **kw)


def test_sharded_equals_single_file_equals_bin(tiny_checkpoint, tiny_model, tmp_path):
    assert (tiny_checkpoint / "model.safetensors.index.json").is_file()
    single = make_random_checkpoint(tmp_path / "single", preset="tiny")
    legacy = make_random_checkpoint(tmp_path / "bin", preset="tiny", weights_format="bin")
    assert not (single / "model.safetensors.index.json").exists() and (legacy / "pytorch_model.bin").is_file()
    ids = random_ids(1, 12)
    expected = tiny_model(ids).logits
    for folder in (single, legacy):
        torch.testing.assert_close(_load(folder)(ids).logits, expected, rtol=0, atol=0)


def test_checkpoint_layout_is_the_hf_one(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = sum(t.numel() * t.element_size() for s in shards for t in load_file(tiny_checkpoint / s).values())
    assert index["metadata"]["total_size"] == total
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    tensor = load_file(tiny_checkpoint / shards[0])
    assert all(t.dtype == torch.bfloat16 for t in tensor.values())
    names = set(index["weight_map"])
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.w2.weight",
            "transformer.ln_f.weight", "lm_head.weight"} <= names  # fmt: skip
    assert not any(n.endswith("c_proj.bias") for n in names)  # no_bias
    for name in ("generation_config.json", "tokenizer_config.json", "qwen.tiktoken"):
        assert (tiny_checkpoint / name).is_file()


def test_random_checkpoint_is_a_pure_function_of_seed(tmp_path):
    a = load_file(make_random_checkpoint(tmp_path / "a", seed=3) / "model.safetensors")
    b_dir = make_random_checkpoint(tmp_path / "b", seed=3, max_shard_size="5MB")
    b = load_file(_shards(b_dir)[1])
    c = load_file(make_random_checkpoint(tmp_path / "c", seed=4) / "model.safetensors")
    for name, tensor in b.items():
        assert torch.equal(tensor, a[name])
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_drop_in_api_as_in_the_seed_documents(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint, device_map="cpu", fp32=True, trust_remote_code=True, revision="main"
    ).eval()
    inputs = tokenizer("蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是", return_tensors="pt")
    inputs = inputs.to(model.device)
    pred = model.generate(**inputs, max_new_tokens=4)
    assert pred.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert pred[0, : inputs["input_ids"].shape[1]].tolist() == inputs["input_ids"][0].tolist()
    assert isinstance(tokenizer.decode(pred.cpu()[0], skip_special_tokens=True), str)
    out = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=True)
    assert out.logits.shape[-1] == 151936 and out.past_key_values.length == inputs["input_ids"].shape[1]
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    gen = GenerationConfig.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert gen.chat_format == "chatml" and model.generation_config == gen


def test_config_overrides_and_unknown_arguments(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint, use_logn_attn=False, use_flash_attn=False, progress=False
    )
    assert model.config.use_logn_attn is False
    with pytest.raises(TypeError, match="bogus"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint, bogus=1)


@pytest.mark.parametrize(
    "kwargs,dtype",
    [({}, torch.float32), ({"bf16": True}, torch.bfloat16), ({"fp16": True}, torch.float16),
     ({"torch_dtype": "bfloat16"}, torch.bfloat16), ({"torch_dtype": torch.float16}, torch.float16),
     ({"torch_dtype": "auto"}, torch.float32), ({"dtype": torch.bfloat16}, torch.bfloat16)],
)  # fmt: skip
def test_dtype_selection_on_cpu(kwargs, dtype, tiny_checkpoint):
    model = load_model(tiny_checkpoint, progress=False, **kwargs)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_dtype_is_transformers_5s_name_for_torch_dtype(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert model.dtype == torch.bfloat16  # not swallowed as a config.json field
    with pytest.raises(ValueError, match="either dtype= or torch_dtype="):
        load_model(tiny_checkpoint, dtype=torch.bfloat16, torch_dtype=torch.float32, progress=False)


def test_bf16_model_runs_and_tracks_fp32(tiny_checkpoint, tiny_model):
    model = load_model(tiny_checkpoint, bf16=True, progress=False)
    ids = random_ids(1, 16)
    low, high = model(ids).logits, tiny_model(ids).logits
    assert low.dtype == torch.bfloat16  # logits stay in the model dtype, as in the reference
    assert torch.nn.functional.cosine_similarity(low.float().flatten(), high.flatten(), dim=0) > 0.99


def test_resolve_dtype_rules():
    config = preset_config("tiny")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="at most one"):
        resolve_dtype(config, cpu, bf16=True, fp32=True)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype(config, cpu, torch_dtype="int3")
    assert resolve_dtype(preset_config("tiny", fp16=True), cpu) == torch.float16  # config.json flag


def test_plan_device_map_spreads_layers_like_load_model_on_gpus():
    plan = plan_device_map(32, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"])
    layers = [plan[f"transformer.h.{i}"] for i in range(32)]
    assert plan["transformer.wte"] == "cuda:0" and plan["lm_head"] == "cuda:3" and plan["transformer.ln_f"] == "cuda:3"
    assert layers == sorted(layers)  # contiguous, in order
    counts = [layers.count(f"cuda:{i}") for i in range(4)]
    assert max(counts) - min(counts) <= 2 and sum(counts) == 32
    assert device_for("transformer.h.31.mlp.w1.weight", plan) == "cuda:3"
    assert device_for("transformer.h.3.ln_1.weight", plan) == "cuda:0"
    assert plan_device_map(4, ["cpu"]) == {k: "cpu" for k in plan_device_map(4, ["cpu"])}


def test_model_split_over_devices_matches_single_device(tiny_checkpoint, tiny_model):
    """The multi-GPU code path (per-layer devices, activations moved between them), run on CPU."""
    placement = plan_device_map(2, ["cpu", "cpu"])
    model = load_model(tiny_checkpoint, device_map=placement, torch_dtype=torch.float32, progress=False)
    ids = random_ids(2, 9)
    torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)


def test_cuda_device_without_cuda_is_a_clear_error(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _load(tiny_checkpoint, device_map="cuda")


# ---- bad input ---------------------------------------------------------------------------------
def test_missing_folder_and_config(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "nope")
    broken = _copy(tiny_checkpoint, tmp_path / "c")
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(broken)


def test_missing_shard_is_named(tmp_path, tiny_checkpoint):
    broken = _copy(tiny_checkpoint, tmp_path / "c")
    shard = _shards(broken)[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        _load(broken)


def test_missing_weights_entirely(tmp_path, tiny_checkpoint):
    broken = tmp_path / "c"
    broken.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", broken)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        _load(broken)


def test_missing_tiktoken_is_named(tmp_path, tiny_checkpoint):
    broken = _copy(tiny_checkpoint, tmp_path / "c")
    (broken / "qwen.tiktoken").unlink()
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        AutoTokenizer.from_pretrained(broken)


def _rewrite_single(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def single_checkpoint(tmp_path):
    return make_random_checkpoint(tmp_path / "single", preset="tiny")


def test_wrong_shape_names_tensor_file_and_shapes(single_checkpoint):
    _rewrite_single(single_checkpoint, lambda t: t.update({"transformer.h.1.mlp.w1.weight": torch.zeros(64, 64)}))
    with pytest.raises(
        CheckpointError, match=r"transformer\.h\.1\.mlp\.w1\.weight.*model\.safetensors.*\[64, 64\].*\[128, 64\]"
    ):
        _load(single_checkpoint)


def test_missing_tensor_is_named(single_checkpoint):
    _rewrite_single(single_checkpoint, lambda t: t.pop("transformer.h.0.ln_2.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*transformer\.h\.0\.ln_2\.weight"):
        _load(single_checkpoint)


def test_unexpected_tensor_is_named(single_checkpoint):
    _rewrite_single(single_checkpoint, lambda t: t.update({"transformer.h.0.mlp.w3.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*transformer\.h\.0\.mlp\.w3\.weight"):
        _load(single_checkpoint)


def test_reference_buffers_are_ignored(single_checkpoint):
    _rewrite_single(single_checkpoint, lambda t: t.update({"transformer.h.0.attn.rotary_emb.inv_freq": torch.zeros(8)}))
    assert _load(single_checkpoint).config.num_hidden_layers == 2


def test_corrupt_safetensors_is_named(single_checkpoint):
    path = single_checkpoint / "model.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(single_checkpoint)


def test_truncated_safetensors_is_named(single_checkpoint):
    path = single_checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(single_checkpoint)


def test_model_type_not_qwen(single_checkpoint):
    config = json.loads((single_checkpoint / "config.json").read_text())
    config["model_type"] = "qwen2"
    (single_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type"):
        _load(single_checkpoint)


@pytest.mark.parametrize(
    "field, value, message",
    [("rotary_emb_base", "10000", "'rotary_emb_base' must be float, got '10000'"),
     ("use_dynamic_ntk", "false", "'use_dynamic_ntk' must be bool, got 'false'"),
     ("rotary_pct", None, "'rotary_pct' must be float, got None")],
)  # fmt: skip
def test_config_values_of_the_wrong_type_name_file_and_field(single_checkpoint, field, value, message):
    config = json.loads((single_checkpoint / "config.json").read_text())
    config[field] = value
    (single_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: config field {message}"):
        _load(single_checkpoint)


def test_loading_options_users_bring_from_transformers(single_checkpoint):
    """accelerate's device_map names, mmap through the Auto class; devices, dtypes and doubled options that
    cannot work are named as such."""
    assert (
        AutoModelForCausalLM.from_pretrained(single_checkpoint, device_map="balanced", progress=False).device.type
        == "cpu"
    )
    AutoModelForCausalLM.from_pretrained(single_checkpoint, mmap=True, progress=False)
    for kwargs, error in [({"device_map": "meta"}, "weights go on 'cpu' or CUDA devices"),
                          ({"device_map": "nowhere"}, "'nowhere' is not a device"),
                          ({"torch_dtype": torch.int8}, "torch_dtype must be a float dtype"),
                          ({"dtype": "float32", "torch_dtype": "bfloat16"}, "give one")]:  # fmt: skip
        with pytest.raises(ValueError, match=error):
            AutoModelForCausalLM.from_pretrained(single_checkpoint, progress=False, **kwargs)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        AutoModelForCausalLM.from_pretrained(single_checkpoint, device_map={"": 0}, progress=False)


def test_a_single_file_wins_over_a_stale_index_as_in_transformers(tmp_path, tiny_checkpoint, tiny_model):
    folder = _copy(tiny_checkpoint, tmp_path / "c")  # sharded
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    with pytest.raises(CheckpointError, match="'weight_map' must map tensor names to shard file names"):
        _load(folder)
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(folder / "model.safetensors"))
    assert torch.equal(_load(folder).lm_head.weight, tiny_model.lm_head.weight)


def test_index_pointing_at_a_tensor_the_shard_lacks(tmp_path, tiny_checkpoint):
    broken = _copy(tiny_checkpoint, tmp_path / "c")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    last = _shards(broken)[-1].name  # the lm_head shard
    index["weight_map"]["transformer.h.0.ln_1.weight"] = last
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.ln_1\.weight.*" + last):
        _load(broken)


def test_quantized_checkpoint_is_refused_clearly(single_checkpoint):
    config = json.loads((single_checkpoint / "config.json").read_text())
    config["quantization_config"] = {"bits": 4, "group_size": 128, "quant_method": "gptq"}
    (single_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="GPTQ"):
        _load(single_checkpoint)


def _file_mappings(folder) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files in `folder` (/proc/self/maps)."""
    folder = str(Path(folder).resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(folder):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cpu_weights_are_copied_into_memory_unless_mmap_is_asked_for(tiny_checkpoint):
    def mapped_params(model) -> int:
        ranges = _file_mappings(tiny_checkpoint)
        return sum(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in model.parameters())

    copied = load_model(tiny_checkpoint, torch_dtype=torch.bfloat16, progress=False)
    assert mapped_params(copied) == 0  # decoding streams every weight: keep them off the page cache
    mapped = load_model(tiny_checkpoint, torch_dtype=torch.bfloat16, mmap=True, progress=False)
    assert mapped_params(mapped) == len(list(mapped.parameters()))  # zero-copy views of the files
    ids = random_ids(1, 8)
    assert torch.equal(copied(ids).logits, mapped(ids).logits)
