"""Validate the plain reference forward (tests/naive_qwen.py) and qwenlm.convert against transformers' Qwen2.

Qwen2 on converted weights is an independent implementation of the same block, so agreement checks
both the oracle and the converter. Features Qwen2 lacks (dynamic NTK, LogN, partial rotary, MLP
biases) are checked by giving Qwen2 the NTK-scaled base, or by patching the one function involved.

    python -m pytest tests/test_naive_oracle.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from naive_qwen import logn_factor, naive_forward, ntk_alpha
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2 import modeling_qwen2

from qwenlm.convert import convert_to_qwen2, qwen2_config_dict, to_qwen2_state_dict

TOL = 1e-4  # fp32 on CPU


def tiny_config(**overrides) -> dict:
    """A Qwen v1 config.json dict for a 2-layer toy model (head dim 16, Ls = 16)."""
    config = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "vocab_size": 1000,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "kv_channels": 16,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "seq_length": 16,
        "max_position_embeddings": 32,
        "rotary_pct": 1.0,
        "rotary_emb_base": 10000,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "layer_norm_epsilon": 1e-6,
        "no_bias": True,
        "tie_word_embeddings": False,
    }
    config.update(overrides)
    return config


def random_checkpoint(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Seeded random tensors with the spec 1.3 names and shapes; biases and norm weights are random too."""
    gen = torch.Generator().manual_seed(seed)
    H, V, F = config["hidden_size"], config["vocab_size"], config["intermediate_size"] // 2

    def normal(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return (mean + std * torch.randn(*shape, generator=gen)).to(dtype)

    sd = {"transformer.wte.weight": normal(V, H, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = normal(H, std=0.2, mean=1.0)
        sd[p + "attn.c_attn.weight"] = normal(3 * H, H, std=0.15)  # large enough for peaky attention
        sd[p + "attn.c_attn.bias"] = normal(3 * H, std=0.5)
        sd[p + "attn.c_proj.weight"] = normal(H, H, std=0.1)
        sd[p + "ln_2.weight"] = normal(H, std=0.2, mean=1.0)
        sd[p + "mlp.w1.weight"] = normal(F, H, std=0.1)
        sd[p + "mlp.w2.weight"] = normal(F, H, std=0.1)
        sd[p + "mlp.c_proj.weight"] = normal(H, F, std=0.1)
        if not config["no_bias"]:
            sd[p + "attn.c_proj.bias"] = normal(H, std=0.1)
            sd[p + "mlp.w1.bias"] = normal(F, std=0.1)
            sd[p + "mlp.w2.bias"] = normal(F, std=0.1)
            sd[p + "mlp.c_proj.bias"] = normal(H, std=0.1)
    sd["transformer.ln_f.weight"] = normal(H, std=0.2, mean=1.0)
    sd["lm_head.weight"] = normal(V, H, std=0.1)
    return sd


def qwen2_model(sd: dict, config: dict, rope_theta: float | None = None) -> Qwen2ForCausalLM:
    """transformers Qwen2 (eager attention) holding the converted weights, loaded strictly."""
    hf = qwen2_config_dict(config)
    if rope_theta is not None:
        hf["rope_theta"] = rope_theta
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    model = Qwen2ForCausalLM(Qwen2Config(**hf, attn_implementation="eager"))
    model.load_state_dict(to_qwen2_state_dict(sd, config), strict=True)
    return model.eval()


@torch.no_grad()
def qwen2_logits(model: Qwen2ForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def random_ids(batch: int, length: int, seed: int, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.tensor([[0] * (total - n) + [1] * n for n in lengths])


@pytest.fixture(scope="module")
def config() -> dict:
    return tiny_config()


@pytest.fixture(scope="module")
def checkpoint(config) -> dict:
    return random_checkpoint(config)


# ------------------------------------------------------------------------------------------------
# Pure helpers on the spec's verified values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "alpha"),
    [(1, 1), (8192, 1), (8193, 3), (16384, 3), (16385, 7), (32768, 7), (32769, 15), (65537, 31)],
)
def test_ntk_alpha_verified_values(length, alpha):
    assert ntk_alpha(length, 8192) == alpha


def test_logn_factor_values():
    assert logn_factor(0, 8192) == 1.0
    assert logn_factor(8191, 8192) == 1.0  # p + 1 == Ls: not scaled
    assert logn_factor(8192, 8192) == pytest.approx(math.log(8193) / math.log(8192))
    assert logn_factor(16383, 8192) == pytest.approx(14 / 13)  # log(2**14) / log(2**13)


# ------------------------------------------------------------------------------------------------
# Parity with transformers Qwen2 inside seq_length
# ------------------------------------------------------------------------------------------------


def test_naive_forward_matches_qwen2_all_lengths(config, checkpoint):
    model = qwen2_model(checkpoint, config)
    worst = 0.0
    for length in range(1, config["seq_length"] + 1):
        ids = random_ids(2, length, seed=length)
        ours = naive_forward(checkpoint, config, ids)
        assert ours.shape == (2, length, config["vocab_size"])
        assert ours.dtype == torch.float32
        worst = max(worst, max_diff(ours, qwen2_logits(model, ids)))
    assert worst <= TOL


def test_naive_forward_matches_qwen2_left_padding(config, checkpoint):
    model = qwen2_model(checkpoint, config)
    T = config["seq_length"]
    ids = random_ids(3, T, seed=1)
    mask = left_padding_mask([T, 11, 3], T)
    ours = naive_forward(checkpoint, config, ids, mask)
    theirs = qwen2_logits(model, ids, mask)
    real = mask.bool()  # padded query rows hold garbage in both
    assert torch.isfinite(ours).all()
    assert max_diff(ours[real], theirs[real]) <= TOL


def test_naive_forward_padding_matches_unpadded_rows(config, checkpoint):
    # RoPE is relative, so inside seq_length left padding must not change the real tokens' logits.
    T = config["seq_length"]
    ids = random_ids(2, T, seed=2)
    mask = left_padding_mask([T, 9], T)
    batched = naive_forward(checkpoint, config, ids, mask)
    alone = naive_forward(checkpoint, config, ids[1:, T - 9 :])
    assert max_diff(batched[1, T - 9 :], alone[0]) <= TOL


# ------------------------------------------------------------------------------------------------
# Long context: dynamic NTK (and LogN) past seq_length
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "alpha"), [(17, 3), (24, 3), (32, 3), (33, 7), (64, 7)])
def test_naive_ntk_matches_qwen2_with_scaled_base(checkpoint, length, alpha):
    config = tiny_config(use_logn_attn=False)
    d = config["kv_channels"]
    model = qwen2_model(checkpoint, config, rope_theta=config["rotary_emb_base"] * alpha ** (d / (d - 2)))
    ids = random_ids(1, length, seed=length)
    assert max_diff(naive_forward(checkpoint, config, ids), qwen2_logits(model, ids)) <= TOL


def test_naive_ntk_alpha_is_per_row_with_mask(checkpoint):
    config = tiny_config(use_logn_attn=False)
    d, base, T = config["kv_channels"], config["rotary_emb_base"], 40
    ids = random_ids(3, T, seed=3)
    lengths = [40, 30, 10]  # non-pad counts -> alphas 7, 3, 1 (Ls = 16)
    mask = left_padding_mask(lengths, T)
    ours = naive_forward(checkpoint, config, ids, mask)
    for row, alpha in enumerate([7, 3, 1]):
        model = qwen2_model(checkpoint, config, rope_theta=base * alpha ** (d / (d - 2)))
        theirs = qwen2_logits(model, ids[row : row + 1], mask[row : row + 1])
        real = mask[row].bool()
        assert max_diff(ours[row, real], theirs[0, real]) <= TOL
    # Without a mask, one alpha from the padded length T = 40 (alpha 7) applies to every row.
    unmasked = naive_forward(checkpoint, config, ids)
    model = qwen2_model(checkpoint, config, rope_theta=base * 7 ** (d / (d - 2)))
    assert max_diff(unmasked, qwen2_logits(model, ids)) <= TOL


def test_naive_logn_and_ntk_match_patched_qwen2(checkpoint, monkeypatch):
    config = tiny_config()  # both features on
    Ls, d, T = config["seq_length"], config["kv_channels"], 40
    factors = torch.tensor([max(1.0, math.log(p + 1) / math.log(Ls)) for p in range(T)])
    original = modeling_qwen2.apply_rotary_pos_emb

    def rope_then_logn(q, k, cos, sin, unsqueeze_dim=1):
        q, k = original(q, k, cos, sin, unsqueeze_dim)
        return q * factors[: q.shape[2], None], k  # q is [B, n, T, D]

    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", rope_then_logn)
    model = qwen2_model(checkpoint, config, rope_theta=config["rotary_emb_base"] * 7 ** (d / (d - 2)))
    ids = random_ids(2, T, seed=4)
    ours = naive_forward(checkpoint, config, ids)
    assert max_diff(ours, qwen2_logits(model, ids)) <= TOL
    # LogN really changed something: turning it off moves the logits.
    assert max_diff(ours, naive_forward(checkpoint, tiny_config(use_logn_attn=False), ids)) > 1e-2


def test_naive_features_off_past_seq_length_match_plain_qwen2(checkpoint):
    config = tiny_config(use_logn_attn=False, use_dynamic_ntk=False)
    ids = random_ids(1, 40, seed=5)
    model = qwen2_model(checkpoint, config)
    assert max_diff(naive_forward(checkpoint, config, ids), qwen2_logits(model, ids)) <= TOL


# ------------------------------------------------------------------------------------------------
# Things Qwen2 cannot express: partial rotary, MLP / c_proj biases
# ------------------------------------------------------------------------------------------------


def test_naive_partial_rotary_matches_patched_qwen2(checkpoint, monkeypatch):
    config = tiny_config(rotary_pct=0.5)
    d_rot, base = 8, config["rotary_emb_base"]
    original = modeling_qwen2.apply_rotary_pos_emb

    def rope_first_dims(q, k, cos, sin, unsqueeze_dim=1):
        # cos/sin are d_rot wide (see inv_freq below); rotate only the first d_rot dims of each head.
        q_rot, k_rot = original(q[..., :d_rot], k[..., :d_rot], cos, sin, unsqueeze_dim)
        return torch.cat([q_rot, q[..., d_rot:]], -1), torch.cat([k_rot, k[..., d_rot:]], -1)

    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", rope_first_dims)
    model = qwen2_model(checkpoint, tiny_config())
    model.model.rotary_emb.inv_freq = 1.0 / base ** (torch.arange(0, d_rot, 2, dtype=torch.float32) / d_rot)
    ids = random_ids(2, 16, seed=6)
    ours = naive_forward(checkpoint, config, ids)
    assert max_diff(ours, qwen2_logits(model, ids)) <= TOL
    assert max_diff(ours, naive_forward(checkpoint, tiny_config(), ids)) > 1e-2


def test_naive_biases_match_qwen2_with_biased_linears():
    config = tiny_config(no_bias=False)
    sd = random_checkpoint(config, seed=7)
    biases = {k: v for k, v in sd.items() if k.endswith(".bias") and "c_attn" not in k}
    assert len(biases) == 4 * config["num_hidden_layers"]
    no_bias_config = tiny_config()
    model = qwen2_model({k: v for k, v in sd.items() if k not in biases}, no_bias_config)
    for i, layer in enumerate(model.model.layers):
        p = f"transformer.h.{i}."
        for module, name in [
            (layer.self_attn.o_proj, "attn.c_proj"),
            (layer.mlp.gate_proj, "mlp.w2"),
            (layer.mlp.up_proj, "mlp.w1"),
            (layer.mlp.down_proj, "mlp.c_proj"),
        ]:
            module.bias = torch.nn.Parameter(biases[p + name + ".bias"].clone())
    ids = random_ids(2, 16, seed=8)
    ours = naive_forward(sd, config, ids)
    assert max_diff(ours, qwen2_logits(model, ids)) <= TOL
    assert max_diff(ours, naive_forward(sd, no_bias_config, ids)) > 1e-2  # ignoring them is visible


# ------------------------------------------------------------------------------------------------
# MLP branch order and converter details
# ------------------------------------------------------------------------------------------------


def test_naive_w2_is_the_gate(config, checkpoint):
    swapped = dict(checkpoint)
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}.mlp."
        swapped[p + "w1.weight"], swapped[p + "w2.weight"] = (
            checkpoint[p + "w2.weight"],
            checkpoint[p + "w1.weight"],
        )
    ids = random_ids(1, 8, seed=9)
    assert max_diff(naive_forward(checkpoint, config, ids), naive_forward(swapped, config, ids)) > 1e-2
    converted = to_qwen2_state_dict(checkpoint, config)
    assert converted["model.layers.0.mlp.gate_proj.weight"] is checkpoint["transformer.h.0.mlp.w2.weight"]
    assert converted["model.layers.0.mlp.up_proj.weight"] is checkpoint["transformer.h.0.mlp.w1.weight"]


def test_qwen2_config_dict_fields(config):
    hf = qwen2_config_dict(config)
    assert hf["intermediate_size"] == 128
    assert hf["head_dim"] == 16 and hf["num_key_value_heads"] == 4
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert hf["max_position_embeddings"] == 32
    assert Qwen2Config(**hf).rope_parameters["rope_theta"] == 10000.0


@pytest.mark.parametrize("overrides", [{"rotary_pct": 0.5}, {"no_bias": False}, {"kv_channels": 32}])
def test_qwen2_config_dict_rejects_inexpressible(overrides):
    with pytest.raises(ValueError):
        qwen2_config_dict(tiny_config(**overrides))


def test_to_qwen2_state_dict_key_errors(config, checkpoint):
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.qweight"):
        to_qwen2_state_dict({**checkpoint, "transformer.h.0.attn.c_attn.qweight": torch.zeros(1)}, config)
    partial = {k: v for k, v in checkpoint.items() if k != "transformer.h.1.ln_2.weight"}
    with pytest.raises(ValueError, match="model.layers.1.post_attention_layernorm.weight"):
        to_qwen2_state_dict(partial, config)
    ignored = {**checkpoint, "transformer.h.0.attn.rotary_emb.inv_freq": torch.ones(8)}
    assert to_qwen2_state_dict(ignored, config).keys() == to_qwen2_state_dict(checkpoint, config).keys()


# ------------------------------------------------------------------------------------------------
# convert_to_qwen2 on disk
# ------------------------------------------------------------------------------------------------


def write_qwen_checkpoint(folder: Path, sd: dict, config: dict, shards: int) -> None:
    """shards: 1 (model.safetensors), more (an index and its shards) or 0 (the early pytorch_model.bin)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"chat_format": "raw", "max_window_size": 6144}))
    if shards == 0:
        torch.save(sd, folder / "pytorch_model.bin")
        return
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"))
        return
    names = list(sd)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k * len(names) // shards : (k + 1) * len(names) // shards]
        save_file({n: sd[n] for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shards", [1, 2, 0])
def test_convert_to_qwen2_round_trip(tmp_path, monkeypatch, config, checkpoint, shards):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, dst = tmp_path / "qwen", tmp_path / "qwen2"
    write_qwen_checkpoint(src, checkpoint, config, shards)
    assert convert_to_qwen2(src, dst) == dst
    assert (dst / "generation_config.json").exists()
    model = Qwen2ForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    assert model.dtype == torch.float32
    ids = random_ids(2, 12, seed=10)
    assert max_diff(naive_forward(checkpoint, config, ids), qwen2_logits(model, ids)) <= TOL


def test_convert_names_a_shard_its_index_lists_but_the_folder_lacks(tmp_path, config, checkpoint):
    """convert finds a checkpoint's files as load_model does, with the same error for a missing shard."""
    write_qwen_checkpoint(tmp_path / "qwen", checkpoint, config, shards=2)
    (tmp_path / "qwen" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-00002.safetensors listed in"):
        convert_to_qwen2(tmp_path / "qwen", tmp_path / "qwen2")
    assert not (tmp_path / "qwen2").exists()


def test_convert_to_qwen2_keeps_bf16(tmp_path, config):
    sd = {k: v.to(torch.bfloat16) for k, v in random_checkpoint(config, seed=11).items()}
    write_qwen_checkpoint(tmp_path / "qwen", sd, config, shards=1)
    dst = convert_to_qwen2(tmp_path / "qwen", tmp_path / "qwen2")
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    model = Qwen2ForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    assert model.dtype == torch.bfloat16
    ids = random_ids(1, 8, seed=12)
    diff = max_diff(naive_forward(sd, config, ids).float(), qwen2_logits(model, ids).float())
    assert diff <= 0.1  # bf16 rounding only; a layout bug would be O(1)
