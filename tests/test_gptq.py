"""GPTQ / round-to-nearest on random correlated activations: error, ranges, act-order, edge cases."""

from __future__ import annotations

import pytest
import torch

from qwenlm.quant.gptq import (
    HessianAccumulator,
    HessianNotPositiveDefiniteError,
    QuantResult,
    gptq_quantize,
    group_params,
    quantize_rtn,
    reconstruction_error,
)

N, K = 48, 256


def _activations(tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Correlated inputs [tokens, K] with per-feature scales spread over ~e^±2, like LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=gen) / K**0.5
    z = torch.randn(tokens, K, generator=gen)
    return (z @ mix + 0.3 * z) * torch.exp(torch.randn(K, generator=gen))


def _weight(seed: int = 1) -> torch.Tensor:
    return 0.02 * torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calib() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    W, X = _weight(), _activations()
    acc = HessianAccumulator(K)
    for chunk in X.split(300):
        acc.add(chunk)
    return W, X, acc.hessian


def _damped(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    H = H.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    return H


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_rtn_on_reconstruction_error(calib, bits, group_size, desc_act):
    W, X, H = calib
    gptq = gptq_quantize(W, H, bits, group_size, desc_act=desc_act)
    rtn = quantize_rtn(W, bits, group_size)
    err_gptq = reconstruction_error(W, gptq.dequantize(), X)
    err_rtn = reconstruction_error(W, rtn.dequantize(), X)
    # Measured ratios: ~0.6 in natural order, ~0.26 with act-order, for every bits / group size.
    assert err_gptq < 0.8 * err_rtn
    if desc_act:
        assert err_gptq < 0.4 * err_rtn


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 128), (4, -1)])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_loss_equals_exact_quadratic_error(calib, bits, group_size, desc_act):
    """OBS bookkeeping is exact: the summed per-column losses equal 1/2 tr(dW H_damped dW^T)."""
    W, _, H = calib
    result = gptq_quantize(W, H, bits, group_size, desc_act=desc_act)
    dW = result.dequantize().double() - W.double()
    exact = 0.5 * float(torch.einsum("nk,kl,nl->", dW, _damped(H), dW))
    assert result.loss == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_result_shapes_dtypes_and_code_range(calib, method, bits, sym):
    W, _, H = calib
    result = gptq_quantize(W, H, bits, 64, sym=sym) if method == "gptq" else quantize_rtn(W, bits, 64, sym=sym)
    assert result.q.shape == (N, K) and result.q.dtype == torch.uint8
    assert result.scales.shape == (K // 64, N) and result.scales.dtype == torch.float16
    assert result.zeros.shape == (K // 64, N) and result.zeros.dtype == torch.int32
    assert result.g_idx.shape == (K,) and result.g_idx.dtype == torch.int32
    assert int(result.q.max()) <= 2**bits - 1
    assert int(result.zeros.min()) >= 0 and int(result.zeros.max()) <= 2**bits - 1
    assert bool((result.scales > 0).all())
    if sym:
        assert bool((result.zeros == 2 ** (bits - 1)).all())
    torch.testing.assert_close(result.g_idx, torch.arange(K, dtype=torch.int32) // 64, rtol=0, atol=0)


@pytest.mark.parametrize("bits, group_size", [(4, 128), (8, 32), (4, -1)])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_with_identity_hessian_equals_rtn(bits, group_size, desc_act):
    """H = I: the inverse Hessian is diagonal, so no error is spread and GPTQ is plain rounding."""
    W = _weight(seed=3)
    gptq = gptq_quantize(W, torch.eye(K), bits, group_size, desc_act=desc_act)
    rtn = quantize_rtn(W, bits, group_size)
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(gptq, name), getattr(rtn, name)), name


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_dequantized_within_half_a_step(bits, sym):
    W = _weight(seed=4)
    W[0] = 0.0  # an all-zero row must not divide by zero
    result = quantize_rtn(W, bits, 32, sym=sym)
    step = result.scales.float()[result.g_idx.long()].T  # (N, K)
    Wq = result.dequantize()
    assert torch.isfinite(Wq).all()
    # Half a step, plus the fp16 rounding of the scale (relative 2^-11) at the ends of the range.
    assert bool(((W - Wq).abs() <= step * (0.5 + 2**-11 * 2**bits)).all())
    assert bool((Wq[0] == 0).all())


def test_gptq_dequantized_close_to_weights(calib):
    """GPTQ moves weights to compensate errors, but stays within a couple of steps of them."""
    W, _, H = calib
    result = gptq_quantize(W, H, 4, 32)
    step = result.scales.float()[result.g_idx.long()].T
    error = (W - result.dequantize()).abs() / step
    assert float(error.mean()) < 1.0
    assert float(error.max()) < 8.0


def test_dequantize_matches_formula_and_dtype():
    result = QuantResult(
        q=torch.tensor([[0, 15, 8, 3]], dtype=torch.uint8),
        scales=torch.tensor([[0.5], [0.25]], dtype=torch.float16),
        zeros=torch.tensor([[8], [2]], dtype=torch.int32),
        g_idx=torch.tensor([0, 1, 1, 0], dtype=torch.int32),
        bits=4,
    )
    expected = torch.tensor([[0.5 * (0 - 8), 0.25 * (15 - 2), 0.25 * (8 - 2), 0.5 * (3 - 8)]])
    assert torch.equal(result.dequantize(), expected)
    assert result.dequantize(torch.float16).dtype == torch.float16


def test_act_order_groups_follow_hessian_diagonal(calib):
    W, _, H = calib
    result = gptq_quantize(W, H, 4, 32, desc_act=True)
    order = torch.argsort(torch.diag(H), descending=True, stable=True)
    expected = torch.empty(K, dtype=torch.int32)
    expected[order] = torch.arange(K, dtype=torch.int32) // 32
    assert torch.equal(result.g_idx, expected)
    assert torch.equal(torch.bincount(result.g_idx.long()), torch.full((K // 32,), 32))
    static = gptq_quantize(W, H, 4, 32, desc_act=True, static_groups=True)
    assert torch.equal(static.g_idx, torch.arange(K, dtype=torch.int32) // 32)


def test_static_groups_use_parameters_of_the_original_weights(calib):
    W, X, H = calib
    result = gptq_quantize(W, H, 4, 32, desc_act=True, static_groups=True)
    assert torch.equal(result.scales, quantize_rtn(W, 4, 32).scales)
    assert reconstruction_error(W, result.dequantize(), X) < reconstruction_error(
        W, quantize_rtn(W, 4, 32).dequantize(), X
    )


@pytest.mark.parametrize("block_size", [16, 48, 96, 256])
def test_block_size_does_not_change_the_result_much(calib, block_size):
    """Lazy batching is an exact rewrite up to float rounding, including blocks that do not align
    with groups (the block is then adjusted so no group straddles a boundary)."""
    W, _, H = calib
    reference = gptq_quantize(W, H, 4, 64, block_size=128)
    result = gptq_quantize(W, H, 4, 64, block_size=block_size)
    assert result.loss == pytest.approx(reference.loss, rel=0.02)
    assert float((result.q != reference.q).float().mean()) < 0.02


def test_dead_inputs_are_quantized_to_zero(calib):
    W, X, _ = calib
    X = X.clone()
    X[:, [5, 77]] = 0.0
    acc = HessianAccumulator(K)
    acc.add(X)
    result = gptq_quantize(W, acc.hessian, 4, 32, desc_act=True)
    Wq = result.dequantize()
    assert torch.isfinite(Wq).all()
    assert bool((Wq[:, [5, 77]] == 0).all())
    assert reconstruction_error(W, Wq, X) < reconstruction_error(W, quantize_rtn(W, 4, 32).dequantize(), X)


def test_hessian_accumulator_matches_one_shot_formula():
    X = _activations(tokens=700, seed=5)
    acc = HessianAccumulator(K)
    for chunk in (X[:1], X[1:301].view(3, 100, K), X[301:301], X[301:]):  # ragged, batched and empty adds
        acc.add(chunk)
    expected = 2 / X.shape[0] * X.double().T @ X.double()
    assert acc.count == 700
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_not_positive_definite_hessian_raises_clear_error():
    with pytest.raises(HessianNotPositiveDefiniteError, match="damp_percent"):
        gptq_quantize(_weight(), -torch.eye(K), 4, 32)


@pytest.mark.parametrize("bad", [dict(group_size=100), dict(group_size=0), dict(bits=9), dict(bits=1)])
def test_bad_arguments_raise(calib, bad):
    W, _, H = calib
    args = dict(bits=4, group_size=32) | bad
    with pytest.raises(ValueError):
        gptq_quantize(W, H, **args)
    with pytest.raises(ValueError):
        quantize_rtn(W, **args)


def test_hessian_shape_mismatch_raises():
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq_quantize(_weight(), torch.eye(K - 1), 4, 32)


def test_group_params_symmetric_scale_and_asymmetric_zero():
    w = torch.tensor([[-1.0, 0.5, 0.25], [0.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    scale, zero = group_params(w, bits=4, sym=True)
    torch.testing.assert_close(scale, torch.tensor([2 / 15, 2 / 15, 1.2 / 15]).half().float())
    assert zero.tolist() == [8.0, 8.0, 8.0]
    scale, zero = group_params(w, bits=4, sym=False)
    torch.testing.assert_close(scale, torch.tensor([1.5 / 15, 2 / 15, 0.6 / 15]).half().float())
    assert zero.tolist() == [10.0, 8.0, 0.0]  # round(1 / 0.1) = 10; the [0, 0.6] row starts at 0
