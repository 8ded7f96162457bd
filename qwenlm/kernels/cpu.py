"""Build/load the AVX-512 matrix-vector kernels (cpu_gemv.cpp) and the dispatching linear wrappers.

    from qwenlm.kernels import linear, linear_quantized
    y = linear(x, weight, bias)          # kernel for small-M CPU inference, torch otherwise

The extension is compiled lazily, on the first kernel call or load_kernels(), never at import. The build is
cached under ~/.cache/qwenlm/kernels/<hash of source, torch, compiler, flags, CPU> (QWENLM_KERNEL_CACHE
overrides the root), guarded by a file lock so concurrent processes build it once; a cached build loads in
milliseconds. Any failure (no compiler, CPU without AVX512_BF16, build error) logs one warning and the
wrappers use pure torch. QWENLM_DISABLE_KERNELS=1 forces the torch path.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import math
import os
import platform
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F

from .quant import QuantizedWeight, _chunk_order
from .quant import dequantize as dequantize_torch
from .reference import linear_reference, paged_decode_attention_reference

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
# -ffp-contract=off: the elementwise kernels (RMSNorm, RoPE) must round exactly like torch's formulas. A function
# attribute is not enough: GCC does not carry it into the lambdas at::parallel_for runs, and whether a*b+c there
# became an FMA changed with unrelated edits elsewhere in the file. The matrix kernels use explicit FMA intrinsics.
_CFLAGS = (
    "-O3", "-ffp-contract=off", "-march=native", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"
)  # fmt: skip
_LDFLAGS = ("-fopenmp",)  # links libgomp.so.1, which resolves to the copy torch already loaded
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")

# Largest number of rows (tokens) for which the kernels beat the torch path, per (x dtype, weight dtype); measured
# with benchmarks/bench_kernels.py --m 1,4,8,16,32,64. On a 2-core AMD EPYC (Zen 4) the dense kernel is a decent
# GEMM for bf16 too and torch's blocked GEMM only wins from ~128 rows. On Intel CPUs with AMX, oneDNN runs bf16
# GEMMs on the tile units: it wins from 8 rows (~2x faster at 16 rows, ~4x at 64 on the 1.8B shapes, which
# is what a batched decode step of the serving engine runs), and its fp32 GEMM from ~32 rows. fp32 activations
# on bf16 weights have no fast torch path (torch would upcast the weight): the kernel up to 64 rows everywhere.
_DENSE_MAX_ROWS = MappingProxyType(
    {(torch.bfloat16, torch.bfloat16): 64, (torch.float32, torch.bfloat16): 64, (torch.float32, torch.float32): 64}
)
_DENSE_MAX_ROWS_AMX = MappingProxyType(
    {(torch.bfloat16, torch.bfloat16): 4, (torch.float32, torch.bfloat16): 64, (torch.float32, torch.float32): 24}
)
# Quantized: above these, dequantize (C++) + torch's bf16 GEMM is faster than re-decoding the weight for every
# 4 rows (the same on both hosts: dequantizing a weight costs ~20 times the kernel's one-row call).
QUANT_MAX_ROWS = MappingProxyType(
    {(8, torch.bfloat16): 16, (8, torch.float32): 16, (4, torch.bfloat16): 32, (4, torch.float32): 16}
    | {(6, torch.bfloat16): 32, (6, torch.float32): 16}  # int6 runs int4's tiles
)
_QUANT_OPS = {8: "linear_int8", 6: "linear_int6", 4: "linear_int4"}


@dataclass(frozen=True)
class _LoadResult:
    ok: bool
    status: str


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def _build_key(compiler: str, source: Path = _SOURCE, cflags: tuple[str, ...] = _CFLAGS) -> str:
    """Hash of everything that changes the binary: source and the headers beside it, torch, compiler, flags
    and the CPU (-march=native)."""
    h = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        h.update(b"\0" + header.read_bytes())
    for part in (
        torch.__version__,
        compiler,
        " ".join(cflags + _LDFLAGS),
        _cpu_model(),
        " ".join(sorted(_cpu_flags())),
    ):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:20]


def _cache_root() -> Path:
    env = os.environ.get("QWENLM_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qwenlm" / "kernels"


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_and_load() -> _LoadResult:
    return build_and_load_library(_SOURCE, "qwenlm_gemv")


def build_and_load_library(source: Path, prefix: str, cflags: tuple[str, ...] = _CFLAGS,
                           required: tuple[str, ...] = _REQUIRED_CPU_FLAGS) -> _LoadResult:  # fmt: skip
    """Compile `source` (once per machine, cached by _build_key) into an op library and load it."""
    missing = [f for f in required if f not in _cpu_flags()]
    if platform.machine() not in ("x86_64", "AMD64") or missing:
        return _LoadResult(False, f"CPU lacks {', '.join(missing) or 'x86-64'}; using torch")
    key = _build_key(_compiler_version(), source, cflags)
    name = f"{prefix}_{key}"
    build_dir = _cache_root() / key
    library = build_dir / f"{name}.so"
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / "build.lock"):
        if library.exists():
            try:
                torch.ops.load_library(str(library))
                return _LoadResult(True, f"{prefix} kernels ({library})")
            except OSError as e:  # a truncated or foreign file: build it again
                logger.warning("rebuilding unloadable cached kernels %s: %s", library, e)
                library.unlink()
        from torch.utils import cpp_extension

        logger.info("compiling qwenlm CPU kernels into %s (once per machine)", build_dir)
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=list(cflags),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    return _LoadResult(True, f"{prefix} kernels, freshly built ({library})")


_load_lock = threading.Lock()

# Quantized linears with bf16 activations have two kernels (cpu_gemv.cpp): "dpbf16" (bf16 dot products of the
# codes, exact) and "vnni" (integer dot products of the codes with a 24-bit fixed-point copy of the activations).
# Both stream the weight once; they differ in work per byte. On Intel CPUs with AMX (Sapphire Rapids and later)
# vdpbf16ps issues every other cycle and the dpbf16 kernels top out at ~60% of DRAM bandwidth, where the
# integer kernels reach ~80% (int8) and ~70% (int4) (benchmarks/bench_kernels.py). Elsewhere (the AMD host the
# kernels were tuned on) dpbf16 is full speed. QWENLM_QUANT_KERNEL=vnni|dpbf16 overrides the choice.
QUANT_KERNELS = ("dpbf16", "vnni")


def default_quant_kernel(cpu_flags: set[str]) -> str:
    """The quantized-linear kernel for bf16 activations on a CPU with these flags (see QUANT_KERNELS)."""
    env = os.environ.get("QWENLM_QUANT_KERNEL", "")
    if env in QUANT_KERNELS:
        return env
    if env:
        logger.warning("ignoring QWENLM_QUANT_KERNEL=%r (one of %s)", env, ", ".join(QUANT_KERNELS))
    vnni = {"avx512_vnni", "avx512vbmi", "amx_bf16"} <= cpu_flags
    return "vnni" if vnni else "dpbf16"


def set_quant_kernel(name: str) -> str:
    """Switch the quantized-linear kernel for bf16 activations (process-wide); returns the previous one."""
    if name not in QUANT_KERNELS:
        raise ValueError(f"quant kernel must be one of {', '.join(QUANT_KERNELS)}, not {name!r}")
    if not kernels_available():
        raise RuntimeError(f"the CPU kernels are unavailable ({kernels_status()})")
    return QUANT_KERNELS[torch.ops.qwenlm_kernels.set_quant_kernel(QUANT_KERNELS.index(name))]


def quant_kernel() -> str | None:
    """The quantized-linear kernel in use for bf16 activations, or None without the kernels."""
    return QUANT_KERNELS[torch.ops.qwenlm_kernels.set_quant_kernel(-1)] if kernels_available() else None


@functools.cache
def _load() -> _LoadResult:
    with _load_lock:
        try:
            result = _build_and_load()
        except Exception as e:  # any failure means "no kernels", never an error for the caller
            logger.warning("qwenlm CPU kernels unavailable, using torch fallbacks: %s", e)
            return _LoadResult(False, f"build/load failed: {type(e).__name__}: {e}")
        if not result.ok:  # a CPU without AVX-512 / AVX512_BF16: nothing was built, torch does the work
            return result
        name = default_quant_kernel(_cpu_flags())
        try:
            torch.ops.qwenlm_kernels.set_quant_kernel(QUANT_KERNELS.index(name))
        except RuntimeError as e:  # QWENLM_QUANT_KERNEL=vnni where the build has no VNNI path
            logger.warning("quantized bf16 linears stay on dpbf16: %s", e)
            name = "dpbf16"
        return _LoadResult(True, f"{result.status}; quantized bf16 linears: {name}")


@functools.cache
def _disabled() -> bool:
    """QWENLM_DISABLE_KERNELS, read once per process (os.environ costs ~1.5 us, and this is on every call)."""
    return os.environ.get("QWENLM_DISABLE_KERNELS", "") not in ("", "0")


def load_kernels() -> bool:
    """Compile (first time per machine) and load the kernels now; returns kernels_available()."""
    return kernels_available()


def kernels_available() -> bool:
    """True when the compiled kernels are loaded and not disabled by QWENLM_DISABLE_KERNELS."""
    return not _disabled() and _load().ok


def kernels_status() -> str:
    """Why the kernels are off, or which ISA/build is in use."""
    if _disabled():
        return "disabled by QWENLM_DISABLE_KERNELS"
    return _load().status


def _no_grad_needed(*tensors: torch.Tensor | None) -> bool:
    """The kernels have no autograd; use them only when nothing needs a gradient."""
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


# Read once at import, as DENSE_MAX_ROWS is: torch.compile refuses to trace torch.backends.mkldnn.is_available,
# and on a CPU without the kernels the compiled decode step runs this fallback.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch fallback with the kernels' semantics (mixed dtypes compute in fp32, output in x's dtype).

    fp32 inference on CPU goes through oneDNN's GEMM (torch's own linear-with-post-op, in fp32): F.linear
    calls MKL's sgemm, which runs at ~120-135 GFLOP/s on this AMD CPU against ~200 for oneDNN (a fp32
    prefill spends >90% of its time there). bf16 F.linear already uses oneDNN.
    """
    if weight.dtype != x.dtype:
        return linear_reference(x, weight, bias)
    bias = None if bias is None else bias.to(x.dtype)
    if (
        x.dtype == torch.float32
        and x.is_cpu
        and weight.is_cpu
        and x.numel() > 0
        and weight.dim() == 2
        and _no_grad_needed(x, weight, bias)
        and _ONEDNN_LINEAR
        and not torch.compiler.is_compiling()  # inductor has no lowering for it; it makes its own GEMM calls
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _dense_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.qwenlm_kernels.linear_dense(x, weight, bias)


def dense_row_limits(cpu_flags: set[str]) -> MappingProxyType:
    """The dense kernel's row limit per (x dtype, weight dtype) on a CPU with these flags (see _DENSE_MAX_ROWS)."""
    amx = {"amx_tile", "amx_bf16"} <= cpu_flags and torch.backends.mkldnn.is_available()
    return _DENSE_MAX_ROWS_AMX if amx else _DENSE_MAX_ROWS


# Read once at import: `linear` runs inside torch.compile'd decode steps, which cannot trace a file read.
DENSE_MAX_ROWS = dense_row_limits(_cpu_flags())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias, with the CPU kernel for few rows.

    Args:
        x: [..., K], fp32 or bf16.
        weight: [N, K] like nn.Linear.weight; bf16 or fp32 (fp32 x with bf16 weight computes in fp32).
        bias: optional [N].

    Returns:
        [..., N] in x's dtype. The kernel runs when x is on CPU, rows <= DENSE_MAX_ROWS for the dtypes, the dtypes are
        supported, no gradient is needed and the kernels are available; otherwise torch computes it.
    """
    # Checks are ordered cheapest first: this runs for every linear of every decoded token.
    if (
        x.is_cpu
        and 0 < x.numel() <= DENSE_MAX_ROWS.get((x.dtype, weight.dtype), 0) * x.shape[-1]
        and weight.is_cpu
        and weight.dim() == 2
        and weight.is_contiguous()
        and _no_grad_needed(x, weight, bias)
        and kernels_available()
    ):
        return _dense_op(x, weight, bias)
    if weight.dtype == torch.bfloat16 and weight.is_cpu and weight.dim() == 2:  # CPUs where the AVX2 kernels stand in
        for max_rows, op in ((AVX2_DENSE_MAX_ROWS, "linear_bf16"), (AVX2_GEMM_MAX_ROWS, "gemm_bf16")):
            if weight.is_contiguous() and _avx2_takes(x, weight, bias, max_rows=max_rows):
                out = getattr(torch.ops.qwenlm_avx2, op)(x.reshape(-1, x.shape[-1]), weight, bias)
                return out.reshape(*x.shape[:-1], weight.shape[0])
        if _bf16_gemm_in_fp32(x, weight, bias):
            return bf16_linear_in_fp32(x, weight, bias)
    return _torch_linear(x, weight, bias)


def bf16_linear_in_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 x @ weight.T + bias by torch's fp32 GEMM, the weight widened in slabs (`_bf16_gemm_in_fp32`)."""

    def widen(r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(weight[r0:r1])

    return _in_slabs(x.float(), weight.shape[0], widen, _float_or_none(bias)).to(torch.bfloat16)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K]: (q - zeros) * scales in fp32, one rounding to dtype.

    Uses the C++ kernel on CPU (many times faster than the pure-torch unpacking), else quant.dequantize.
    """
    if _dequantize_kernel_takes(qw, dtype):
        return torch.ops.qwenlm_kernels.dequantize(
            qw.qdata, qw.scales, qw.zeros, qw.bits, qw.kernel_group, qw.in_features, dtype
        )
    if _avx2_dequantize_takes(qw, dtype):
        return _dequantize_into(qw, torch.empty(qw.out_features, qw.in_features, dtype=dtype))
    return dequantize_torch(qw, dtype)


def _dequantize_kernel_takes(qw: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether the C++ dequantize kernels can write `qw` as `dtype` (else quant.dequantize does)."""
    return qw.qdata.is_cpu and qw.kernel_compatible and dtype in (torch.float32, torch.bfloat16) and kernels_available()


def linear_quantized(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(qw).T + bias, with the CPU kernel for few rows.

    Args:
        x: [..., K], fp32 or bf16 for the kernel (any float dtype on the fallback).
        qw: from pack_quantized.
        bias: optional [N].

    Returns:
        [..., N] in x's dtype. Kernel path (CPU, rows <= QUANT_MAX_ROWS[bits, x.dtype]): weight-only, the
        activations keep their precision (fp32 x is not rounded to bf16). Otherwise (more rows, other
        devices/dtypes, no kernels): dequantize to x's dtype, then `linear` (the dense kernel up to
        DENSE_MAX_ROWS rows on CPU, else F.linear).

    Raises:
        ValueError: if x's last dimension is not qw.in_features.
    """
    k = x.shape[-1]
    if k != qw.in_features:
        raise ValueError(f"x has {k} features, the weight expects {qw.in_features}")
    if (
        x.is_cpu
        and 0 < x.numel() <= QUANT_MAX_ROWS.get((qw.bits, x.dtype), 0) * k
        and qw.qdata.is_cpu
        and qw.kernel_compatible
        and _no_grad_needed(x, bias)
        and kernels_available()
    ):
        op = getattr(torch.ops.qwenlm_kernels, _QUANT_OPS[qw.bits])
        return op(x, qw.qdata, qw.scales, qw.zeros, qw.kernel_group, k, bias)
    if qw.qdata.is_cpu and qw.kernel_compatible:
        if _avx2_takes(x, bias, max_rows=_avx2_quant_rows(x)):
            return _avx2_linear(x, qw, bias)
        if _avx2_takes(x, bias, max_rows=AVX2_GEMM_MAX_ROWS):
            return _avx2_linear(x, qw, bias, op="gemm_quantized")
    return dequantized_linear(x, qw, bias)


# CPUs with AVX2 + FMA but without AVX-512 BF16 get ops of their own (cpu_gemv_avx2.cpp): quantized linears, which
# would otherwise dequantize every weight in PyTorch at every step, bf16 linears, which PyTorch runs at about half
# the speed from cache (see `linear` and `linear_quantized` for how many rows each takes), a GEMM for a prompt's
# rows over either kind of weight (faster than torch's fp32 GEMM on a weight made dense first, up to
# AVX2_GEMM_MAX_ROWS rows), the dequantization of a prompt's weights past that (`dequantized_linear`), and the
# per-token layer ops (`layer_kernels_available`).
_AVX2_SOURCE = Path(__file__).with_name("cpu_gemv_avx2.cpp")
_AVX2_CFLAGS = ("-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-fopenmp")
AVX2_MAX_ROWS = 4
# bf16 rows of a quantized linear take the AVX2 row kernel (integer products, 4 rows at a time per weight row) up
# to this many; more go to the AVX2 GEMM (gemm_quantized). Zen 3 host, 5504 x 2048 weight, int4 g128 / int8, the
# two alternated in one process: even at 8 rows, the GEMM 1.2-1.4x faster at 16 and 1.3-1.4x at 32
# (benchmarks/bench_kernels.py --impls avx2_int4_g128,avx2_int4_g128_blocked).
AVX2_INT_MAX_ROWS = 8
# bf16 rows of a dense bf16 linear take the AVX2 row op (two weight rows by four activation rows per step) up to
# this many; more go to the AVX2 GEMM (gemm_bf16). Same host and weight: the row op 1.1-1.2x faster at 16 rows,
# even at ~20-24, the GEMM ahead from there.
AVX2_DENSE_MAX_ROWS = 16
# Up to this many rows the AVX2 GEMM takes a prompt's linears; more go to torch's fp32 GEMM over the weight made
# dense in slabs (`_in_slabs`). Same host and weight: the GEMM 1.2-1.5x faster at 128 rows, even at 512 and 2048.
AVX2_GEMM_MAX_ROWS = 512


@functools.cache
def _load_avx2() -> _LoadResult:
    try:
        return build_and_load_library(_AVX2_SOURCE, "qwenlm_gemv_avx2", _AVX2_CFLAGS, ("avx2", "fma"))
    except Exception as e:  # no AVX2 ops means torch's linears and the dequantizing path, never an error
        logger.warning("qwenlm's AVX2 kernels are unavailable, using torch fallbacks: %s", e)
        return _LoadResult(False, f"build/load failed: {type(e).__name__}: {e}")


def avx2_kernel_available() -> bool:
    """True where the AVX2 kernels are in use: the AVX-512 kernels are not, and these built and loaded."""
    return not _disabled() and not _load().ok and _load_avx2().ok


def _avx2_quant_rows(x: torch.Tensor) -> int:
    """How many rows of x the AVX2 quantized op takes: bf16 rows use its integer path (AVX2_INT_MAX_ROWS)."""
    return AVX2_INT_MAX_ROWS if x.dtype == torch.bfloat16 else AVX2_MAX_ROWS


def _avx2_takes(x: torch.Tensor, *others: torch.Tensor | None, max_rows: int = AVX2_MAX_ROWS) -> bool:
    """Whether an AVX2 op can take activations x (with the weights and bias `others`): CPU, fp32 or bf16, 1 to
    max_rows rows, no gradient, eager (the ops have no compiled form), and the AVX2 kernels in use."""
    return (
        x.is_cpu
        and x.dtype in (torch.bfloat16, torch.float32)
        and 0 < x.numel() <= max_rows * x.shape[-1]
        and _no_grad_needed(x, *others)
        and not torch.compiler.is_compiling()
        and avx2_kernel_available()
    )


@functools.cache
def _avx2_order(bits: int, kernel_group: int) -> torch.Tensor:
    """Per chunk, the logical weight whose activation the AVX2 kernel reads at each position: the chunk order
    (quant.py) after the byte layout: for int8 byte b holds stored element 16 * (b % 4) + b // 4 (pack_int8), for
    int4/int6 a chunk's low-nibble positions (byte p = 16L + 8h + i holds stored element 32h + 8L + i) come
    first, then its high-nibble ones (stored element 64 + the same)."""
    order = _chunk_order(bits, kernel_group)
    p = torch.arange(64)
    if bits == 8:
        return order[16 * (p % 4) + p // 4]
    low = 32 * ((p // 8) % 2) + 8 * (p // 16) + p % 8
    return order[torch.cat((low, 64 + low))]


def _avx2_weight(qw: QuantizedWeight) -> tuple:
    """The weight arguments of the AVX2 quantized ops: order, q, scales, zeros, bits, group."""
    order = _avx2_order(qw.bits, qw.kernel_group)
    return order, qw.qdata.contiguous(), qw.scales.contiguous(), qw.zeros.contiguous(), qw.bits, qw.kernel_group


def _avx2_linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, op: str = "linear_quantized"
) -> torch.Tensor:
    """An AVX2 quantized op on x's rows: the row kernel (linear_quantized) or, for a prompt's, the GEMM."""
    out = getattr(torch.ops.qwenlm_avx2, op)(x.reshape(-1, qw.in_features), *_avx2_weight(qw), bias)
    return out.reshape(*x.shape[:-1], qw.out_features)


# dequantized_linear (see there): weights whose dense copy is larger than DEQUANT_WHOLE_MAX_BYTES go in slabs of
# DEQUANT_SLAB_BYTES, multiplied while they are still in cache.
DEQUANT_WHOLE_MAX_BYTES = 64 << 20
DEQUANT_SLAB_BYTES = 8 << 20


def dequantized_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_quantized's path for many rows: dequantize to x's dtype, then `linear` (the dense kernel up to
    DENSE_MAX_ROWS rows on CPU, else torch's GEMM).

    On CPU, without gradients, a weight whose dense copy exceeds DEQUANT_WHOLE_MAX_BYTES (a 1.8B lm_head: 622
    MB of bf16; a 7B block linear: ~100 MB) is done in slabs of DEQUANT_SLAB_BYTES of output rows, each
    dequantized into one reused buffer and multiplied while it is in cache, and the slabs' outputs joined.
    Dequantized whole, such a weight is written to fresh memory and read back from DRAM by the GEMM: 2.3-5x
    slower at 17-64 rows, and at 17 rows 3-5x the quantized kernel's time (a fresh allocation per slab was no
    better: its page faults cost as much). Weights that fit in a last-level cache stay whole: in slabs they
    were 3-7% slower at 512 rows (benchmarks/bench_dequant_slabs.py, BENCHMARKS.md). Each output element is
    the same dot product either way. Where the AVX2 kernels stand in, bf16 rows go in fp32 slabs whatever the
    weight's size (`_bf16_gemm_in_fp32`).
    """

    def fill(r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        return _dequantize_into(qw.rows(r0, r1), out)

    if _bf16_gemm_in_fp32(x, bias):  # in slabs whatever the size: whole, 1.5-2.2x slower at 16-128 rows
        return _in_slabs(x.float(), qw.out_features, fill, _float_or_none(bias)).to(torch.bfloat16)
    whole = qw.out_features * qw.in_features * x.dtype.itemsize <= DEQUANT_WHOLE_MAX_BYTES
    if whole or not x.is_cpu or not _no_grad_needed(x, bias):
        return linear(x, dequantize(qw, x.dtype), bias)
    return _in_slabs(x, qw.out_features, fill, bias)


def _in_slabs(
    x: torch.Tensor,
    out_features: int,
    fill: Callable[[int, int, torch.Tensor], torch.Tensor],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`linear(x, W, bias)` with W made DEQUANT_SLAB_BYTES of output rows at a time: fill(r0, r1, buffer) writes
    rows r0:r1 of W, in x's dtype, into `buffer` (one reused allocation) and returns them; each slab is
    multiplied while it is in cache."""
    k = x.shape[-1]
    slab = max(1, DEQUANT_SLAB_BYTES // (k * x.dtype.itemsize))
    buffer = torch.empty(min(slab, out_features), k, dtype=x.dtype)
    parts = []
    for r in range(0, out_features, slab):
        end = min(r + slab, out_features)
        weight = fill(r, end, buffer[: end - r])
        parts.append(linear(x, weight, None if bias is None else bias[r:end]))
    return torch.cat(parts, dim=-1)


def _bf16_gemm_in_fp32(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a bf16 product with more rows than the AVX2 ops take (past AVX2_GEMM_MAX_ROWS, or with a weight
    they cannot read) runs in fp32 instead: on CPUs where those kernels stand in (x86 without AVX512_BF16)
    oneDNN's bf16 GEMM ran at ~19 GFLOP/s, against 35-126 for fp32 at 16-512 rows (2 threads, Zen 3). A bf16 x
    bf16 product is exact in fp32 and the sums are fp32 either way, so the result is the reference's
    (linear_reference) up to the order of the sums."""
    return (
        x.is_cpu
        and x.dtype == torch.bfloat16
        and x.numel() > AVX2_DENSE_MAX_ROWS * x.shape[-1]
        and _no_grad_needed(x, *others)
        and not torch.compiler.is_compiling()
        and avx2_kernel_available()
    )


def _float_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _dequantize_into(qw: QuantizedWeight, out: torch.Tensor) -> torch.Tensor:
    """`dequantize(qw, out.dtype)` written into `out` (contiguous [N, K] on qw's device)."""
    if _dequantize_kernel_takes(qw, out.dtype):
        return torch.ops.qwenlm_kernels.dequantize_out(
            qw.qdata, qw.scales, qw.zeros, qw.bits, qw.kernel_group, qw.in_features, out
        )
    if _avx2_dequantize_takes(qw, out.dtype):
        return torch.ops.qwenlm_avx2.dequantize_out(*_avx2_weight(qw), qw.in_features, out)
    return out.copy_(dequantize_torch(qw, out.dtype))


def _avx2_dequantize_takes(qw: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether the AVX2 dequantize op can write `qw` as `dtype` (the AVX-512 one being absent)."""
    return (
        qw.qdata.is_cpu
        and qw.kernel_compatible
        and dtype in (torch.float32, torch.bfloat16)
        and not torch.compiler.is_compiling()
        and avx2_kernel_available()
    )


def layer_kernels_available() -> bool:
    """Whether the per-token layer kernels (decode attention, RMSNorm, RoPE, argmax) run here: AVX-512's, or
    AVX2's (cpu_layer_ops_avx2.h) on CPUs without AVX-512 outside torch.compile (they have no fake kernels)."""
    return kernels_available() or (not torch.compiler.is_compiling() and avx2_kernel_available())


def _layer_op(name: str):
    """The layer kernel `name` of the library in use (check layer_kernels_available first)."""
    return getattr(torch.ops.qwenlm_kernels if kernels_available() else torch.ops.qwenlm_avx2, name)


def _one_query_kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the one-token attention kernels can take q [B, n, 1, D] against K/V (a cache or pools):
    CPU, bf16/fp32 K/V with a contiguous head dim, no gradient, kernels loaded."""
    return (
        q.device.type == "cpu"
        and q.dim() == 4
        and q.shape[2] == 1
        and k.dtype in (torch.bfloat16, torch.float32)
        and v.dtype == k.dtype
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and _no_grad_needed(q, k, v)
        and layer_kernels_available()
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v for one query per row and head: the decoding step.

    q [B, n, 1, D]; k, v [B, n, T, D] (bf16 or fp32, head dim contiguous: a slice of a KV cache is fine);
    bias: an additive mask [B or 1, 1, 1, T] (rows of a continuous batch), or None. The kernel reads K and
    V once and keeps fp32 sums (torch's SDPA takes 2-7x longer for a single query on CPU); elsewhere
    this is F.scaled_dot_product_attention.
    """
    if (
        _one_query_kernel_takes(q, k, v)
        and k.shape[2] > 0
        and (bias is None or (bias.dim() == 4 and bias.shape[1:3] == (1, 1) and bias.shape[-1] == k.shape[2]))
    ):
        return _layer_op("decode_attention")(q, k, v, 1.0 / math.sqrt(q.shape[-1]), bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def paged_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> torch.Tensor:
    """decode_attention over a paged cache: row b's query attends to its first context_lens[b] tokens, token t
    being slot t % block_size of block block_tables[b, t // block_size] of the pools [num_blocks, n, block_size, D].

    The kernel reads K/V through the table (no gather) with decode_attention's arithmetic, so a paged row
    gives the same numbers as the same tokens in a contiguous cache; block_tables and context_lens are int32.
    Elsewhere (GPU, no kernels): gather the blocks and run SDPA with each row's length as the mask.
    """
    if _one_query_kernel_takes(q, k_pool, v_pool) and block_tables.dtype == context_lens.dtype == torch.int32:
        scale = 1.0 / math.sqrt(q.shape[-1])
        return _layer_op("paged_decode_attention")(q, k_pool, v_pool, block_tables, context_lens, scale)
    return paged_decode_attention_reference(q, k_pool, v_pool, block_tables, context_lens)


def fusable(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether `rms_norm`/`rope` can take x: CPU, bf16/fp32, no gradient, kernels loaded.

    They were written for decoding (one token: torch's version is ~5 tiny dispatches each) and, being
    multi-threaded, are also faster for a 512-token prefill (RoPE 0.26 vs 2.1 ms per call, RMSNorm level).
    """
    return (
        x.is_cpu
        and x.dtype in (torch.bfloat16, torch.float32)
        and x.numel() > 0
        and _no_grad_needed(x, *others)
        and layer_kernels_available()
    )


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) (first maximal index; a NaN counts as the maximum), with the CPU kernel for fp32/bf16.

    Greedy decoding runs it once per token over ~152k logits, where torch's argmax costs ~0.2 ms (fp32).
    """
    if (
        x.is_cpu
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() >= 1
        and x.shape[-1] > 0
        and layer_kernels_available()
    ):
        return _layer_op("argmax_last")(x)
    return x.argmax(dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of qwenlm.model.blocks in one call (check `fusable` first): fp32 normalisation, x's dtype out."""
    return _layer_op("rms_norm")(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qwenlm.model.blocks.apply_rope in one call (check `fusable` first): x [B, n, S, D], cos/sin fp32."""
    return _layer_op("rope")(x, cos, sin)
