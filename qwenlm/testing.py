"""Random-weight checkpoints in the exact Hugging Face Qwen layout, for tests, demos and benchmarks.

They hold the real `qwen.tiktoken`, so token ids are the real ones; only the weights are random.

    make_random_checkpoint("/tmp/tiny")                             # 2-layer model, ~40 MB
    make_random_checkpoint("/tmp/q18", preset="1.8b", chat=False)    # Qwen-1.8B shape, ~3.7 GB
    python -m qwenlm.testing /tmp/tiny --preset tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .assets import qwen_tiktoken_path
from .files import save_safetensors
from .model.config import QwenConfig
from .model.qwen import QWenLMHeadModel

# Shapes of the released models (spec 1.2) plus a tiny one for tests. seq_length of "tiny" is small
# so that tests reach the long-context paths (dynamic NTK, LogN) with short prompts.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                 intermediate_size=256, seq_length=256, max_position_embeddings=256),
    "1.8b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, kv_channels=128,
                 intermediate_size=11008, seq_length=8192, max_position_embeddings=8192),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, kv_channels=128,
               intermediate_size=22016, seq_length=8192, max_position_embeddings=32768),
    "14b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, kv_channels=128,
                intermediate_size=27392, seq_length=2048, max_position_embeddings=8192, vocab_size=152064),
    "72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, kv_channels=128,
                intermediate_size=49152, seq_length=8192, max_position_embeddings=8192, vocab_size=152064,
                rotary_emb_base=1000000.0, use_dynamic_ntk=False, use_logn_attn=False),
}  # fmt: skip

CHAT_GENERATION_CONFIG = {
    "chat_format": "chatml", "do_sample": True, "eos_token_id": 151643, "max_new_tokens": 512,
    "max_window_size": 6144, "pad_token_id": 151643, "repetition_penalty": 1.1, "top_k": 0, "top_p": 0.8,
}  # fmt: skip
BASE_GENERATION_CONFIG = {
    "chat_format": "raw", "do_sample": True, "eos_token_id": 151643, "max_new_tokens": 512,
    "pad_token_id": 151643, "stop_words_ids": [[151643]], "top_k": 0, "top_p": 0.8,
}  # fmt: skip
TOKENIZER_CONFIG = {
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    "clean_up_tokenization_spaces": True, "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
}  # fmt: skip


def preset_config(preset: str = "tiny", **overrides: Any) -> QwenConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return QwenConfig(**{**PRESETS[preset], **overrides})


def _tensor_seed(seed: int, name: str) -> int:
    """A seed per tensor, so each tensor is the same whatever the shard layout or write order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def random_tensor(name: str, shape: torch.Size, config: QwenConfig, seed: int) -> torch.Tensor:
    """Init of spec 2.13, with norm weights and biases jittered so that a test notices if one is lost."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    std = config.initializer_range
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    if name.endswith("c_proj.weight"):
        std = std / (2 * config.num_hidden_layers) ** 0.5
    return std * torch.randn(shape, generator=gen)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    try:
        for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if text.endswith(unit):
                return int(float(text[: -len(unit)]) * factor)
        return int(text)
    except ValueError:
        raise ValueError(f"size {size!r} is not a number of bytes or a size like 500MB, 2GB or 1GiB") from None


def make_random_checkpoint(
    path: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    *,
    chat: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "2GB",
    weights_format: str = "safetensors",
    **config_overrides: Any,
) -> Path:
    """Write a seeded random checkpoint in the Hugging Face Qwen layout and return its folder.

    Args:
        path: output folder (created; an earlier checkpoint's files there are replaced, stale shards removed).
        preset: "tiny", "1.8b", "7b", "14b" or "72b" (shapes of the released models).
        seed: weights are a pure function of (seed, tensor name).
        chat: write a -Chat generation_config.json (chatml) rather than a base one (raw).
        dtype: stored dtype (released checkpoints are bf16).
        max_shard_size: above this, weights are split into shards with model.safetensors.index.json.
        weights_format: "safetensors" or "bin" (the early single pytorch_model.bin).
        config_overrides: any config.json field, e.g. seq_length=16, rotary_pct=0.5.
    """
    folder = Path(path)
    config = preset_config(preset, **config_overrides)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors*"), *folder.glob("pytorch_model*.bin*")]:
        stale.unlink()  # an earlier checkpoint's weights (another shard layout) must not outlive it
    config.save_pretrained(folder)
    generation = CHAT_GENERATION_CONFIG if chat else BASE_GENERATION_CONFIG
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text("{}\n")
    shutil.copyfile(qwen_tiktoken_path(), folder / "qwen.tiktoken")

    with torch.device("meta"):
        shapes = {name: t.shape for name, t in QWenLMHeadModel(config).state_dict().items()}
    tensors = ((name, random_tensor(name, shape, config, seed).to(dtype)) for name, shape in shapes.items())
    if weights_format == "bin":
        torch.save(dict(tensors), folder / "pytorch_model.bin")
    elif weights_format == "safetensors":
        _write_safetensors(folder, tensors, _parse_size(max_shard_size))
    else:
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    return folder


def _write_safetensors(folder: Path, tensors, max_shard_size: int) -> None:
    """Write shards of at most `max_shard_size` bytes (a bigger single tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    temp_names = []
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            temp_names.append(_flush(folder, shards[-1], len(temp_names)))
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    temp_names.append(_flush(folder, shards[-1], len(temp_names)))
    if len(temp_names) == 1:
        temp_names[0][0].rename(folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (temp, names, nbytes) in enumerate(temp_names, start=1):
        final = f"model-{i:05d}-of-{len(temp_names):05d}.safetensors"
        temp.rename(folder / final)
        weight_map.update({n: final for n in names})
        total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _flush(folder: Path, shard: dict[str, torch.Tensor], i: int) -> tuple[Path, list[str], int]:
    temp = folder / f".shard-{i}.tmp"
    save_safetensors(shard, temp)
    nbytes = sum(t.numel() * t.element_size() for t in shard.values())
    names = list(shard)
    shard.clear()  # free the memory of the written shard
    return temp, names, nbytes


DEMO_VERSION = 1  # bump when the demo checkpoint's recipe changes, so old copies are rebuilt


def demo_checkpoint(progress: bool = True) -> Path:
    """The tiny random-weight demo checkpoint in the user cache, made on first use.

    Used by the CLI when no `--model` is given: the pipeline is real, the replies are noise.
    """
    from .assets import cache_dir

    folder = cache_dir() / f"demo-tiny-v{DEMO_VERSION}"
    if not (folder / "config.json").is_file():
        if progress:
            print(f"making the demo checkpoint (tiny, random weights) in {folder} ...", file=sys.stderr, flush=True)
        partial = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_random_checkpoint(partial, preset="tiny", seed=0, chat=True)
        partial.replace(folder) if not folder.exists() else shutil.rmtree(partial)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m qwenlm.testing` and `qwenlm make-checkpoint`."""
    parser.add_argument("path", help="output folder")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", action="store_true", help="base-model generation config (raw format)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-shard-size", default="2GB", help="split weights into shards above this (e.g. 500MB)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a config.json override (repeatable); VALUE is JSON (16, true) or a string")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace the checkpoint already in the folder")


def _overrides(items: list[str]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(QwenConfig)} - {"extra"}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: expected KEY=VALUE")
        if key not in fields:
            raise ValueError(f"--set {item}: {key!r} is not a config.json field; known: {', '.join(sorted(fields))}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value  # a plain string; the config says if it is the wrong type
    return out


def run(args: argparse.Namespace) -> Path:
    """Write the checkpoint `add_arguments`' options describe.

    Raises:
        ValueError: a bad --set, size or config value, named.
    """
    folder = Path(args.path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; the checkpoint is a folder")
    if any(parent.exists() and not parent.is_dir() for parent in folder.parents):
        raise ValueError(f"{folder}: a part of this path is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
        raise ValueError(f"{folder} is not empty (a model there would be replaced); pass --overwrite to replace "
                         "it, or choose a new folder")  # fmt: skip
    overrides = _overrides(args.set or [])
    size = _parse_size(args.max_shard_size)
    # Written whole beside the target, then swapped in: an interrupted run leaves the old folder as it was.
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    try:
        make_random_checkpoint(partial, args.preset, args.seed, chat=not args.base, dtype=getattr(torch, args.dtype),
                               max_shard_size=size, **overrides)  # fmt: skip
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            folder.rename(old)  # --overwrite: the whole previous folder goes (no stale adapter or GPTQ files)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    changed = f" with {', '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else ""
    print(f"wrote a random {args.preset} checkpoint{changed} to {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwenlm.testing", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
