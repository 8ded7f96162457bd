"""Quantize a float Qwen checkpoint to a GPTQ checkpoint (AutoGPTQ layout, spec 11), block by block.

GPTQ runs the calibration samples through the transformer one block at a time: the inputs of block
0 are captured, then for each block the Hessians of its linears are accumulated with forward hooks,
the linears are quantized in true-sequential order (c_attn -> c_proj -> w1, w2 -> mlp.c_proj, each
stage seeing the already-quantized earlier ones), and the block is run once more, quantized, to
make the next block's inputs. The model is loaded in its stored dtype (bf16 for released checkpoints,
so exactly) and only the block being worked on is upcast to fp32 (and moved to `device`), so peak
memory stays near the float checkpoint plus one block and its activations.

    quantize_checkpoint("Qwen-1_8B-Chat", "Qwen-1_8B-Chat-Int4", bits=4, calibration="chat.jsonl")
    qwenlm quantize --model Qwen-1_8B-Chat --bits 4 --calibration chat.jsonl --output Qwen-1_8B-Chat-Int4
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..files import read_json_object, write_json_atomic
from ..model.blocks import QWenBlock
from ..model.config import QwenConfig
from ..model.loading import find_checkpoint_files, load_model
from ..model.qwen import QWenLMHeadModel
from ..testing import _parse_size, _write_safetensors
from ..tokenizer import QwenTokenizer
from .calibration import Sample, builtin_samples, read_calibration_file, tokenize_samples
from .config import QUANTIZE_CONFIG_FILE, SUPPORTED_BITS, QuantizationConfig
from .formats import gptq_tensors
from .gptq import HessianAccumulator, QuantResult, gptq_quantize, quantize_rtn

QUANTIZED_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# true_sequential: each stage is calibrated on the outputs of the already-quantized stages before it.
SEQUENTIAL_STAGES = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))
COPIED_FILES = ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json")
_STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}

OnQuantized = Callable[[str, QuantResult], None]


@dataclass
class QuantizeSettings:
    """How each linear is quantized (the fields of `quantize_config.json`, plus the method)."""

    bits: int
    group_size: int = 128
    method: Literal["gptq", "rtn"] = "gptq"
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    checkpoint_format: str = "gptq"

    def quantize(self, weight: Tensor, hessian: Tensor | None) -> QuantResult:
        if self.method == "rtn":
            return quantize_rtn(weight, self.bits, self.group_size, self.sym)
        return gptq_quantize(
            weight, hessian, self.bits, self.group_size, sym=self.sym, desc_act=self.desc_act,
            damp_percent=self.damp_percent, static_groups=self.static_groups,
        )  # fmt: skip


@dataclass
class QuantizeReport:
    """What `quantize_checkpoint` did."""

    output_dir: Path
    settings: QuantizeSettings
    num_samples: int  # calibration samples used (0 for rtn)
    num_tokens: int
    seconds: float
    losses: dict[str, float] = field(default_factory=dict)  # GPTQ's 1/2 ||(W - Wq) X||^2 per module


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


# --------------------------------------------------------------------------------------------------
# Checks before any heavy work
# --------------------------------------------------------------------------------------------------
def _check_request(model_path: Path, output_dir: Path, settings: QuantizeSettings) -> QwenConfig:
    if settings.bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 4 or 8 (the GPTQ layouts qwenlm writes), got {settings.bits!r}")
    if settings.method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {settings.method!r}")
    if settings.damp_percent < 0:
        raise ValueError(f"damp_percent must be >= 0, got {settings.damp_percent}")
    if not settings.sym and settings.checkpoint_format == "gptq":
        raise ValueError(
            "asymmetric quantization can give zero points of 0, which the classic 'gptq' checkpoint format "
            "cannot store; use checkpoint_format='gptq_v2' with sym=False"
        )
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path} is not a checkpoint folder (no config.json)")
    existing = read_json_object(model_path / "config.json", "model config").get("quantization_config")
    if existing is not None or (model_path / QUANTIZE_CONFIG_FILE).is_file():
        method = existing.get("quant_method", "gptq") if isinstance(existing, dict) else "gptq"
        raise ValueError(
            f"{model_path} is already quantized ({method}); quantize the float checkpoint it was made from"
        )
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"output folder {output_dir} already exists and is not empty; choose a new folder")
    config = QwenConfig.from_pretrained(model_path)
    _check_shapes(config, settings)
    return config


def _linear_shapes(config: QwenConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each quantized module of a block."""
    h, w, p = config.hidden_size, config.mlp_width, config.num_attention_heads * config.kv_channels
    return {"attn.c_attn": (h, 3 * p), "attn.c_proj": (p, h), "mlp.w1": (h, w), "mlp.w2": (h, w), "mlp.c_proj": (w, h)}


def _check_shapes(config: QwenConfig, settings: QuantizeSettings) -> None:
    pf = 32 // settings.bits
    for name, (k, n) in _linear_shapes(config).items():
        module = f"transformer.h.*.{name}"
        if settings.group_size != -1 and (settings.group_size <= 0 or k % settings.group_size):
            raise ValueError(
                f"group_size {settings.group_size} does not divide in_features={k} of {module}; "
                "use a divisor of it or -1 (one group per row)"
            )
        if k % pf or n % pf:
            raise ValueError(
                f"{module} ({k} -> {n}) cannot be packed: {settings.bits}-bit GPTQ needs multiples of {pf}"
            )


def _select(samples: list[Sample], num_samples: int | None, source: str) -> list[Sample]:
    if num_samples is None:
        return samples
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (or None for all), got {num_samples}")
    if len(samples) < num_samples:
        raise ValueError(
            f"{source} has {len(samples)} samples, fewer than num_samples={num_samples}; "
            f"ask for at most {len(samples)} (or all of them: num_samples=None, --num-samples all)"
        )
    return samples[:num_samples]


def calibration_ids(
    model_path: str | os.PathLike,
    calibration: str | os.PathLike | None,
    num_samples: int | None = 128,
    seq_len: int = 512,
) -> list[list[int]]:
    """Token ids of the first `num_samples` calibration samples (None: all), each cut to `seq_len`.

    `calibration=None` uses the small built-in set (all of it when it has fewer than `num_samples`).

    Raises:
        FileNotFoundError / CalibrationError: the file is missing, unreadable or empty.
        ValueError: the file has fewer samples than `num_samples`.
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (or None for all), got {num_samples}")
    if calibration is None:
        samples = builtin_samples()
        samples = samples[: min(num_samples or len(samples), len(samples))]
    else:
        samples = _select(read_calibration_file(calibration), num_samples, f"calibration file {calibration}")
    rows = tokenize_samples(QwenTokenizer.from_pretrained(model_path), samples, seq_len)
    return [row for row in rows if row]


# --------------------------------------------------------------------------------------------------
# Running blocks on calibration data
# --------------------------------------------------------------------------------------------------
def _block_inputs(model: QWenLMHeadModel, ids: Sequence[list[int]], device: torch.device) -> list[tuple]:
    """(hidden states [1, T, H] fp32, step) entering block 0 for each sample.

    The model's own forward builds the step (RoPE tables, mask) exactly as in inference; a pre-hook on
    block 0 takes its arguments and stops the pass there.
    """
    captured = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args)
        raise _StopForward

    handle = model.transformer.h[0].register_forward_pre_hook(grab)
    try:
        for row in ids:
            try:
                model(torch.tensor([row]), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return [(x.to(device, torch.float32), _step_on(step, device)) for x, step in captured]


def _step_on(step, device: torch.device):
    """A copy of the block-call step with its tensors on `device` (nothing else changes)."""
    values = {f.name: getattr(step, f.name) for f in dataclasses.fields(step)}
    return dataclasses.replace(step, **{k: v.to(device) for k, v in values.items() if isinstance(v, Tensor)})


def _accumulate_hessians(block: QWenBlock, inputs: list[tuple], names: Sequence[str]) -> dict[str, Tensor]:
    """Hessians of the inputs of `names` over every sample; each pass stops once all of them ran."""
    modules = {name: block.get_submodule(name) for name in names}
    device = next(block.parameters()).device
    accumulators = {name: HessianAccumulator(m.in_features, device) for name, m in modules.items()}
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            accumulators[name].add(args[0])
            seen.add(name)
            if len(seen) == len(modules):
                raise _StopForward

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        for x, step in inputs:
            seen.clear()
            try:
                block(x, step)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian for name, acc in accumulators.items()}


def _quantize_block(
    block: QWenBlock, inputs: list[tuple] | None, settings: QuantizeSettings
) -> Iterator[tuple[str, nn.Linear, QuantResult]]:
    """Quantize the block's linears stage by stage; with data, each weight becomes its dequantized self."""
    if inputs is None:  # round-to-nearest: no data needed
        stages: Sequence[Sequence[str]] = [QUANTIZED_MODULES]
    else:
        stages = SEQUENTIAL_STAGES if settings.true_sequential else [QUANTIZED_MODULES]
    for stage in stages:
        hessians = _accumulate_hessians(block, inputs, stage) if inputs is not None else {}
        for name in stage:
            linear = block.get_submodule(name)
            result = settings.quantize(linear.weight.data, hessians.pop(name, None))
            if inputs is not None:  # later stages and the next block's inputs see the quantized weight
                linear.weight.data = result.dequantize(linear.weight.dtype).to(linear.weight.device)
            yield name, linear, result


# --------------------------------------------------------------------------------------------------
# The whole checkpoint
# --------------------------------------------------------------------------------------------------
def _stored_dtype(model_path: Path) -> torch.dtype:
    """The dtype the weights are stored in when it is bf16/fp16 (loading in it is exact), else fp32."""
    ckpt = find_checkpoint_files(model_path)
    if ckpt.format != "safetensors":
        return torch.float32
    with safe_open(str(ckpt.files[0]), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    return _STORED_DTYPES[dtypes.pop()] if len(dtypes) == 1 and next(iter(dtypes)) in _STORED_DTYPES else torch.float32


def quantize_model(
    model: QWenLMHeadModel,
    settings: QuantizeSettings,
    ids: Sequence[list[int]] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_quantized: OnQuantized | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Quantize every block's linears of a loaded float model in place; return their GPTQ tensors.

    Each block is moved to `device` in fp32 while it is worked on, then back to where it was in its
    dtype. The quantized linears' float weights are released (left on the meta device) once their
    block is done; their content is in the returned tensors.

    Args:
        ids: calibration token ids per sample (needed for GPTQ, ignored by RTN).
        on_quantized: called with (module name, QuantResult) for each linear, e.g. to keep them.

    Returns:
        {module name: {"qweight", "qzeros", "scales", "g_idx", "bias"}}.
    """
    device = torch.device(device)
    use_data = settings.method == "gptq"
    if use_data and not ids:
        raise ValueError("GPTQ needs calibration samples (none were given or all were empty)")
    packed: dict[str, dict[str, Tensor]] = {}
    with torch.inference_mode():
        inputs = _block_inputs(model, ids, device) if use_data else None
        blocks = tqdm(model.transformer.h, desc=f"{settings.method.upper()} {settings.bits}-bit", unit="block",
                      disable=not progress)  # fmt: skip
        for i, block in enumerate(blocks):
            home, dtype = block.ln_1.weight.device, block.ln_1.weight.dtype
            block.to(device, torch.float32)
            for local_name, linear, result in _quantize_block(block, inputs, settings):
                name = f"transformer.h.{i}.{local_name}"
                bias = linear.bias.detach().cpu() if linear.bias is not None else None
                packed[name] = gptq_tensors(
                    result.q.cpu(), result.scales.cpu(), result.zeros.cpu(), result.g_idx.cpu(), bias,
                    settings.bits, settings.checkpoint_format,
                )  # fmt: skip
                if on_quantized is not None:
                    on_quantized(name, result)
            if inputs is not None:
                inputs = [(block(x, step), step) for x, step in inputs]  # the next block sees quantized outputs
            for name in QUANTIZED_MODULES:
                _release(block.get_submodule(name))
            for param in block.parameters():  # the norms go back where they were
                if not param.is_meta:
                    param.data = param.data.to(home, dtype)
    return packed


def _release(linear: nn.Linear) -> None:
    """Drop a quantized linear's float tensors (their data now lives in the GPTQ tensors), so that
    memory does not grow with every block done."""
    for name, param in list(linear.named_parameters(recurse=False)):
        setattr(linear, name, nn.Parameter(torch.empty(param.shape, device="meta"), requires_grad=False))


def _quantized_state(model: QWenLMHeadModel, packed: dict[str, dict[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """Checkpoint tensors in model order: GPTQ tensors for quantized linears, fp16 for the rest."""
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in packed:
            if leaf == "weight":
                yield from ((f"{module}.{key}", value) for key, value in packed[module].items())
            continue  # the bias is among the packed tensors
        yield name, tensor.detach().to("cpu", torch.float16).contiguous()


def _write_output(
    folder: Path, model_path: Path, model: QWenLMHeadModel, packed: dict, settings: QuantizeSettings,
    max_shard_size: int | str,
) -> None:  # fmt: skip
    folder.mkdir(parents=True)
    _write_safetensors(folder, _quantized_state(model, packed), _parse_size(max_shard_size))
    config = read_json_object(model_path / "config.json", "model config")
    config.update(torch_dtype="float16", fp16=True, bf16=False, fp32=False)  # GPTQ checkpoints run in fp16
    write_json_atomic(folder / "config.json", config)
    QuantizationConfig(
        bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act, sym=settings.sym,
        damp_percent=settings.damp_percent, true_sequential=settings.true_sequential,
        static_groups=settings.static_groups, checkpoint_format=settings.checkpoint_format,
    ).save_pretrained(folder)  # fmt: skip
    extras = [model_path / name for name in COPIED_FILES] + sorted(model_path.glob("*.py"))
    extras += sorted(model_path.glob("LICENSE*")) + sorted(model_path.glob("NOTICE*"))
    for file in extras:
        if file.is_file():
            shutil.copyfile(file, folder / file.name)


def quantize_checkpoint(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    bits: int,
    group_size: int = 128,
    method: Literal["gptq", "rtn"] = "gptq",
    calibration: str | os.PathLike | None = None,
    num_samples: int | None = 128,
    seq_len: int = 512,
    desc_act: bool = False,
    sym: bool = True,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    progress: bool = True,
    *,
    static_groups: bool = False,
    checkpoint_format: str = "gptq",
    device: str | torch.device = "cpu",
    max_shard_size: int | str = "2GB",
    on_quantized: OnQuantized | None = None,
) -> QuantizeReport:
    """Write a GPTQ checkpoint of the float checkpoint at `model_path` into `output_dir`.

    The output is what AutoGPTQ's `save_quantized` writes and what transformers/optimum and qwenlm's
    loader read: safetensors shards (+ index), config.json with `quantization_config` and
    `torch_dtype: "float16"`, `quantize_config.json`, and the source's generation and tokenizer files.

    Args:
        bits: 4 or 8.
        group_size: input features per scale group (must divide every in_features), or -1.
        method: "gptq" (calibrated) or "rtn" (round-to-nearest, no data).
        calibration: `.jsonl` / `.json` / `.txt` samples (see `qwenlm.quant.calibration`); None uses a
            small built-in set (real data close to the model's use is better).
        num_samples: how many samples to use, from the start of the file; None: all.
        seq_len: tokens per sample (longer ones are cut; never more than the model's seq_length).
        desc_act, sym, damp_percent, true_sequential, static_groups: as in AutoGPTQ.
        device: where each block is calibrated (the model itself stays on the CPU).
        on_quantized: called with (module name, QuantResult) for every quantized linear.

    Raises:
        ValueError: bits not 4/8; a group size that does not divide a module's in_features (named);
            a calibration file with fewer samples than asked; an already-quantized source; an output
            folder that exists and is not empty.
        FileNotFoundError: the checkpoint or the calibration file is missing.
    """
    start = time.perf_counter()
    model_path, output_dir = Path(model_path), Path(output_dir)
    settings = QuantizeSettings(bits, group_size, method, desc_act, sym, damp_percent, true_sequential,
                                static_groups, checkpoint_format)  # fmt: skip
    config = _check_request(model_path, output_dir, settings)
    ids = None
    if method == "gptq":
        ids = calibration_ids(model_path, calibration, num_samples, min(seq_len, config.seq_length))
    model = load_model(model_path, torch_dtype=_stored_dtype(model_path), progress=progress)
    losses: dict[str, float] = {}

    def record(name: str, result: QuantResult) -> None:
        if result.loss is not None:
            losses[name] = result.loss
        if on_quantized is not None:
            on_quantized(name, result)

    packed = quantize_model(model, settings, ids, device, progress, record)
    partial = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    try:
        _write_output(partial, model_path, model, packed, settings, max_shard_size)
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked above)
        partial.rename(output_dir)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return QuantizeReport(
        output_dir, settings, len(ids or []), sum(len(row) for row in ids or []), time.perf_counter() - start, losses
    )
