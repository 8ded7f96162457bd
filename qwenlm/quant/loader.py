"""Quantization while loading: GPTQ checkpoints, on-the-fly int8/int4, and bitsandbytes.

`load_model` builds the float model on the meta device, then asks `plan_quantization` which linears
become quantized modules. The returned plan claims those linears' tensors as the shards stream by
and swaps each linear for its quantized module as soon as all of its tensors have arrived, so peak
memory stays near the quantized model plus one float tensor:

    plan = plan_quantization(folder, model, ckpt, quantization="int4")
    expected = plan.expected_shapes(expected)      # checkpoint tensor names/shapes to check
    plan.take(model, name, tensor, file, device, dtype)   # for each tensor plan.owns(name)
    plan.finish()
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..kernels import avx2_kernel_available, kernels_available, kernels_status
from ..model.checkpoint import CheckpointError, CheckpointFiles
from .config import QuantizationConfig, QuantizationConfigError
from .embedding import QuantEmbedding
from .formats import gptq_shapes
from .linear import QuantLinear
from .onthefly import EMBEDDING, SCHEMES, Recipe, recipe_for

logger = logging.getLogger(__name__)

BNB_INSTALL_HINT = (
    'bitsandbytes is not installed: `pip install "qwenlm[bnb]"` (or `pip install bitsandbytes`), or use the '
    'built-in weight-only quantization instead: load_model(path, quantization="int8") or quantization="int4"'
)


# --------------------------------------------------------------------------------------------------
# The plan: which module is built from which tensors
# --------------------------------------------------------------------------------------------------
class Builder(Protocol):
    """Makes the quantized module that replaces one float linear, from that module's checkpoint tensors."""

    def shapes(self, module: str, linear: nn.Linear) -> dict[str, tuple[int, ...]]: ...

    def shape_message(self, name: str, shape, expected, file: Path, linear: nn.Linear) -> str: ...

    def check(self, name: str, tensor: Tensor, file: Path, linear: nn.Linear) -> None: ...

    def build(self, module: str, linear: nn.Linear, tensors: dict[str, Tensor], device, dtype) -> nn.Module: ...


@dataclass
class QuantizationPlan:
    """Linears to replace, the checkpoint tensors each one is built from, and the builder."""

    modules: dict[str, nn.Module]  # module name -> the meta float linear (or embedding) it replaces
    sources: dict[str, tuple[str, ...]]  # module name -> tensor suffixes it is built from
    builder: Builder
    description: str
    _pending: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    _on_cpu: bool = False  # a qwenlm quantized linear landed on the CPU

    def __post_init__(self) -> None:
        self._owner = {f"{m}.{s}": m for m, suffixes in self.sources.items() for s in suffixes}

    @property
    def owned_names(self) -> frozenset[str]:
        """Tensor names this plan reads itself (the loader must pass them on unconverted)."""
        return frozenset(self._owner)

    def owns(self, name: str) -> bool:
        return name in self._owner

    def expected_shapes(self, expected: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
        """The float model's expected tensors with each replaced linear's entries swapped for its sources."""
        out = {n: tuple(s) for n, s in expected.items() if n.rsplit(".", 1)[0] not in self.modules}
        for module, suffixes in self.sources.items():
            shapes = self.builder.shapes(module, self.modules[module])
            out.update({f"{module}.{s}": shapes[s] for s in suffixes})
        return out

    def take(
        self, model: nn.Module, name: str, tensor: Tensor, file: Path, device: str | torch.device, dtype: torch.dtype
    ) -> None:
        """Hold `tensor`; once its module has all its tensors, build it and swap it into `model`."""
        module = self._owner[name]
        self.builder.check(name, tensor, file, self.modules[module])
        parts = self._pending.setdefault(module, {})
        parts[name[len(module) + 1 :]] = tensor
        if len(parts) == len(self.sources[module]):
            built = self.builder.build(module, self.modules[module], self._pending.pop(module), device, dtype)
            model.set_submodule(module, built)
            self._done.add(module)
            self._on_cpu = self._on_cpu or (isinstance(built, QuantLinear) and built.qdata.is_cpu)

    def check_header_shapes(self, shapes: dict[str, tuple[int, ...]], ckpt: CheckpointFiles) -> None:
        """Check this plan's tensors against the safetensors headers, before any data is read."""
        for name in sorted(self.owned_names & shapes.keys()):
            module, suffix = name.rsplit(".", 1)
            expected = self.builder.shapes(module, self.modules[module]).get(suffix)
            if expected is not None and tuple(shapes[name]) != tuple(expected):
                linear, file = self.modules[module], ckpt.tensors[name]
                raise CheckpointError(self.builder.shape_message(name, shapes[name], expected, file, linear))

    def default_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 on CPU (see `load_model`); None elsewhere, leaving the choice to `resolve_dtype`."""
        return torch.bfloat16 if device.type == "cpu" else None

    def finish(self) -> None:
        missing = sorted(set(self.modules) - self._done)
        if missing:  # the name check makes this unreachable unless a file lied about its keys
            raise CheckpointError(f"quantized modules never completed: {missing[:8]}")
        if self._on_cpu and not kernels_available() and not avx2_kernel_available():
            logger.warning(
                "quantized linears on this CPU run without qwenlm's kernels (%s): each decode step dequantizes every "
                "weight in PyTorch, far slower than bf16 (BENCHMARKS.md, 'CPUs without AVX-512'). Load the model "
                "unquantized (bf16) here, or use an x86 CPU with AVX2 (AVX-512 BF16 is fastest) or a GPU.",
                kernels_status(),
            )


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def plan_quantization(
    folder: Path,
    model: nn.Module,
    ckpt: CheckpointFiles,
    quantization: str | None = None,
    quantization_config: Any = None,
    group_size: int | None = None,
) -> QuantizationPlan | None:
    """Decide what `load_model` quantizes, or None for a plain float load.

    A checkpoint with a GPTQ config is read as it is (the modules with a `.qweight` tensor are the
    quantized ones); `quantization` ("int8"/"int4") quantizes a float checkpoint on the fly;
    `quantization_config` (a dict or a transformers `BitsAndBytesConfig`/`GPTQConfig`) asks for
    bitsandbytes, or restates the GPTQ config of a GPTQ checkpoint (as Qwen's Q-LoRA recipe does).
    """
    try:
        stored = QuantizationConfig.from_pretrained(folder)
    except QuantizationConfigError as err:
        raise CheckpointError(str(err)) from err
    has_qweight = any(n.endswith(".qweight") for n in ckpt.tensors)
    if stored is None and has_qweight:
        example = next(n for n in ckpt.tensors if n.endswith(".qweight"))
        raise CheckpointError(
            f"{folder} holds GPTQ tensors (e.g. {example} in {ckpt.tensors[example].name}) but neither "
            "config.json['quantization_config'] nor quantize_config.json describes them"
        )
    requested = _requested_settings(quantization_config)
    if group_size is not None and quantization != "int4":
        raise ValueError("quantization_group_size applies to quantization='int4' only")
    if stored is not None:
        if quantization is not None or (requested is not None and requested.get("quant_method") != "gptq"):
            what = f"quantization={quantization!r}" if quantization is not None else "quantization_config"
            raise CheckpointError(
                f"{folder} is already quantized (GPTQ {stored.bits}-bit); it cannot be quantized again on the fly "
                f"({what}). Load it without that option, or quantize its float original."
            )
        if requested is not None:
            _check_same_gptq(requested, stored, folder)
        return _gptq_plan(folder, model, ckpt, stored)
    if quantization is not None and requested is not None:
        raise ValueError("pass either quantization= or quantization_config=, not both")
    if quantization is not None:
        return _onthefly_plan(model, quantization, group_size)
    if requested is None:
        return None
    if requested.get("quant_method") == "gptq":
        raise ValueError(
            f"{folder} holds float weights; GPTQ needs calibration data, so it is not done at load time. "
            "Run `qwenlm quantize` to write a GPTQ checkpoint, or use quantization='int8'|'int4'."
        )
    return _bnb_plan(model, requested)


def _requested_settings(config: Any) -> dict[str, Any] | None:
    """A `quantization_config` argument as a plain dict with a lower-case quant_method."""
    if config is None:
        return None
    if isinstance(config, dict):
        data = dict(config)
    elif hasattr(config, "to_dict"):
        data = dict(config.to_dict())
    else:
        data = {k: v for k, v in vars(config).items() if not k.startswith("__")}
    renamed = {"_load_in_8bit": "load_in_8bit", "_load_in_4bit": "load_in_4bit"}  # transformers' private names
    data = {renamed.get(k, k): getattr(v, "value", v) for k, v in data.items()}
    method = data.get("quant_method")
    if method is None:
        method = "bitsandbytes" if data.get("load_in_8bit") or data.get("load_in_4bit") else None
    if method is None:
        raise ValueError(f"quantization_config {data} names no method: give quant_method, or load_in_8bit/load_in_4bit")
    data["quant_method"] = str(method).lower()
    if data["quant_method"] not in ("gptq", "bitsandbytes"):
        raise ValueError(
            f"quantization_config quant_method {data['quant_method']!r} is not supported; qwenlm loads GPTQ "
            "checkpoints and quantizes with bitsandbytes or its built-in quantization='int8'|'int4'"
        )
    return data


def _check_same_gptq(requested: dict[str, Any], stored: QuantizationConfig, folder: Path) -> None:
    """A GPTQConfig passed for a GPTQ checkpoint must not contradict its bits; as in transformers, the
    checkpoint's own config wins otherwise (GPTQConfig's defaults, e.g. group_size 128, are no claim)."""
    if requested.get("bits") is not None and requested["bits"] != stored.bits:
        raise CheckpointError(
            f"quantization_config says bits={requested['bits']!r}, but {folder} was quantized with bits={stored.bits}"
        )


# --------------------------------------------------------------------------------------------------
# GPTQ checkpoints
# --------------------------------------------------------------------------------------------------
def _gptq_plan(folder: Path, model: nn.Module, ckpt: CheckpointFiles, qconfig: QuantizationConfig) -> QuantizationPlan:
    linears = _linears(model)
    quantized = sorted(n[: -len(".qweight")] for n in ckpt.tensors if n.endswith(".qweight"))
    if not quantized:
        raise CheckpointError(
            f"{folder} has a GPTQ quantization config ({qconfig.source}) but no '<module>.qweight' tensors"
        )
    for module in quantized:
        if module not in linears:
            raise CheckpointError(
                f"tensor {module}.qweight in {ckpt.tensors[module + '.qweight'].name}: {module} is not a linear "
                "layer of the model"
            )
    sources = {}
    for module in quantized:
        suffixes = ["qweight", "qzeros", "scales"]
        suffixes += [s for s in ("g_idx", "bias") if f"{module}.{s}" in ckpt.tensors]
        if linears[module].bias is not None and "bias" not in suffixes:
            suffixes.append("bias")  # a bias the float model has must be there: reported as missing
        sources[module] = tuple(suffixes)
    builder = _GPTQBuilder(qconfig)
    return QuantizationPlan({m: linears[m] for m in quantized}, sources, builder, f"GPTQ {qconfig.bits}-bit")


class _GPTQBuilder:
    def __init__(self, qconfig: QuantizationConfig) -> None:
        self.qconfig = qconfig

    def shapes(self, module: str, linear: nn.Linear) -> dict[str, tuple[int, ...]]:
        q = self.qconfig
        try:
            return gptq_shapes(linear.in_features, linear.out_features, q.bits, q.group_size)
        except ValueError as err:
            raise CheckpointError(
                f"{module} ({linear.in_features} inputs, {linear.out_features} outputs) "
                f"cannot be GPTQ-quantized with {q.source}: {err}"
            ) from err

    def check(self, name: str, tensor: Tensor, file: Path, linear: nn.Linear) -> None:
        module, suffix = name.rsplit(".", 1)
        expected = self.shapes(module, linear)[suffix]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(self.shape_message(name, tensor.shape, expected, file, linear))
        integer = suffix in ("qweight", "qzeros", "g_idx")
        if integer and tensor.dtype != torch.int32 or not integer and not tensor.is_floating_point():
            want = "torch.int32" if integer else "floats"
            raise CheckpointError(f"tensor {name} in {file.name} has dtype {tensor.dtype}; expected {want}")

    def shape_message(self, name: str, shape, expected, file: Path, linear: nn.Linear) -> str:
        """File, tensor, expected and actual shape, and what implies the expected one."""
        q = self.qconfig
        return (
            f"tensor {name} in {file.name} has shape {list(shape)}, but {q.source} (bits={q.bits}, "
            f"group_size={q.group_size}) and config.json ({linear.in_features} inputs, {linear.out_features} "
            f"outputs) imply {list(expected)}"
        )

    def build(self, module: str, linear: nn.Linear, tensors: dict[str, Tensor], device, dtype) -> nn.Module:
        q = self.qconfig
        try:
            return QuantLinear.from_gptq(
                tensors, q.bits, q.group_size, q.checkpoint_format, dtype=dtype, device=device, name=module
            )
        except ValueError as err:
            raise CheckpointError(f"cannot load GPTQ module {module}: {err}") from err


# --------------------------------------------------------------------------------------------------
# On-the-fly int8 / int4
# --------------------------------------------------------------------------------------------------
def _onthefly_plan(model: nn.Module, scheme: str, group_size: int | None) -> QuantizationPlan:
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {SCHEMES} (or None), got {scheme!r}")
    modules: dict[str, nn.Module] = {**_linears(model), EMBEDDING: model.get_submodule(EMBEDDING)}
    recipes = {name: recipe_for(name, scheme, group_size) for name in modules}  # type: ignore[arg-type]
    for name, recipe in recipes.items():
        k = _weight_shape(modules[name])[1]
        if recipe.group_size != -1 and k % recipe.group_size:
            raise ValueError(
                f"quantization_group_size {recipe.group_size} does not divide the {k} inputs of {name}; "
                "choose a divisor of every layer's input size (--quantization-group-size), or -1 for one group per row"
            )
    sources = {name: ("weight", "bias") if getattr(m, "bias", None) is not None else ("weight",)
               for name, m in modules.items()}  # fmt: skip
    return QuantizationPlan(modules, sources, _FloatBuilder(recipes), f"on-the-fly {scheme}")


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """[rows, cols] of a linear's or an embedding's weight."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


class _FloatBuilder:
    """Builds a quantized module from a float linear's (or the embedding's) weight and bias."""

    def __init__(self, recipes: dict[str, Recipe]) -> None:
        self.recipes = recipes

    def shapes(self, module: str, linear: nn.Module) -> dict[str, tuple[int, ...]]:
        rows, cols = _weight_shape(linear)
        return {"weight": (rows, cols), "bias": (rows,)}

    def shape_message(self, name: str, shape, expected, file: Path, linear: nn.Linear) -> str:
        return f"tensor {name} in {file.name} has shape {list(shape)}, but config.json implies {list(expected)}"

    def check(self, name: str, tensor: Tensor, file: Path, linear: nn.Linear) -> None:
        module, suffix = name.rsplit(".", 1)
        expected = self.shapes(module, linear)[suffix]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(self.shape_message(name, tensor.shape, expected, file, linear))
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {name} in {file.name} has dtype {tensor.dtype}; expected floats")

    def build(self, module: str, linear: nn.Linear, tensors: dict[str, Tensor], device, dtype) -> nn.Module:
        r = self.recipes[module]
        weight = tensors["weight"].to(device)  # quantize where it will run (a GPU is much faster at it)
        if isinstance(linear, nn.Embedding):
            return QuantEmbedding.from_float(weight, r.bits, r.group_size, sym=r.sym, dtype=dtype)
        return QuantLinear.from_float(weight, tensors.get("bias"), r.bits, r.group_size, sym=r.sym, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------------
def _import_bnb():
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ImportError(BNB_INSTALL_HINT) from err


def _bnb_plan(model: nn.Module, settings: dict[str, Any]) -> QuantizationPlan:
    eight, four = bool(settings.get("load_in_8bit")), bool(settings.get("load_in_4bit"))
    if eight == four:
        raise ValueError("a bitsandbytes quantization_config needs exactly one of load_in_8bit / load_in_4bit")
    quant_type = settings.get("bnb_4bit_quant_type") or "fp4"
    if four and quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    bnb = _import_bnb()
    skip = settings.get("llm_int8_skip_modules") or ["lm_head"]  # transformers keeps lm_head float too
    linears = {n: m for n, m in _linears(model).items() if not any(n == s or n.endswith("." + s) for s in skip)}
    sources = {name: ("weight", "bias") if lin.bias is not None else ("weight",) for name, lin in linears.items()}
    builder = _BnbBuilder(bnb, settings, eight, quant_type)
    return QuantizationPlan(linears, sources, builder, "bitsandbytes " + ("int8" if eight else quant_type))


class _BnbBuilder(_FloatBuilder):
    def __init__(self, bnb, settings: dict[str, Any], eight: bool, quant_type: str) -> None:
        self.bnb, self.settings, self.eight, self.quant_type = bnb, settings, eight, quant_type

    def build(self, module: str, linear: nn.Linear, tensors: dict[str, Tensor], device, dtype) -> nn.Module:
        bnb, s = self.bnb, self.settings
        weight, bias = tensors["weight"].to(dtype), tensors.get("bias")
        if self.eight:
            threshold = float(s.get("llm_int8_threshold", 6.0))
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=threshold,
            )
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            compute = s.get("bnb_4bit_compute_dtype") or dtype
            compute = getattr(torch, compute) if isinstance(compute, str) else compute
            double = bool(s.get("bnb_4bit_use_double_quant", False))
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                compute_dtype=compute,
                compress_statistics=double,
                quant_type=self.quant_type,
            )
            layer.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=double, quant_type=self.quant_type
            )
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return layer.to(device)  # bitsandbytes quantizes when the weight is moved
