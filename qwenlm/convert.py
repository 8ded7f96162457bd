"""Convert a Qwen v1 checkpoint into the layout of transformers' ``Qwen2ForCausalLM``.

Qwen v1 and Qwen2 share the block structure (pre-norm RMSNorm, RoPE rotate-half, SwiGLU MLP, a bias
on the QKV projection only), so a v1 checkpoint maps onto Qwen2 tensor by tensor: the fused
``c_attn`` is split into q/k/v, and the MLP is renamed (``w2`` is the gate, ``w1`` the up branch).
Tests use this to compare against an independent implementation, and benchmarks to run the same
weights through transformers.

Qwen2 has no dynamic NTK and no LogN attention, so the converted model only reproduces Qwen v1 for
sequences of at most ``seq_length`` tokens (where both features are inactive). It also cannot
express partial rotary (``rotary_pct < 1``) or biases on ``c_proj``/``w1``/``w2`` (``no_bias`` false);
those configs are rejected.

    python -c "from qwenlm.convert import convert_to_qwen2; convert_to_qwen2('Qwen-1_8B', 'qwen2-1_8b')"
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .files import read_json_object, save_safetensors, write_json_atomic
from .model.loading import find_checkpoint_files, read_bin_state_dict

__all__ = ["qwen2_config_dict", "to_qwen2_state_dict", "convert_to_qwen2"]

# Per-layer renames that need no reshaping (the suffix after "transformer.h.{i}.").
_LAYER_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",  # w2 is the gate: SiLU is applied to its output
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Non-persistent buffers that some old checkpoints still carry; the reference loader ignores them.
_IGNORED_SUFFIXES = ("attn.rotary_emb.inv_freq", "attn.masked_bias")
_LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)")


def qwen2_config_dict(qwen_config: dict) -> dict:
    """Build a transformers ``Qwen2Config`` dict from a Qwen v1 ``config.json`` dict.

    Args:
        qwen_config: the raw Qwen v1 ``config.json`` contents.

    Returns:
        A dict usable as ``Qwen2Config(**d)`` or written as a Qwen2 ``config.json``.

    Raises:
        ValueError: for configs Qwen2 cannot express (partial rotary, biases outside ``c_attn``,
            ``kv_channels * num_attention_heads != hidden_size``).
    """
    if qwen_config.get("rotary_pct", 1.0) != 1:
        raise ValueError(f"rotary_pct={qwen_config['rotary_pct']}: Qwen2 cannot express partial rotary")
    if not qwen_config.get("no_bias", True):
        raise ValueError("no_bias=false: Qwen2 has no bias on o_proj / gate_proj / up_proj / down_proj")
    hidden, heads = qwen_config["hidden_size"], qwen_config["num_attention_heads"]
    head_dim = qwen_config.get("kv_channels", hidden // heads)
    if head_dim * heads != hidden:
        raise ValueError(f"kv_channels={head_dim} * num_attention_heads={heads} != hidden_size={hidden}")
    rope_theta = float(qwen_config.get("rotary_emb_base", 10000))
    seq_length = qwen_config["seq_length"]
    return {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": qwen_config["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": qwen_config["intermediate_size"] // 2,  # v1 stores twice the FFN width
        "num_hidden_layers": qwen_config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": qwen_config.get("layer_norm_epsilon", 1e-6),
        "rope_theta": rope_theta,  # transformers 4 reads this key
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},  # transformers 5
        "max_position_embeddings": max(seq_length, qwen_config.get("max_position_embeddings", seq_length)),
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
    }


def _split_c_attn(tensor: torch.Tensor, hidden_size: int, name: str) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] != 3 * hidden_size:
        raise ValueError(f"{name}: expected {3 * hidden_size} rows, got shape {tuple(tensor.shape)}")
    # Rows [0:H) are Q, [H:2H) K, [2H:3H) V; clone so every output owns its storage (safetensors).
    return tuple(part.clone() for part in torch.split(tensor, hidden_size, dim=0))


def to_qwen2_state_dict(state_dict: dict[str, torch.Tensor], qwen_config: dict) -> dict[str, torch.Tensor]:
    """Rename (and split) Qwen v1 checkpoint tensors into Qwen2 names.

    Args:
        state_dict: Qwen v1 tensors (``transformer.*`` and ``lm_head.weight``).
        qwen_config: the Qwen v1 ``config.json`` dict (for hidden_size and the layer count).

    Returns:
        A new dict with Qwen2 names; the input is left untouched.

    Raises:
        ValueError: on unknown keys (GPTQ tensors, biases Qwen2 cannot hold, ...) or missing keys.
    """
    hidden = qwen_config["hidden_size"]
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, tensor in state_dict.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = tensor
            continue
        match = _LAYER_KEY.fullmatch(name)
        if match is None:
            unknown.append(name)
            continue
        layer, suffix = match.groups()
        dst = f"model.layers.{layer}."
        if suffix in _LAYER_RENAMES:
            out[dst + _LAYER_RENAMES[suffix]] = tensor
        elif suffix in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = suffix.rsplit(".", 1)[1]
            q, k, v = _split_c_attn(tensor, hidden, name)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"keys with no Qwen2 equivalent: {sorted(unknown)}")

    expected = set(_TOP_RENAMES.values())
    for i in range(qwen_config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        expected.update(prefix + name for name in _LAYER_RENAMES.values())
        expected.update(f"{prefix}self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias"))
    missing = sorted(expected - out.keys())
    if missing:
        raise ValueError(f"checkpoint is missing tensors for: {missing}")
    return out


def _read_qwen_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, its files found as load_model finds them (one file or shards with an index,
    safetensors or the early pytorch_model.bin)."""
    found = find_checkpoint_files(src)
    tensors: dict[str, torch.Tensor] = {}
    for file in found.files:
        if found.format == "safetensors":
            tensors.update(load_file(str(file)))
        else:
            tensors.update(read_bin_state_dict(file))
    return tensors


def convert_to_qwen2(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Write a transformers-loadable Qwen2 folder from a Qwen v1 safetensors checkpoint folder.

    Args:
        src_dir: folder with ``config.json`` and ``model.safetensors`` or sharded
            ``model-*.safetensors`` + ``model.safetensors.index.json`` (or the early ``pytorch_model.bin``).
        dst_dir: output folder (created); receives ``config.json``, ``model.safetensors`` (same
            dtype as the source) and a copy of ``generation_config.json`` when the source has one.

    Returns:
        The output folder.

    Raises:
        ValueError: if the config or tensors cannot be expressed in Qwen2 (see the module docstring).
        FileNotFoundError: if ``src_dir`` holds no weights (or an index names a missing shard).
    """
    src, dst = Path(src_dir), Path(dst_dir)
    qwen_config = read_json_object(src / "config.json", "model config")
    config = qwen2_config_dict(qwen_config)
    tensors = to_qwen2_state_dict(_read_qwen_tensors(src), qwen_config)
    dtype = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    config["dtype"] = dtype  # transformers 5 name
    config["torch_dtype"] = dtype  # transformers 4 name

    dst.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dst / "config.json", config)
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    save_safetensors(tensors, dst / "model.safetensors")
    if (src / "generation_config.json").exists():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    return dst
