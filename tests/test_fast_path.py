"""The decode fast path (CPU kernels, 16-bit decode attention) computes the same model as the plain path."""

from __future__ import annotations

import pytest
import torch
from token_ids import random_ids

from qwenlm import kernels
from qwenlm.generation.generate import generate_steps
from qwenlm.generation.params import SamplingParams
from qwenlm.kernels import cpu as kcpu
from qwenlm.model import KVCache, load_model

# Max |logit difference| allowed, relative to the logits' spread: fp32 differs by summation order only;
# bf16 by the rounding of each layer's output, which a different summation order can flip.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _decode_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits of a prefill followed by `steps` one-token decode steps fed with the prompt's own tokens."""
    with torch.inference_mode():
        cache = KVCache.for_model(model, batch_size=ids.shape[0], capacity=ids.shape[1])
        prefix = ids.shape[1] - steps
        out = [model(ids[:, :prefix], past_key_values=cache).logits[:, -1]]
        for t in range(prefix, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(out, dim=1).float()


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request, tiny_checkpoint):
    return load_model(tiny_checkpoint, torch_dtype=request.param, progress=False)


def test_kernels_and_plain_linear_give_the_same_logits(model):
    ids = random_ids(2, 24, seed=3)
    model.use_kernels(True)
    fast = _decode_logits(model, ids, steps=12)
    model.use_kernels(False)
    plain = _decode_logits(model, ids, steps=12)
    model.use_kernels(True)
    spread = plain.std().item()
    assert spread > 0
    assert (fast - plain).abs().max().item() <= TOLERANCE[model.dtype] * max(spread, 1.0)


def test_decode_with_a_cache_equals_full_recomputation(model):
    """Covers the 16-bit one-token attention path (fp32 SDPA on upcast K/V) against a cache-free forward."""
    ids = random_ids(1, 20, seed=4)
    decoded = _decode_logits(model, ids, steps=8)[:, 1:]
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits[:, -8:].float()
    assert (decoded - full).abs().max().item() <= TOLERANCE[model.dtype] * max(full.std().item(), 1.0)


def test_greedy_tokens_match_with_and_without_kernels(tiny_checkpoint):
    model = load_model(tiny_checkpoint, torch_dtype=torch.float32, progress=False)
    params = SamplingParams(max_new_tokens=24, do_sample=False, eos_token_ids=(), stop_words_ids=())
    prompt = random_ids(1, 16, seed=5)[0].tolist()

    def greedy() -> list[int]:
        return [step.token_ids[0] for step in generate_steps(model, [prompt], params)]

    model.use_kernels(True)
    fast = greedy()
    model.use_kernels(False)
    assert greedy() == fast
    assert len(fast) == 24


def test_kernel_path_is_taken_when_available(tiny_model):
    """The comparison above would be vacuous if the kernels never ran: say which path this machine takes."""
    if not kernels.kernels_available():
        pytest.skip(f"CPU kernels unavailable here: {kernels.kernels_status()}")
    x = torch.randn(1, tiny_model.config.hidden_size)
    layer = tiny_model.transformer.h[0].mlp.w1
    with torch.inference_mode():
        via_kernel = kernels.linear(x, layer.weight, layer.bias)
        via_torch = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(via_kernel, via_torch, rtol=1e-5, atol=1e-5)
    assert torch.ops.qwenlm_kernels.linear_dense is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 7, 16, 300])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_decode_attention_matches_sdpa_on_a_cache_slice(dtype, length, head_dim):
    """K/V are a slice of a larger cache (heads not adjacent), as the model passes them; head dims that
    are not a multiple of the kernel's 32-wide steps and token counts off its 16-token blocks included."""
    gen = torch.Generator().manual_seed(length * 1000 + head_dim)
    cache_k = torch.randn(2, 4, 512, head_dim, generator=gen).to(dtype)
    cache_v = torch.randn(2, 4, 512, head_dim, generator=gen).to(dtype)
    q = (3 * torch.randn(2, 4, 1, head_dim, generator=gen)).to(dtype)  # peaked softmax: exp over a wide range
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    with torch.inference_mode():
        got = kernels.decode_attention(q, k, v)
        expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_decode_attention_over_a_long_cache(dtype, head_dim):
    """Past ~256 tokens a head's V is prefetched during the weighted sum instead of with the scores (and a
    head dim over 128 sums in two passes, each prefetching): the same result either way."""
    gen = torch.Generator().manual_seed(head_dim)
    k, v = (torch.randn(1, 2, 1100, head_dim, generator=gen).to(dtype) for _ in range(2))
    q = (3 * torch.randn(1, 2, 1, head_dim, generator=gen)).to(dtype)
    with torch.inference_mode():
        got = kernels.decode_attention(q, k, v)
        expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_applies_a_per_row_mask(dtype):
    """Continuous batching: each row masks its own padding/unused slots with finfo.min (as attention_bias)."""
    if not kernels.layer_kernels_available():
        pytest.skip(f"CPU kernels unavailable here: {kernels.kernels_status()}")
    decode_attention = kcpu._layer_op("decode_attention")  # the AVX-512 kernel, or AVX2's where it stands in
    gen = torch.Generator().manual_seed(3)
    B, n, T, D = 3, 2, 37, 128
    q, k, v = (torch.randn(B, n, s, D, generator=gen).to(dtype) for s in (1, T, T))
    allowed = torch.ones(B, T, dtype=torch.bool)
    allowed[0, :5] = False  # left padding
    allowed[1, 20:] = False  # a shorter row: slots past its end
    bias = torch.zeros(B, 1, 1, T, dtype=dtype).masked_fill_(~allowed[:, None, None, :], torch.finfo(dtype).min)
    with torch.inference_mode():
        got = decode_attention(q, k, v, D**-0.5, bias)
        expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), bias.float())
        shared = decode_attention(q, k, v, D**-0.5, bias[:1])  # one mask for all rows
        expected_shared = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), bias[:1].float()
        )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(shared.float(), expected_shared, rtol=tol, atol=tol)
    # Masked slots carry no weight: changing their values changes nothing.
    v2 = v.clone()
    v2[0, :, :5] = 1e4
    with torch.inference_mode():
        again = decode_attention(q, k, v2, D**-0.5, bias)
    assert torch.equal(again[0], got[0])


def test_decode_attention_propagates_nan():
    """A NaN score must not be silently turned into a zero weight by the kernel's exp clamp."""
    if not kernels.layer_kernels_available():
        pytest.skip(f"CPU kernels unavailable here: {kernels.kernels_status()}")
    q, k, v = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 20, 64), torch.randn(1, 1, 20, 64)
    k[0, 0, 3, 0] = float("nan")
    with torch.inference_mode():
        out = kcpu._layer_op("decode_attention")(q, k, v, 0.125, None)
    assert torch.isnan(out).all()
