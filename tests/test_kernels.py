"""CPU matrix-vector kernels (qwenlm.kernels) against the pure-torch reference, plus the fallbacks.

Tolerances are relative to the output scale (max |reference|):
  * fp32 output: 2e-5 (fp32 accumulation in another order; int4 with fp32 x also carries the
    +128 offset trick's cancellation, measured ~3e-6);
  * bf16 output: 8e-3 (one bf16 rounding of the output is 2^-9 relative per element; the bf16 fallback
    for quantized weights also rounds the dequantised weight to bf16).
Kernel tests are skipped when the kernels cannot be built on this machine; fallback tests always run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwenlm import kernels
from qwenlm.kernels import cpu as kcpu
from qwenlm.kernels.quant import dequantize as dequantize_torch
from qwenlm.kernels.quant import pack_int4, pack_int6, pack_int8, unpack_int4, unpack_int6, unpack_int8
from qwenlm.kernels.reference import dequantize_codes, linear_quantized_reference, linear_reference

needs_kernels = pytest.mark.skipif(
    not kernels.load_kernels(), reason=f"kernels unavailable: {kernels.kernels_status()}"
)
# RMSNorm, RoPE, decode attention and argmax: AVX-512's kernels, or AVX2's on CPUs without AVX-512
needs_layer_kernels = pytest.mark.skipif(
    not kernels.layer_kernels_available(), reason=f"no layer kernels: {kernels.kernels_status()}"
)

DENSE_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32)]
ROWS = [1, 3, 16, 17, 64]
# (K, group): multiples of the chunk, padded K (96, 100), per-channel, groups of 1/4, 1/2 and whole chunks.
QUANT_SHAPES = [(256, 32), (256, 128), (256, 256), (96, 32), (100, 100), (192, 64), (256, 16)]
QUANT_BITS = [4, 6, 8]


def _quant_op(bits: int):
    return getattr(torch.ops.qwenlm_kernels, f"linear_int{bits}")


def test_kernels_build_where_the_cpu_can_run_them():
    """On a CPU with the required AVX-512 flags and a C++ compiler the kernels must load: a build error would
    otherwise turn every kernel test below into a skip, and a green run would hide kernels that are gone."""
    _skip_unless_buildable(kcpu._REQUIRED_CPU_FLAGS)
    assert kernels.kernels_available(), kernels.kernels_status()
    assert kernels.fused_step_available(), "the fused decode step's library did not build (see the log)"


def _skip_unless_buildable(cpu_flags) -> None:
    """Skip where a kernel library needing these CPU flags cannot be built: a flag or a C++ compiler is missing,
    or QWENLM_DISABLE_KERNELS is set."""
    import shutil

    missing = [f for f in cpu_flags if f not in kcpu._cpu_flags()]
    if missing or shutil.which(os.environ.get("CXX", "c++")) is None or kcpu._disabled():
        pytest.skip(f"this host cannot build them (missing {missing or 'a C++ compiler'})")


@pytest.fixture
def disable_kernels(monkeypatch):
    """QWENLM_DISABLE_KERNELS=1 (read once per process, so the cached value is reset around the test)."""
    monkeypatch.setenv("QWENLM_DISABLE_KERNELS", "1")
    kcpu._disabled.cache_clear()
    yield
    kcpu._disabled.cache_clear()  # re-read after monkeypatch restores the environment


@pytest.fixture
def env_allows_kernels(monkeypatch):
    """For tests about the build/load state itself, whatever QWENLM_DISABLE_KERNELS the suite runs with."""
    monkeypatch.delenv("QWENLM_DISABLE_KERNELS", raising=False)
    kcpu._disabled.cache_clear()
    yield
    kcpu._disabled.cache_clear()


def _tol(dtype: torch.dtype) -> float:
    return 8e-3 if dtype == torch.bfloat16 else 2e-5


def _assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.float().abs().max().item()
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= _tol(dtype) * scale, f"max error {err:.3e} vs output scale {scale:.3e}"


def _codes(n: int, k: int, bits: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(0, 1 << bits, (n, k // group), generator=gen).float()  # callers may pass float zeros
    return q, scales, zeros


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------- dense kernel


@needs_kernels
@pytest.mark.parametrize("xdtype,wdtype", DENSE_DTYPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(37, 100), (64, 256), (5, 33)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_dense_kernel_matches_reference(xdtype, wdtype, m, n, k, has_bias):
    x = _x(m, k, xdtype)
    w = torch.randn(n, k).to(wdtype)
    bias = torch.randn(n).to(wdtype) if has_bias else None
    y = torch.ops.qwenlm_kernels.linear_dense(x, w, bias)
    _assert_close(y, linear_reference(x, w, bias), xdtype)


@needs_kernels
@pytest.mark.parametrize("bits", [0, 8, 6, 4])
@pytest.mark.parametrize("m", [1, 3])
def test_kernel_outputs_do_not_depend_on_the_thread_count(bits, m):
    # Each thread count splits the tiles differently; a row's arithmetic must not depend on who computes it.
    # 1003 rows: a partial last tile.
    n, k = 1003, 256
    x = _x(m, k, torch.bfloat16)
    if bits:
        q, s, z = _codes(n, k, bits, 128)
        qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=128)
        op = _quant_op(bits)
        args = (qw.qdata, qw.scales, qw.zeros, qw.kernel_group, k, None)
    else:
        op, args = torch.ops.qwenlm_kernels.linear_dense, (torch.randn(n, k).to(torch.bfloat16), None)
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs += [op(x, *args), op(x, *args)]
    finally:
        torch.set_num_threads(before)
    for y in outputs[1:]:
        assert torch.equal(y, outputs[0])


@needs_kernels
@pytest.mark.parametrize(
    "bits,group,xdtype",
    [(8, 256, torch.float32), (8, 128, torch.float32), (6, 128, torch.bfloat16), (6, 128, torch.float32),
     (4, 128, torch.bfloat16), (4, 128, torch.float32), (4, 32, torch.bfloat16)],
)  # fmt: skip
def test_one_row_equals_that_row_of_a_batch_bit_for_bit(bits, group, xdtype, quant_kernel):
    # Decoding (one row) finishes a tile's sums in its own vectorised reduction; it must add in the order the
    # several-row path does. 1003 rows: full tiles and a partial one; a bias, and bf16 outputs, go through the
    # one-row store too. (int8 with bf16 activations is left out: its one-row path sums whole groups before
    # scaling, a different order by design, so there a row alone and in a batch differ in the last bits.)
    n, k = 1003, 256
    q, s, z = _codes(n, k, bits, group)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=group)
    x, bias = _x(3, k, xdtype), torch.randn(n)
    for b in (None, bias):
        batch = _quant_op(bits)(x, qw.qdata, qw.scales, qw.zeros, qw.kernel_group, k, b)
        for row in range(3):
            one = _quant_op(bits)(x[row : row + 1], qw.qdata, qw.scales, qw.zeros, qw.kernel_group, k, b)
            assert torch.equal(one, batch[row : row + 1])


@needs_kernels
def test_dense_bf16_kernel_equals_torch_bf16_linear_up_to_output_rounding():
    # Exact bf16 products + fp32 accumulation is what torch's bf16 matmul computes: outputs agree to ~1 ulp.
    x, w = _x(4, 512, torch.bfloat16), torch.randn(96, 512).to(torch.bfloat16)
    y = torch.ops.qwenlm_kernels.linear_dense(x, w, None).float()
    ref = torch.nn.functional.linear(x, w).float()
    assert ((y - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()


@needs_kernels
def test_linear_uses_kernel_for_few_rows_and_handles_leading_dims(monkeypatch):
    calls = []
    op = torch.ops.qwenlm_kernels.linear_dense
    monkeypatch.setattr(kcpu, "_dense_op", lambda *a: calls.append(1) or op(*a))
    x = _x(4, 64, torch.bfloat16).view(2, 2, 64)
    w, b = torch.randn(40, 64).to(torch.bfloat16), torch.randn(40).to(torch.bfloat16)
    with torch.inference_mode():
        y = kernels.linear(x, w, b)
    assert y.shape == (2, 2, 40) and calls == [1]
    _assert_close(y, linear_reference(x, w, b), torch.bfloat16)
    with torch.inference_mode():
        kernels.linear(_x(kernels.DENSE_MAX_ROWS[torch.bfloat16, torch.bfloat16] + 1, 64, torch.bfloat16), w, b)
    assert calls == [1], "above DENSE_MAX_ROWS the torch GEMM path must be used"


def test_dense_row_limits_follow_the_cpu():
    """On AMX CPUs oneDNN's bf16 GEMM beats the kernel from 8 rows (a batched decode step): few rows only there;
    fp32 activations on bf16 weights keep the kernel (torch has no fast mixed path); elsewhere 64 rows."""
    for flags, bf16_rows in (({"avx512f", "avx512_bf16"}, 64), ({"avx512f", "amx_tile", "amx_bf16"}, 4)):
        limits = kcpu.dense_row_limits(flags)
        assert limits[torch.bfloat16, torch.bfloat16] == bf16_rows
        assert limits[torch.float32, torch.bfloat16] == 64
        assert (torch.bfloat16, torch.float32) not in limits  # no kernel for bf16 x on fp32 weights
    assert kernels.DENSE_MAX_ROWS is kcpu.dense_row_limits(kcpu._cpu_flags())


@pytest.mark.parametrize("xdtype,wdtype", DENSE_DTYPES + [(torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("m", [1, 17, 65])
def test_linear_wrapper_matches_reference_any_path(xdtype, wdtype, m):
    x, w, b = _x(m, 100, xdtype), torch.randn(37, 100).to(wdtype), torch.randn(37)
    with torch.no_grad():
        y = kernels.linear(x, w, b)
    # Same-dtype bf16 falls back to torch's bf16 F.linear (bias rounded to bf16): allow one more bf16 step.
    _assert_close(y, linear_reference(x, w, b), xdtype)


def test_linear_keeps_autograd_when_gradients_are_needed():
    x = torch.randn(2, 32, requires_grad=True)
    w = torch.randn(8, 32)
    y = kernels.linear(x, w)
    assert y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 32))


def test_large_fp32_inputs_match_torch_and_keep_autograd():
    """Above DENSE_MAX_ROWS, fp32 inference takes oneDNN's GEMM (where available): same values as F.linear up
    to summation order; with gradients needed it must stay on F.linear (oneDNN's op has no autograd)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, kernels.DENSE_MAX_ROWS[torch.float32, torch.float32] + 37, 96, generator=gen)
    w, b = torch.randn(40, 96, generator=gen), torch.randn(40, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kernels.linear(x[:, ::2], w), F.linear(x[:, ::2], w), rtol=1e-5, atol=1e-4)
        assert kernels.linear(x[:, :0], w, b).shape == (2, 0, 40)
    xg = x.clone().requires_grad_()
    kernels.linear(xg, w, b).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand_as(x))


# ------------------------------------------------------------------------------------------ quantized layout


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("k,group", QUANT_SHAPES)
def test_pack_roundtrip_and_dequantize_are_exact(bits, k, group):
    q, s, z = _codes(13, k, bits, group)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=group)
    codes = kernels.unpack_codes(qw)
    assert torch.equal(codes[:, :k], q) and not codes[:, k:].any()
    ref = dequantize_codes(q, s, z, group)
    for dtype in (torch.float32, torch.bfloat16):  # the C++ dequantize (when available) and the torch one
        assert torch.equal(kernels.dequantize(qw, dtype), ref.to(dtype))
        assert torch.equal(dequantize_torch(qw, dtype), ref.to(dtype))


def test_int4_int6_and_int8_byte_layouts_roundtrip_and_byte_order():
    codes = torch.randint(0, 16, (3, 256), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    assert torch.equal(unpack_int8(pack_int8(codes)), codes)
    codes6 = torch.randint(0, 64, (3, 256), dtype=torch.uint8)
    assert torch.equal(unpack_int6(pack_int6(codes6)), codes6)
    assert pack_int6(codes6).shape == (3, 192)
    # int6: a chunk's first 64 bytes are int4's nibbles of the low four bits; high byte i (bytes 64..95) holds
    # the top bits of nibble byte i's low and high codes, then those of nibble byte i + 32.
    assert torch.equal(pack_int6(codes6).view(3, 2, 96)[:, :, :64].reshape(3, 128), pack_int4(codes6 & 15))
    c = torch.zeros(1, 128, dtype=torch.uint8)
    c[0, 0], c[0, 64] = 0x10, 0x20  # byte 0's low-nibble code (top bits 01) and high-nibble code (10)
    c[0, 112] = 0x30  # stored element 112 = 64 + 32*1 + 8*2: the high nibble of byte 16*2 + 8 = 40 (top bits 11)
    packed = pack_int6(c)
    assert packed[0, 64] == 0b1001 and packed[0, 64 + 8] == 0b1100_0000
    assert pack_int8(torch.arange(64, dtype=torch.uint8).view(1, 64))[0, :5].tolist() == [0, 16, 32, 48, 1]
    # Byte 0 of a chunk holds stored element 0 (low nibble) and element 64 (high nibble).
    c = torch.zeros(1, 128, dtype=torch.uint8)
    c[0, 0], c[0, 64], c[0, 8] = 1, 2, 3
    packed = pack_int4(c)
    assert packed[0, 0] == 0x21 and packed[0, 16] == 3  # element 8 = 8*L with L=1 -> byte 16


def test_quantized_weight_tensors_roundtrip_and_move():
    q, s, z = _codes(8, 128, 4, 32)
    qw = kernels.pack_quantized(q, s, z, bits=4, group_size=32)
    tensors = qw.to_tensors()
    assert set(tensors) == {"qdata", "scales", "zeros", "qmeta"}
    back = kernels.QuantizedWeight.from_tensors(tensors)
    assert (back.bits, back.group_size, back.in_features, back.out_features) == (4, 32, 128, 8)
    assert torch.equal(kernels.dequantize(back), kernels.dequantize(qw))
    meta = qw.to("meta")
    assert meta.device.type == "meta" and meta.scales.device.type == "meta"
    y = kernels.linear_quantized(torch.randn(2, 128, device="meta"), meta)  # non-CPU: dequantize + F.linear
    assert y.shape == (2, 8) and y.device.type == "meta"


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, s, z: (q + 16, s, z), "codes"),
        (lambda q, s, z: (q, s[:, :1], z), "scales"),
        (lambda q, s, z: (q, s, z + 0.5), "integers"),
        (lambda q, s, z: (q.float(), s, z), "integer tensor"),
    ],
)
def test_pack_quantized_rejects_bad_input(change, match):
    q, s, z = _codes(4, 64, 4, 32)
    with pytest.raises(ValueError, match=match):
        kernels.pack_quantized(*change(q.to(torch.int32), s, z), bits=4, group_size=32)
    with pytest.raises(ValueError, match="divide"):
        kernels.pack_quantized(q, s, z, bits=4, group_size=48)


# ---------------------------------------------------------------------------------------- quantized kernels


@pytest.fixture(params=kcpu.QUANT_KERNELS)
def quant_kernel(request):
    """Each kernel for quantized linears with bf16 activations in turn (restoring the process default)."""
    if not kernels.load_kernels():
        pytest.skip(f"kernels unavailable: {kernels.kernels_status()}")
    try:
        previous = kcpu.set_quant_kernel(request.param)
    except RuntimeError as e:  # a CPU without AVX512_VNNI + AVX512_VBMI: the build has no integer path
        pytest.skip(str(e))
    yield request.param
    kcpu.set_quant_kernel(previous)


@needs_kernels
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("k,group", QUANT_SHAPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", ROWS)
def test_quantized_kernel_matches_reference(bits, k, group, xdtype, m, quant_kernel):
    x, qw, bias, reference = _kernel_case(bits, k, group, xdtype, m)
    y = _quant_op(bits)(x, qw.qdata, qw.scales, qw.zeros, qw.kernel_group, k, bias)
    _assert_close(y, reference, xdtype)


def _kernel_case(bits: int, k: int, group: int, xdtype: torch.dtype, m: int):
    """(x, packed weight, bias or None, the reference output) of a kernel test; skips layouts no kernel takes."""
    n = 37
    q, s, z = _codes(n, k, bits, group)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=group)
    if not qw.kernel_compatible:
        pytest.skip("layout not supported by the kernel (the wrapper falls back)")
    bias = torch.randn(n) if m % 2 else None
    x = _x(m, k, xdtype)
    return x, qw, bias, linear_quantized_reference(x, q, s, z, group, bias)


needs_avx2 = pytest.mark.skipif(not kcpu._load_avx2().ok, reason=f"no AVX2 kernel: {kcpu._load_avx2().status}")


def test_avx2_kernels_build_where_the_cpu_can_run_them():
    """As for the AVX-512 kernels: a build error must fail here, not turn every AVX2 test into a skip."""
    _skip_unless_buildable(("avx2", "fma"))
    assert kcpu._load_avx2().ok, kcpu._load_avx2().status
    if not kernels.kernels_available():  # where they are the kernels in use: the layer ops and the fused step too
        assert kernels.layer_kernels_available()
        assert kcpu._layer_op("rms_norm") is torch.ops.qwenlm_avx2.rms_norm
        assert kernels.fused_step_available(), "the fused decode step's AVX2 build did not build (see the log)"


@needs_avx2
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("k,group", QUANT_SHAPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
def test_avx2_kernel_matches_reference(bits, k, group, xdtype, m):
    """The kernel for CPUs without AVX-512 (built and run on any AVX2 CPU): every layout the AVX-512 kernels
    take, 1-4 rows and 7 (blocks of 4 and 3), with and without bias, against the torch definition."""
    x, qw, bias, reference = _kernel_case(bits, k, group, xdtype, m)
    with torch.inference_mode():
        _assert_close(kcpu._avx2_linear(x, qw, bias), reference, xdtype)


@needs_avx2
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("k,group", QUANT_SHAPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 13])
def test_avx2_gemm_matches_reference(bits, k, group, xdtype, m):
    """The AVX2 GEMM (a prompt's rows): every layout the row kernel takes, rows in whole and partial register
    tiles (4 activation rows by 3 weight rows; 37 weight rows: a panel of 24 and one of 13), with and without bias."""
    x, qw, bias, reference = _kernel_case(bits, k, group, xdtype, m)
    with torch.inference_mode():
        _assert_close(kcpu._avx2_linear(x, qw, bias, op="gemm_quantized"), reference, xdtype)


@needs_avx2
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 2304), (4, 32)])
def test_avx2_gemm_rows_do_not_depend_on_the_batch(bits, group):
    """K past one block (2304 = 1024 + 1024 + 256) and rows past one pass (260 > 256): each row's output equals its
    reference, and equals, bit for bit, the same row's output alone or at another place in another batch."""
    n, k = 53, 2304
    q, s, z = _codes(n, k, bits, group)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=group)
    x, bias = _x(260, k, torch.bfloat16), torch.randn(n)
    with torch.inference_mode():
        y = kcpu._avx2_linear(x, qw, bias, op="gemm_quantized")
        _assert_close(y, linear_quantized_reference(x, q, s, z, group, bias), torch.bfloat16)
        for i in (0, 3, 257, 259):
            alone = kcpu._avx2_linear(x[i : i + 1], qw, bias, op="gemm_quantized")
            shifted = kcpu._avx2_linear(torch.cat((x[i : i + 1], x[:6])).flip(0), qw, bias, op="gemm_quantized")
            assert torch.equal(alone[0], y[i]) and torch.equal(shifted[-1], y[i])


@needs_avx2
@pytest.mark.parametrize("k", [1, 7, 8, 100, 2051])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 6, 17])
def test_avx2_dense_gemm_matches_reference(k, xdtype, m):
    """bf16 weights through the AVX2 GEMM: K with and without a tail past the last 8 (zeros in the panel), K past
    one block (2051), partial tiles of activation and weight rows (37 weight rows)."""
    w = torch.randn(37, k).bfloat16()
    bias = torch.randn(37) if m % 2 else None
    x = _x(m, k, xdtype)
    y = torch.ops.qwenlm_avx2.gemm_bf16(x, w, bias)
    _assert_close(y, linear_reference(x, w, bias), xdtype)
    assert torch.equal(torch.ops.qwenlm_avx2.gemm_bf16(x[-1:], w, bias)[0], y[-1])


@needs_avx2
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_avx2_gemm_carries_nan_and_inf_through_its_row(bad):
    q, s, z = _codes(37, 256, 4, 128)
    qw = kernels.pack_quantized(q, s, z, bits=4, group_size=128)
    x = _x(9, 256, torch.bfloat16)
    x[4, 17] = bad
    with torch.inference_mode():
        y = kcpu._avx2_linear(x, qw, None, op="gemm_quantized").float()
        dense = torch.ops.qwenlm_avx2.gemm_bf16(x, torch.randn(37, 256).bfloat16(), None).float()
    for out in (y, dense):
        assert not torch.isfinite(out[4]).any() and torch.isfinite(out[torch.arange(9) != 4]).all()


@needs_avx2
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("k,group", [(2048, 128), (2048, 2048), (192, 64), (256, 32), (100, 100)])
@pytest.mark.parametrize("m", [1, 4])
def test_avx2_integer_path_is_exact_within_its_range(bits, k, group, m):
    """bf16 activations with int4/int6 codes take the integer path: x as a per-row fixed-point integer of 22
    bits, exact for every element within 2^14 of the row's largest. On rows inside that range its fp32 result
    (before the output's bf16 rounding, which would hide a few bits lost) must be the exact fp32 path's up to
    fp32 summation: of the products, and of the zero points taken off per group (s z sum x). int8 keeps the
    exact path (the integer one was no faster there): bit for bit the fp32 activations' result."""
    q, s, z = _codes(37, k, bits, group)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=group)
    gen = torch.Generator().manual_seed(2)
    span = 14
    x = torch.rand(m, k, generator=gen).add(1) * torch.randn(m, k, generator=gen).sign() * 2.0 ** (6 - span)
    x[:, 0] = 2.0**6  # the largest: every other element is 2^span to 2^(span - 1) times smaller
    x = x.bfloat16()
    args = (_avx2_order(qw), qw.qdata, qw.scales, qw.zeros, bits, qw.kernel_group, None, True)
    with torch.inference_mode():
        y = torch.ops.qwenlm_avx2.linear_quantized(x, *args)
        exact = torch.ops.qwenlm_avx2.linear_quantized(x.float(), *args)  # the fp32 path (test above)
    assert y.dtype == torch.float32
    if bits == 8:
        assert torch.equal(y, exact)
        return
    w = dequantize_codes(q, s, z, group)
    group_sums = x.float().view(m, -1, group).sum(-1)  # [m, G]
    zero_terms = group_sums.abs() @ (s * z).abs().T  # [m, N]
    slack = 2.0**-20 * (x.float().abs() @ w.abs().T + zero_terms)
    assert ((y - exact).abs() <= slack).all(), f"worst {((y - exact).abs() / slack).max():.2f} x the slack"


def _avx2_order(qw) -> torch.Tensor:
    return kcpu._avx2_order(qw.bits, qw.kernel_group)


@needs_avx2
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("k,group", QUANT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_dequantize_is_the_reference(bits, k, group, dtype):
    """The dense weight for a prompt's GEMM: (q - z) * s in fp32, rounded once to the dtype, for every layout."""
    q, s, z = _codes(37, k, bits, group)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=group)
    if not qw.kernel_compatible:
        pytest.skip("layout not supported by the kernel (the wrapper falls back)")
    out = torch.full((37, k), float("nan"), dtype=dtype)
    torch.ops.qwenlm_avx2.dequantize_out(_avx2_order(qw), qw.qdata, qw.scales, qw.zeros, bits, qw.kernel_group, k, out)
    assert torch.equal(out, dequantize_codes(q, s, z, group).to(dtype))


@needs_avx2
def test_many_bf16_rows_multiply_in_fp32_where_avx512_is_missing(monkeypatch, env_allows_kernels):
    """A prompt's rows (more than the AVX2 kernels take): bf16 weights, dense or dequantized by the AVX2 op, are
    multiplied in fp32 (oneDNN's bf16 GEMM is several times slower there) and the result rounded once to bf16."""
    monkeypatch.setattr(kcpu, "_load", lambda: kcpu._LoadResult(False, "test: CPU lacks avx512f"))
    monkeypatch.setattr(kcpu, "DEQUANT_SLAB_BYTES", 64 * 256 * 4)  # 64 fp32 rows a slab: 203 rows in 4 slabs
    monkeypatch.setattr(kcpu, "AVX2_GEMM_MAX_ROWS", 40)  # more rows than the AVX2 GEMM takes
    q, s, z = _codes(203, 256, 4, 128)
    qw = kernels.pack_quantized(q, s, z, bits=4, group_size=128)
    dense_w = torch.randn(203, 256).bfloat16()
    bias = torch.randn(203).bfloat16()
    x = _x(2 * 25, 256, torch.bfloat16).view(2, 25, 256)  # more rows than the AVX2 kernels take, quantized too
    assert 50 > max(kcpu.AVX2_INT_MAX_ROWS, kcpu.AVX2_DENSE_MAX_ROWS, kcpu.AVX2_GEMM_MAX_ROWS)
    with torch.inference_mode():
        assert torch.equal(kcpu.dequantize(qw, torch.float32), dequantize_codes(q, s, z, 128))  # the AVX2 op
        for w, y in ((dense_w, kernels.linear(x, dense_w, bias)), (qw, kernels.linear_quantized(x, qw, bias))):
            dense = w.float() if isinstance(w, torch.Tensor) else dequantize_codes(q, s, z, 128)
            assert y.dtype == torch.bfloat16 and y.shape == (2, 25, 203)
            assert torch.equal(y, kcpu._torch_linear(x.float(), dense, bias.float()).bfloat16())
    x.requires_grad_()  # training keeps bf16 autograd
    kernels.linear(x, dense_w.requires_grad_(), bias).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


@needs_avx2
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_avx2_integer_path_carries_nan_and_inf_through(bad):
    """A row that is not finite takes the fp32 path (no fixed point exists for it), so the output has the
    reference's NaN/inf pattern instead of the garbage an integer conversion would give."""
    q, s, z = _codes(37, 256, 4, 128)
    qw = kernels.pack_quantized(q, s, z, bits=4, group_size=128)
    x = _x(2, 256, torch.bfloat16)
    x[1, 17] = bad
    with torch.inference_mode():
        y = kcpu._avx2_linear(x, qw, None).float()
    reference = linear_quantized_reference(x, q, s, z, 128).float()
    assert torch.equal(torch.isnan(y), torch.isnan(reference)) and torch.equal(torch.isinf(y), torch.isinf(reference))
    assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).any()


@needs_avx2
@pytest.mark.parametrize("k", [1, 7, 8, 100, 2051])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 11])
def test_avx2_dense_bf16_kernel_matches_reference(k, xdtype, m):
    """bf16 weights on CPUs without AVX-512: K with and without a tail past the last 8 (or 32) weights; one row,
    and a prompt's rows (pairs of weight rows, 4 activation rows at a time, the odd 37th weight row alone)."""
    w = torch.randn(37, k).bfloat16()
    bias = torch.randn(37) if m % 2 else None
    x = _x(m, k, xdtype)
    y = torch.ops.qwenlm_avx2.linear_bf16(x, w, bias)
    _assert_close(y, linear_reference(x, w, bias), xdtype)


@needs_avx2
def test_linear_takes_the_avx2_dense_kernel_where_avx512_is_missing(monkeypatch, env_allows_kernels):
    monkeypatch.setattr(kcpu, "_load", lambda: kcpu._LoadResult(False, "test: CPU lacks avx512f"))
    w, x = torch.randn(40, 2051).bfloat16(), _x(1, 2051, torch.bfloat16).view(1, 1, 2051)
    with torch.inference_mode():
        y = kernels.linear(x, w)
    assert y.shape == (1, 1, 40) and torch.equal(y[0], torch.ops.qwenlm_avx2.linear_bf16(x[0], w, None))
    for m, op in ((kcpu.AVX2_DENSE_MAX_ROWS, "linear_bf16"), (kcpu.AVX2_DENSE_MAX_ROWS + 1, "gemm_bf16")):
        x = _x(m, 2051, torch.bfloat16)  # a prompt's rows: the row op, then the GEMM
        with torch.inference_mode():
            assert torch.equal(kernels.linear(x, w), getattr(torch.ops.qwenlm_avx2, op)(x, w, None))
    with torch.inference_mode():  # fp32 weights stay on torch
        _assert_close(kernels.linear(x[0].float(), w.float()), linear_reference(x[0].float(), w.float()), torch.float32)


@needs_avx2
def test_linear_quantized_takes_the_avx2_kernel_where_avx512_is_missing(monkeypatch, env_allows_kernels):
    """No AVX-512 kernels: bf16 rows up to AVX2_INT_MAX_ROWS (fp32 ones up to AVX2_MAX_ROWS) go through the AVX2
    row op, more rows up to AVX2_GEMM_MAX_ROWS through its GEMM, more still dequantize; all are the reference's
    numbers."""
    monkeypatch.setattr(kcpu, "_load", lambda: kcpu._LoadResult(False, "test: CPU lacks avx512f"))
    calls = []
    real = kcpu._avx2_linear

    def record(x, *args, op="linear_quantized"):
        calls.append((x.shape[0], op))
        return real(x, *args, op=op)

    monkeypatch.setattr(kcpu, "_avx2_linear", record)
    assert kcpu.avx2_kernel_available()
    q, s, z = _codes(24, 256, 4, 128)
    qw = kernels.pack_quantized(q, s, z, bits=4, group_size=128)
    int_rows, gemm_rows = kcpu.AVX2_INT_MAX_ROWS, kcpu.AVX2_GEMM_MAX_ROWS
    cases = [(1, torch.bfloat16), (7, torch.bfloat16), (int_rows, torch.bfloat16), (int_rows + 1, torch.bfloat16)]
    cases += [(gemm_rows, torch.bfloat16), (gemm_rows + 1, torch.bfloat16), (kcpu.AVX2_MAX_ROWS, torch.float32)]
    cases += [(kcpu.AVX2_MAX_ROWS + 1, torch.float32), (1, torch.float16)]  # fp16: a dtype the op does not take
    for m, dtype in cases:
        x = _x(m, 256, dtype)
        with torch.inference_mode():
            y, reference = kernels.linear_quantized(x, qw), linear_quantized_reference(x, q, s, z, 128)
            _assert_close(y, reference, torch.float32 if dtype == torch.float32 else torch.bfloat16)
    row, gemm = "linear_quantized", "gemm_quantized"
    assert calls == [(1, row), (7, row), (int_rows, row), (int_rows + 1, gemm), (gemm_rows, gemm)] + [
        (kcpu.AVX2_MAX_ROWS, row),
        (kcpu.AVX2_MAX_ROWS + 1, gemm),
    ]
    monkeypatch.setenv("QWENLM_DISABLE_KERNELS", "1")
    kcpu._disabled.cache_clear()
    assert not kcpu.avx2_kernel_available()


@needs_kernels
@pytest.mark.parametrize("k,group", [(256, 128), (256, 32), (100, 100)])
@pytest.mark.parametrize("m", [1, 3])
def test_int6_kernel_with_four_bit_codes_equals_the_int4_kernel(k, group, m):
    # int6 runs int4's tiles on codes rebuilt from two planes: with every code < 16 the top-bit plane is zero,
    # so under the dpbf16 kernel the two compute the same products in the same order, bit for bit.
    q, s, z = _codes(29, k, 4, group)
    x = _x(m, k, torch.bfloat16)
    previous = kcpu.set_quant_kernel("dpbf16")
    try:
        y4, y6 = (
            _quant_op(bits)(x, qw.qdata, qw.scales, qw.zeros, qw.kernel_group, k, None)
            for bits in (4, 6)
            for qw in [kernels.pack_quantized(q, s, z, bits=bits, group_size=group)]
        )
    finally:
        kcpu.set_quant_kernel(previous)
    assert torch.equal(y4, y6)


@needs_kernels
def test_int6_decode_without_gfni_gives_the_same_outputs(tmp_path, monkeypatch):
    # int6 codes are rebuilt with GFNI where the compiler targets it (this host, if it has GFNI) and with shifts
    # and masks elsewhere (AVX512_BF16 CPUs without GFNI: Cooper Lake). Build the shift branch as its own op
    # library and check it against the reference and, bit for bit, against the library in use.
    source = Path(kcpu.__file__).with_name("cpu_gemv.cpp")
    assert "!defined(QWENLM_NO_GFNI)" in source.read_text()  # the switch this test flips
    src = tmp_path / "src"
    src.mkdir()
    for path in [source, *source.parent.glob("*.h")]:
        text = path.read_text().replace("qwenlm_kernels", "qwenlm_kernels_nogfni")
        (src / path.name).write_text(("#define QWENLM_NO_GFNI 1\n" if path == source else "") + text)
    monkeypatch.setenv("QWENLM_KERNEL_CACHE", str(tmp_path / "cache"))
    assert kcpu.build_and_load_library(src / "cpu_gemv.cpp", "qwenlm_nogfni").ok
    ops = torch.ops.qwenlm_kernels_nogfni
    previous = kcpu.quant_kernel()
    try:
        for mode, name in enumerate(kcpu.QUANT_KERNELS):
            try:
                kcpu.set_quant_kernel(name)
            except RuntimeError:  # no VNNI path in this build
                continue
            ops.set_quant_kernel(mode)
            for k, group in [(256, 128), (256, 32), (100, 100)]:
                q, s, z = _codes(37, k, 6, group)
                qw = kernels.pack_quantized(q, s, z, bits=6, group_size=group)
                args = (qw.qdata, qw.scales, qw.zeros, qw.kernel_group, k, None)
                x = _x(3, k, torch.bfloat16)
                y = ops.linear_int6(x, *args)
                _assert_close(y, linear_quantized_reference(x, q, s, z, group), torch.bfloat16)
                assert torch.equal(y, torch.ops.qwenlm_kernels.linear_int6(x, *args)), name
                dense = ops.dequantize(qw.qdata, qw.scales, qw.zeros, 6, qw.kernel_group, k, torch.float32)
                assert torch.equal(dense, dequantize_codes(q, s, z, group))
    finally:
        kcpu.set_quant_kernel(previous)


@pytest.mark.parametrize("bits,group", [(8, 256), (8, 128), (8, 32), (6, 128), (6, 32), (4, 128), (4, 32)])
def test_bf16_activations_are_exact_to_the_output_rounding(bits, group, quant_kernel):
    # Per element, not relative to the largest output: each output is within one bf16 rounding of the exact
    # fp32 dot product, for rows mixing a 2^12 outlier with elements down to 2^-30, a zero row, a row of
    # huge values and one of tiny ones (the integer path scales each row to fixed point by its largest |x|).
    k, n = 256, 40
    q, s, z = _codes(n, k, bits, group)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=group)
    x = _x(5, k, torch.float32)
    x[0, 3] = 4096.0
    x[0, 100:140] *= 2.0**-30
    x[1] = 0.0
    x[2] *= 1e30
    x[3] *= 1e-30
    x = x.bfloat16()
    y = _quant_op(bits)(x, qw.qdata, qw.scales, qw.zeros, qw.kernel_group, k, None).float()
    ref = linear_quantized_reference(x.float(), q, s, z, group).double()
    ulp = 2.0**-8 * ref.abs()  # a bf16 rounding is at most half of this
    tiny = 1e-6 * ref.abs().amax(dim=1, keepdim=True)  # cancellation: the sum is far below its terms
    assert ((y.double() - ref).abs() <= ulp + tiny).all()
    assert (y[1] == 0).all()


def test_default_quant_kernel_follows_the_cpu_and_the_environment(monkeypatch, caplog):
    monkeypatch.delenv("QWENLM_QUANT_KERNEL", raising=False)
    spr = {"avx512f", "avx512_bf16", "avx512_vnni", "avx512vbmi", "amx_tile", "amx_bf16"}
    assert kcpu.default_quant_kernel(spr) == "vnni"
    assert kcpu.default_quant_kernel(spr - {"amx_bf16"}) == "dpbf16"  # e.g. AMD Zen 4: dpbf16 is full speed
    assert kcpu.default_quant_kernel(spr - {"avx512vbmi"}) == "dpbf16"
    monkeypatch.setenv("QWENLM_QUANT_KERNEL", "dpbf16")
    assert kcpu.default_quant_kernel(spr) == "dpbf16"
    monkeypatch.setenv("QWENLM_QUANT_KERNEL", "fast")
    assert kcpu.default_quant_kernel(spr) == "vnni"
    assert "ignoring QWENLM_QUANT_KERNEL='fast'" in caplog.text


@needs_kernels
def test_set_quant_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match="dpbf16, vnni"):
        kcpu.set_quant_kernel("amx")
    assert kcpu.quant_kernel() in kcpu.QUANT_KERNELS


@needs_kernels
def test_int4_fp32_activations_keep_full_precision():
    # fp32 x is split into three bf16 parts, not rounded: the error is far below one bf16 rounding of x.
    q, s, z = _codes(64, 512, 4, 128)
    qw = kernels.pack_quantized(q, s, z, bits=4, group_size=128)
    x = _x(2, 512, torch.float32)
    ref = linear_quantized_reference(x, q, s, z, 128)
    with torch.inference_mode():
        y = kernels.linear_quantized(x, qw)
        y_rounded_x = kernels.linear_quantized(x.bfloat16(), qw).float()
    err, err_bf16 = (y - ref).abs().max(), (y_rounded_x - ref).abs().max()
    assert err * 100 < err_bf16


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("k,group", [(256, 32), (100, 100), (256, 16)])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17, 40])
def test_linear_quantized_wrapper_matches_reference_any_path(bits, k, group, xdtype, m):
    q, s, z = _codes(21, k, bits, group)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=group)
    x, bias = _x(m, k, xdtype).view(1, m, k), torch.randn(21)
    with torch.no_grad():
        y = kernels.linear_quantized(x, qw, bias)
    assert y.shape == (1, m, 21)
    _assert_close(y, linear_quantized_reference(x, q, s, z, group, bias), xdtype)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("bits", QUANT_BITS)
def test_many_rows_go_through_slabs_with_the_whole_weights_results(request, monkeypatch, kernels_on, bits):
    # Above QUANT_MAX_ROWS a quantized linear dequantizes; a weight larger than DEQUANT_WHOLE_MAX_BYTES is done in
    # slabs of output rows (the last one short here) through one reused buffer, with the whole weight's results.
    # Where the AVX2 kernels stand in, bf16 rows past AVX2_DENSE_MAX_ROWS are multiplied in fp32
    # (_bf16_gemm_in_fp32), always in slabs; fewer go through the AVX2 dense op on bf16 slabs.
    if not kernels_on:
        request.getfixturevalue("disable_kernels")
    monkeypatch.setattr(kcpu, "AVX2_GEMM_MAX_ROWS", 32)  # where the AVX2 kernels stand in: past their GEMM too

    def in_fp32(m: int) -> bool:
        return kcpu.avx2_kernel_available() and m > kcpu.AVX2_DENSE_MAX_ROWS

    def slabs(m: int) -> list[int]:
        per_slab = 64 * 2 // (4 if in_fp32(m) else 2)
        return [per_slab] * (n // per_slab) + [n % per_slab]

    n, k = 203, 256
    q, s, z = _codes(n, k, bits, 32)
    qw = kernels.pack_quantized(q, s, z, bits=bits, group_size=32)
    bias = torch.randn(n).bfloat16()
    whole = kcpu.linear(_x(40, k, torch.bfloat16), kcpu.dequantize(qw, torch.bfloat16), bias)
    monkeypatch.setattr(kcpu, "DEQUANT_WHOLE_MAX_BYTES", 200 * k * 2)  # 203 rows of bf16 is more
    monkeypatch.setattr(kcpu, "DEQUANT_SLAB_BYTES", 64 * k * 2)  # 64 bf16 rows a slab: 4 slabs
    dense, widths = kcpu.linear, []
    monkeypatch.setattr(kcpu, "linear", lambda x, w, b=None: widths.append(w.shape[0]) or dense(x, w, b))
    for m in (40, 100):  # the dense kernel's rows (on AMX hosts: oneDNN's GEMM), then torch's GEMM
        x = _x(m, k, torch.bfloat16)
        widths.clear()
        with torch.no_grad():
            y = kernels.linear_quantized(x, qw, bias)
        assert widths == slabs(m)
        _assert_close(y, linear_quantized_reference(x, q, s, z, 32, bias), torch.bfloat16)
        if m == 40 and kernels.kernels_available() and kcpu.DENSE_MAX_ROWS[(torch.bfloat16, torch.bfloat16)] >= m:
            assert torch.equal(y, whole)  # the dense kernel's arithmetic per output element is the same
    x = _x(40, k, torch.bfloat16).requires_grad_()
    widths.clear()
    kernels.linear_quantized(x, qw, bias).sum().backward()  # gradients: the whole weight, through autograd
    assert widths == [n] and x.grad is not None
    for m in (40, 100):  # small enough to stay in cache: whole, unless multiplied in fp32
        monkeypatch.setattr(kcpu, "DEQUANT_WHOLE_MAX_BYTES", n * k * (4 if in_fp32(m) else 2))
        widths.clear()
        with torch.no_grad():
            kernels.linear_quantized(_x(m, k, torch.bfloat16), qw, bias)
        assert widths == (slabs(m) if in_fp32(m) else [n])


@needs_kernels
def test_dequantize_out_writes_into_the_given_tensor():
    q, s, z = _codes(9, 256, 6, 128)
    qw = kernels.pack_quantized(q, s, z, bits=6, group_size=128)
    args = (qw.qdata, qw.scales, qw.zeros, 6, qw.kernel_group, 256)
    out = torch.empty(9, 256, dtype=torch.bfloat16)
    assert torch.ops.qwenlm_kernels.dequantize_out(*args, out) is out
    assert torch.equal(out, dequantize_codes(q, s, z, 128).bfloat16())
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.qwenlm_kernels.dequantize_out(*args, torch.empty(8, 256, dtype=torch.bfloat16))


def test_linear_quantized_checks_in_features():
    q, s, z = _codes(4, 64, 8, 64)
    with pytest.raises(ValueError, match="features"):
        kernels.linear_quantized(torch.randn(1, 32), kernels.pack_quantized(q, s, z, bits=8, group_size=64))


# ------------------------------------------------------------------------------------------------- fallback


def _fallback_cases():
    x = _x(3, 96, torch.float32)
    w = torch.randn(24, 96)
    q, s, z = _codes(24, 96, 4, 32)
    return x, w, q, s, z, kernels.pack_quantized(q, s, z, bits=4, group_size=32)


@pytest.mark.parametrize("how", ["env", "unavailable"])
def test_fallback_paths_give_reference_results(request, monkeypatch, how):
    if how == "env":
        request.getfixturevalue("disable_kernels")
        assert kernels.kernels_status() == "disabled by QWENLM_DISABLE_KERNELS"
    else:
        request.getfixturevalue("env_allows_kernels")
        monkeypatch.setattr(kcpu, "_load", lambda: kcpu._LoadResult(False, "test: no kernels"))
        assert kernels.kernels_status() == "test: no kernels"
    assert not kernels.kernels_available() and not kernels.load_kernels()
    x, w, q, s, z, qw = _fallback_cases()
    with torch.inference_mode():
        _assert_close(kernels.linear(x, w), linear_reference(x, w), torch.float32)
        _assert_close(kernels.linear(x, w.bfloat16()), linear_reference(x, w.bfloat16()), torch.float32)
        _assert_close(kernels.linear_quantized(x, qw), linear_quantized_reference(x, q, s, z, 32), torch.float32)
        xb = x.bfloat16()
        _assert_close(kernels.linear_quantized(xb, qw), linear_quantized_reference(xb, q, s, z, 32), torch.bfloat16)


@needs_kernels
def test_kernel_and_fallback_agree(request):
    x, w, q, s, z, qw = _fallback_cases()
    with torch.inference_mode():
        fast = kernels.linear(x, w), kernels.linear_quantized(x, qw)
        request.getfixturevalue("disable_kernels")
        slow = kernels.linear(x, w), kernels.linear_quantized(x, qw)
    for a, b in zip(fast, slow, strict=True):
        _assert_close(a, b, torch.float32)


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog, env_allows_kernels):
    monkeypatch.setattr(kcpu, "_build_and_load", lambda: (_ for _ in ()).throw(RuntimeError("no compiler")))
    fresh = kcpu.functools.cache(kcpu._load.__wrapped__)
    monkeypatch.setattr(kcpu, "_load", fresh)
    with caplog.at_level("WARNING", logger="qwenlm.kernels.cpu"):
        assert not kernels.kernels_available() and not kernels.kernels_available()
    assert "no compiler" in kernels.kernels_status()
    assert sum("unavailable" in r.message for r in caplog.records) == 1


def test_a_cpu_without_avx512_falls_back_without_an_error(monkeypatch, env_allows_kernels):
    """An AVX2-only CPU (an AMD Zen 3, most desktop Intel parts): nothing is built, the status names what is
    missing and every caller takes the torch path (this crashed every command with an AttributeError once)."""
    monkeypatch.setattr(kcpu, "_cpu_flags", lambda: {"avx", "avx2", "fma", "f16c"})
    monkeypatch.setattr(kcpu, "_load", kcpu.functools.cache(kcpu._load.__wrapped__))
    assert not kernels.kernels_available() and not kernels.load_kernels()
    assert "CPU lacks avx512f, avx512bw, avx512vl, avx512_bf16" in kernels.kernels_status()
    assert kcpu.quant_kernel() is None
    with pytest.raises(RuntimeError, match="unavailable"):
        kcpu.set_quant_kernel("dpbf16")
    x, w, q, s, z, qw = _fallback_cases()
    with torch.inference_mode():
        _assert_close(kernels.linear_quantized(x, qw), linear_quantized_reference(x, q, s, z, 32), torch.float32)


@needs_kernels
def test_import_does_not_compile_and_cached_build_loads_in_a_new_process():
    code = (
        "import qwenlm, qwenlm.kernels as k, qwenlm.kernels.cpu as c\n"
        "assert c._load.cache_info().currsize == 0, 'import must not build or load the kernels'\n"
        "assert k.load_kernels(), k.kernels_status()\n"
    )
    env = {**os.environ, "QWENLM_DISABLE_KERNELS": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ------------------------------------------------------------------------------------- fused per-token ops


@needs_layer_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 5, 64), (7, 96), (1, 300, 256), (2, 72)])
def test_fused_rms_norm_matches_the_model_norm(dtype, shape):
    from qwenlm.model.blocks import RMSNorm

    norm = RMSNorm(shape[-1], 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=torch.Generator().manual_seed(2)) * 0.1 + 1)
        x = _x(int(torch.tensor(shape[:-1]).prod()), shape[-1], dtype).view(shape) * 3
        norm_module_path = torch.nn.functional.rms_norm(x.float(), (shape[-1],), eps=1e-6).to(dtype) * norm.weight
        fused = kernels.rms_norm(x, norm.weight, 1e-6)
    assert fused.dtype == dtype and fused.shape == x.shape
    # Same roundings; the sum of squares is accumulated more widely, so fp32 may differ by an ulp or two.
    torch.testing.assert_close(fused, norm_module_path, rtol=4e-7 if dtype == torch.float32 else 0, atol=1e-7)


@needs_layer_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,seq,rotary,head,per_row", [(1, 1, 128, 128, False), (2, 3, 64, 128, True),
                                                           (2, 1, 32, 32, False), (1, 200, 64, 64, False),
                                                           (1, 2, 20, 24, False)])  # fmt: skip
def test_fused_rope_equals_the_torch_formula_bit_for_bit(dtype, batch, seq, rotary, head, per_row):
    from qwenlm.model.blocks import rotate_half

    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(batch, seq, 3, 4, head, generator=gen).to(dtype)
    q = qkv.permute(2, 0, 3, 1, 4).unbind(0)[0]  # a strided view, as the attention layer has it
    angles = torch.randn(batch if per_row else 1, 1, seq, rotary // 2, generator=gen) * 50
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    qf = q.float()
    rotated = qf[..., :rotary] * cos + rotate_half(qf[..., :rotary]) * sin
    expected = torch.cat((rotated, qf[..., rotary:]), dim=-1).to(dtype)
    fused = kernels.rope(q, cos, sin)
    assert fused.is_contiguous() and torch.equal(fused, expected)


def test_fusable_only_for_cpu_float_inputs_without_gradients():
    x = torch.randn(1, 1, 64)
    assert kernels.fusable(x) == kernels.fusable(torch.randn(1, 512, 64)) == kernels.layer_kernels_available()
    assert not kernels.fusable(torch.randn(1, 1, 64, requires_grad=True))
    assert not kernels.fusable(x.half())
    assert not kernels.fusable(torch.randn(0, 64))


# ---------------------------------------------------------------------------------------------- argmax


@needs_layer_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 151936])
def test_argmax_equals_torch_first_maximum_and_nan(dtype, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=gen).to(dtype)
    x[1] = -float("inf")  # all -inf: index 0
    x[2, n // 2 :] = x[2].max() + 1  # ties: the first of them
    x[3] = torch.randint(-3, 3, (n,), generator=gen).to(dtype)  # many ties
    x[4, n - 1] = 1e30  # the maximum in the tail
    x[5, n // 3] = float("nan")  # torch treats NaN as the maximum
    x[5, n - 1] = float("nan")
    got = kernels.argmax(x)
    assert got.dtype == torch.long and torch.equal(got, x.argmax(dim=-1))
    assert torch.equal(kernels.argmax(x[0]), x[0].argmax())  # one row, 0-d result
    assert torch.equal(kernels.argmax(x.view(2, 3, n)), x.view(2, 3, n).argmax(dim=-1))


def test_argmax_falls_back_where_the_kernel_does_not_apply(disable_kernels):
    x = torch.randn(3, 50, dtype=torch.float64)
    assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))
    assert torch.equal(kernels.argmax(x.float()), x.float().argmax(dim=-1))
