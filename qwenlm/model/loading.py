"""Loading a Hugging Face-layout Qwen checkpoint: files, tensor checks, dtype and device placement.

The model is built on the meta device, every tensor's name and shape is checked against the
safetensors headers before any data is read, then each shard is memory-mapped and its tensors
assigned straight into the model, so peak memory stays near one copy of the weights:

    model = load_model("Qwen-1_8B-Chat", device_map="cpu", dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import huge_pages
from .checkpoint import CheckpointError, CheckpointFiles
from .config import GenerationConfig, QwenConfig
from .qwen import QWenLMHeadModel

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Buffers some reference revisions saved; the reference loader ignores them too (spec 1.3).
_IGNORED_TENSORS = re.compile(r".*\.attn\.(rotary_emb\.inv_freq|masked_bias|bias)$|.*registered_causal_mask$")

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Which files hold which tensors
# --------------------------------------------------------------------------------------------------


def find_checkpoint_files(folder: str | os.PathLike) -> CheckpointFiles:
    """Locate the weights: single or sharded safetensors, else the early `pytorch_model.bin` (single or sharded)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the checkpoint folder (config.json and weights)")
    # transformers' order: the single file before an index, safetensors before .bin
    if (folder / SAFETENSORS_SINGLE).is_file():
        file = folder / SAFETENSORS_SINGLE
        return CheckpointFiles(folder, {name: file for name in _safetensors_names(file)}, "safetensors")
    if (folder / SAFETENSORS_INDEX).is_file():
        return _from_index(folder, folder / SAFETENSORS_INDEX, "safetensors")
    if (folder / BIN_SINGLE).is_file():
        file = folder / BIN_SINGLE
        return CheckpointFiles(folder, {name: file for name in read_bin_state_dict(file)}, "bin")
    if (folder / BIN_INDEX).is_file():
        return _from_index(folder, folder / BIN_INDEX, "bin")
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFETENSORS_INDEX} (+ shards), {SAFETENSORS_SINGLE}, "
        f"{BIN_INDEX} or {BIN_SINGLE}"
    )


def _from_index(folder: Path, index_file: Path, fmt: str) -> CheckpointFiles:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_file} is not a valid index (needs a 'weight_map'): {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to shard file names")
    tensors = {name: folder / shard for name, shard in weight_map.items()}
    for shard in sorted(set(tensors.values())):
        if not shard.is_file():
            names = [n for n, f in tensors.items() if f == shard]
            raise FileNotFoundError(
                f"shard {shard.name} listed in {index_file.name} is missing from {folder} "
                f"(it holds {len(names)} tensors, e.g. {names[0]})"
            )
    return CheckpointFiles(folder, tensors, fmt)


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err


def _safetensors_names(file: Path) -> list[str]:
    with _open_safetensors(file) as f:
        return list(f.keys())


def read_bin_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """An early pytorch_model.bin's tensors, memory-mapped; a damaged file is a CheckpointError naming it."""
    try:
        return torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(f"{file} is not a readable PyTorch checkpoint: {err}") from err


# --------------------------------------------------------------------------------------------------
# Checks before any data is read
# --------------------------------------------------------------------------------------------------
def check_tensor_names(expected: dict[str, torch.Size], ckpt: CheckpointFiles) -> None:
    """Strict name check: every model tensor present, nothing unknown (bar ignorable buffers)."""
    present = {n for n in ckpt.tensors if not _IGNORED_TENSORS.match(n) or n in expected}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    problems = []
    if missing:
        problems.append(
            f"missing tensors ({len(missing)}): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    if unexpected:
        where = ", ".join(f"{n} (in {ckpt.tensors[n].name})" for n in unexpected[:8])
        problems.append(f"unexpected tensors ({len(unexpected)}): {where}" + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(f"checkpoint {ckpt.folder} does not match the config: " + "; ".join(problems))


def check_shape(name: str, shape: tuple[int, ...], expected: torch.Size, file: Path) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {name} in {file.name} has shape {list(shape)}, but config.json implies {list(expected)}"
        )


# --------------------------------------------------------------------------------------------------
# dtype and device
# --------------------------------------------------------------------------------------------------
def resolve_dtype(
    config: QwenConfig,
    device: torch.device,
    torch_dtype: torch.dtype | str | None = None,
    bf16: bool = False,
    fp16: bool = False,
    fp32: bool = False,
) -> torch.dtype:
    """Pick the compute dtype: explicit argument > config flags > auto (spec 2.1).

    Auto is bf16 on a CUDA device that supports it, fp16 on older CUDA, fp32 on CPU.
    """
    flags = [name for name, on in (("bf16", bf16), ("fp16", fp16), ("fp32", fp32)) if on]
    if len(flags) > 1:
        raise ValueError(f"at most one of bf16/fp16/fp32 may be set, got {flags}")
    if torch_dtype is not None and torch_dtype != "auto":
        if isinstance(torch_dtype, torch.dtype):
            if not torch_dtype.is_floating_point:
                raise ValueError(f"torch_dtype must be a float dtype (bfloat16, float16, float32), got {torch_dtype}; "
                                 "for integer weights use quantization='int8' / 'int4'")  # fmt: skip
            return torch_dtype
        if torch_dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {torch_dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[torch_dtype]
    for name in flags or [n for n in ("bf16", "fp16", "fp32") if getattr(config, n)]:
        return _DTYPES[name]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if torch.cuda.get_device_capability(device)[0] >= 7 else torch.float32
    return torch.float32


def plan_device_map(num_layers: int, devices: list[str]) -> dict[str, str]:
    """Spread the model over `devices` in order, evenly, as the seeds' `load_model_on_gpus` did.

    The embedding and the final norm + LM head each count as one unit, like a block; unit k of U
    goes to device floor(k * len(devices) / U).
    """
    if not devices:
        raise ValueError("plan_device_map needs at least one device")
    units = num_layers + 2
    place = [devices[k * len(devices) // units] for k in range(units)]
    plan = {"transformer.wte": place[0], "transformer.ln_f": place[-1], "lm_head": place[-1]}
    plan.update({f"transformer.h.{i}": place[i + 1] for i in range(num_layers)})
    return plan


def resolve_device_map(device_map: str | torch.device | dict | None, config: QwenConfig) -> dict[str, str]:
    """Turn `device_map` ("cpu", "cuda", "cuda:1", "auto", a dict, None) into a prefix -> device map.
    accelerate's "balanced", "balanced_low_0" and "sequential" spread the layers as "auto" does."""
    if isinstance(device_map, dict):
        placed = {k: str(v) if not isinstance(v, int) else f"cuda:{v}" for k, v in device_map.items()}
        for where in set(placed.values()):
            _check_device(where, device_map)
        return placed
    if device_map in ("balanced", "balanced_low_0", "sequential"):
        device_map = "auto"
    if device_map is None or device_map == "auto":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            return {"": "cpu"}
        if gpus == 1 or device_map is None:
            return {"": "cuda:0"}
        return plan_device_map(config.num_hidden_layers, [f"cuda:{i}" for i in range(gpus)])
    device = _check_device(device_map, device_map)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else 0)
    return {"": str(device)}


def _check_device(where: str | torch.device, device_map: Any) -> torch.device:
    """`where` as a device this process can place weights on (cpu, or an existing cuda device)."""
    try:
        device = torch.device(where)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r}: {where!r} is not a device; use 'cpu', 'cuda', 'cuda:N', "
                         "'auto' or a {module prefix: device} dict") from None  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device_map={device_map!r} but CUDA is not available; use device_map='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device_map={device_map!r}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device_map={device_map!r}: weights go on 'cpu' or CUDA devices, not {device.type!r}")
    return device


def device_for(name: str, device_map: dict[str, str]) -> str:
    """The device of tensor `name`: the longest matching module prefix in the map."""
    best, found = -1, None
    for prefix, device in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, found = len(prefix), device
    if found is None:
        raise ValueError(f"device_map does not place tensor {name}")
    return found


# --------------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------------
def iter_shards(
    ckpt: CheckpointFiles,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    keep_dtype: frozenset[str] = frozenset(),
    in_ram: bool = False,
) -> Iterator[tuple[Path, Iterator[tuple[str, torch.Tensor]]]]:
    """Yield (file, tensors) one shard at a time; tensors come mmap-backed (zero copy) where possible.

    When a tensor will be converted to `dtype` anyway, its file is opened for that tensor alone, so
    the source pages are unmapped as soon as the copy exists and peak RSS stays near one copy.
    Integer tensors and the names in `keep_dtype` (read by the quantization loader) keep their stored dtype.
    `in_ram`: every tensor the model keeps is a private copy on huge pages (model/huge_pages.py), never a view of
    the file (see load_model for why); the `keep_dtype` ones are read once and turned into new (quantized)
    tensors, so they are not copied.
    """
    for file in tqdm(ckpt.files, desc="Loading checkpoint shards", unit="shard", disable=not progress):
        names = [n for n, f in ckpt.tensors.items() if f == file]
        if ckpt.format == "bin":
            state = read_bin_state_dict(file)
            kept = (n for n in names if n in state)
            yield file, ((n, _in_ram(state[n], dtype) if in_ram and n not in keep_dtype else state[n]) for n in kept)
        else:
            yield file, _read_safetensors(file, names, dtype, keep_dtype, in_ram)


def _read_safetensors(
    file: Path,
    names: list[str],
    dtype: torch.dtype | None,
    keep_dtype: frozenset[str] = frozenset(),
    in_ram: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    with _open_safetensors(file) as f:
        stored = {n: f.get_slice(n).get_dtype() for n in names}
        converted = [d for n, d in stored.items() if n not in keep_dtype and d in _SAFETENSORS_DTYPES]
        # Tensors that are read once (converted, or quantized) get a mapping of their own, dropped with them;
        # one shared mapping would keep every page read so far resident until the model is freed.
        keep_mapped = (
            not in_ram
            and not keep_dtype.intersection(names)
            and (dtype is None or all(_SAFETENSORS_DTYPES[d] == dtype for d in converted))
        )
        if keep_mapped:
            for name in names:
                yield name, _get_tensor(f, name, file)
            return
    for name in names:
        with _open_safetensors(file) as f:
            tensor = _get_tensor(f, name, file)
        if name in keep_dtype:
            yield name, tensor
        elif in_ram:
            yield name, _in_ram(tensor, dtype)
        elif tensor.is_floating_point() and dtype is not None and tensor.dtype != dtype:
            yield name, tensor.to(dtype)
        else:
            yield name, tensor


def _in_ram(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A private copy on huge pages (see huge_pages), floats converted to `dtype` on the way."""
    to = dtype if tensor.is_floating_point() and dtype is not None else tensor.dtype
    return huge_pages.empty(tensor.shape, to).copy_(tensor)


def _get_tensor(handle, name: str, file: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as err:  # truncated data, a name the index lists but the file lacks
        raise CheckpointError(f"cannot read tensor {name} from {file}: {err}") from err


def read_shapes(ckpt: CheckpointFiles) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (no data read)."""
    shapes = {}
    for file in ckpt.files:
        with _open_safetensors(file) as f:
            present = set(f.keys())
            for name in (n for n, p in ckpt.tensors.items() if p == file):
                if name not in present:
                    raise CheckpointError(f"index lists tensor {name} in {file.name}, but that file lacks it")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


# --------------------------------------------------------------------------------------------------
# The whole load
# --------------------------------------------------------------------------------------------------
def load_model(
    path: str | os.PathLike,
    *,
    device_map: str | torch.device | dict | None = "cpu",
    torch_dtype: torch.dtype | str | None = None,
    bf16: bool = False,
    fp16: bool = False,
    fp32: bool = False,
    attn_implementation: str = "sdpa",
    progress: bool = True,
    model_cls: type[QWenLMHeadModel] = QWenLMHeadModel,
    quantization: str | None = None,
    quantization_group_size: int | None = None,
    quantization_config=None,
    mmap: bool = False,
    **config_overrides,
) -> QWenLMHeadModel:
    """Load a Qwen v1 checkpoint folder into an eval-mode model.

    Args:
        path: folder with config.json and the weights (HF layout).
        device_map: "cpu", "cuda", "cuda:N", "auto" (all visible GPUs), or {module prefix: device}.
        torch_dtype / bf16 / fp16 / fp32: compute dtype; default auto (see `resolve_dtype`). `dtype=` is
            accepted as transformers 5's name for torch_dtype.
        attn_implementation: "sdpa" or "eager".
        quantization: None, "int8" or "int4": quantize a float checkpoint while loading (see
            `qwenlm.quant.loader`). "int8": per-output-channel symmetric int8 for every linear,
            lm_head included, and per-row int8 for the token embedding. "int4": group-wise int4
            (`quantization_group_size`, default 128) for the blocks and the token embedding, with lm_head
            in int6 in the same groups, as llama.cpp's Q4_0 keeps the output layer at Q6_K. A GPTQ
            checkpoint (a `quantization_config` in config.json or a quantize_config.json) needs no
            option: it loads as it is (its embedding and lm_head stay float, as stored).
        quantization_config: a dict or a transformers `BitsAndBytesConfig` (load_in_8bit /
            load_in_4bit, bnb_4bit_quant_type nf4/fp4, bnb_4bit_compute_dtype) to use bitsandbytes
            layers (`pip install "qwenlm[bnb]"`), or a `GPTQConfig` restating a GPTQ checkpoint's.
        mmap: on CPU, leave tensors that need no conversion as views of the memory-mapped files (a fast,
            zero-copy load that only pages weights in as they are used) instead of copying them into
            process memory (the default; see the comment in the body for why).
        config_overrides: config.json fields to change, e.g. use_dynamic_ntk=False.

    A quantized model (GPTQ or on the fly) on CPU defaults to bf16 compute, not the fp16 that GPTQ
    configs ask for (slow on CPU) nor fp32 (which would double the float embedding and lm_head); pass
    torch_dtype=torch.float32 to read a GPTQ checkpoint's fp16 tensors exactly. On CUDA the usual rule
    (`resolve_dtype`: the config's fp16 for GPTQ) applies.

    Raises:
        FileNotFoundError: config.json, the weights or a shard is missing (named).
        CheckpointError: a missing/unexpected/mis-shaped tensor or an unreadable file (named).
    """
    if "dtype" in config_overrides:  # transformers 5 renamed torch_dtype; never a config field
        if torch_dtype is not None:
            raise ValueError("pass either dtype= or torch_dtype=, not both")
        torch_dtype = config_overrides.pop("dtype")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {folder} does not exist; qwenlm loads local Hugging Face-layout folders "
            "(download one first, e.g. `huggingface-cli download Qwen/Qwen-1_8B-Chat --local-dir DIR`)"
        )
    config = QwenConfig.from_pretrained(folder, **config_overrides)
    placement = resolve_device_map(device_map, config)
    with torch.device("meta"):
        model = model_cls(config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    ckpt = find_checkpoint_files(folder)

    quant = None  # which linears become quantized modules, and from which tensors: see qwenlm.quant.loader
    asked = quantization is not None or quantization_config is not None or quantization_group_size is not None
    if asked or _is_quantized(folder, config, ckpt):
        from ..quant.loader import plan_quantization

        quant = plan_quantization(folder, model, ckpt, quantization, quantization_config, quantization_group_size)
    if quant is not None:
        expected = quant.expected_shapes(expected)
        if torch_dtype in (None, "auto") and not (bf16 or fp16 or fp32):
            torch_dtype = quant.default_dtype(torch.device(device_for("lm_head", placement)))
    dtype = resolve_dtype(config, torch.device(device_for("lm_head", placement)), torch_dtype, bf16, fp16, fp32)

    check_tensor_names(expected, ckpt)
    if ckpt.format == "safetensors":
        shapes = read_shapes(ckpt)
        if quant is not None:
            quant.check_header_shapes(shapes, ckpt)
        for name, shape in shapes.items():
            if name in expected:
                check_shape(name, shape, expected[name], ckpt.tensors[name])

    owned = quant.owned_names if quant is not None else frozenset()
    # On CPU the weights are copied into process memory rather than left as views of the mmap'ed files.
    # Decoding streams every weight once per token, and file-backed pages can be dropped by the kernel and
    # read again: on this project's VM (which reclaims idle page cache proactively) bf16 decode of the
    # 1.8B shape ran at 121 ms/step mapped vs 94 ms/step copied, measured interleaved. The copy costs a few
    # seconds of load time and makes the speed independent of the page cache.
    in_ram = not mmap and any(torch.device(d).type == "cpu" for d in placement.values())
    for file, tensors in iter_shards(ckpt, dtype, progress=progress, keep_dtype=owned, in_ram=in_ram):
        state = {}
        for name, tensor in tensors:
            if name not in expected:
                continue  # an ignorable buffer (checked above)
            if name in owned:
                quant.take(model, name, tensor, file, device_for(name, placement), dtype)
                continue
            check_shape(name, tuple(tensor.shape), expected[name], file)
            if not tensor.is_floating_point():
                raise CheckpointError(f"tensor {name} in {file.name} has dtype {tensor.dtype}; expected floats")
            state[name] = tensor.to(device=device_for(name, placement), dtype=dtype)
        model.load_state_dict(state, strict=False, assign=True)
        del state
    if quant is not None:
        quant.finish()
    still_meta = [n for n, p in model.state_dict().items() if p.is_meta]
    if still_meta:  # the name check makes this unreachable unless a file lied about its keys
        raise CheckpointError(f"tensors never loaded from {folder}: {still_meta[:8]}")

    if in_ram and quant is not None:  # float weights were read onto huge pages; the quantized codes join them
        huge_pages.pack(model.get_submodule(name) for name in quant.modules)
    model.set_attn_implementation(attn_implementation)
    model.quantization = quant.description if quant is not None else None
    gen_file = folder / "generation_config.json"
    model.generation_config = GenerationConfig.from_pretrained(gen_file) if gen_file.is_file() else GenerationConfig()
    return model.eval()


def _is_quantized(folder: Path, config: QwenConfig, ckpt: CheckpointFiles) -> bool:
    """A GPTQ config in either file, or GPTQ tensors (then the quantization loader explains what is missing)."""
    has_config = "quantization_config" in config.extra or (folder / "quantize_config.json").is_file()
    return has_config or any(name.endswith(".qweight") for name in ckpt.tensors)
