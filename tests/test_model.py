"""Model math: pieces against their formulas, and the cache / padding / mask behaviour end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from token_ids import random_ids

from qwenlm.model import ContextLengthError, KVCache
from qwenlm.model.blocks import (
    QWenMLP,
    RMSNorm,
    apply_rope,
    attention_bias,
    logn_scale,
    ntk_alpha,
    rope_cos_sin,
    rope_inv_freq,
)
from qwenlm.model.qwen import QWenLMHeadModel
from qwenlm.testing import preset_config


@pytest.mark.parametrize(
    "length,alpha", [(1, 1), (4096, 1), (8192, 1), (8193, 3), (16384, 3), (16385, 7), (32768, 7), (32769, 15)]
)
def test_ntk_alpha_matches_spec_values(length, alpha):
    assert ntk_alpha(length, 8192) == alpha


def test_rope_inv_freq_ntk_base_stretch():
    base, d, alpha = 10000.0, 128, 3
    expected = 1.0 / ((base * alpha ** (d / (d - 2))) ** (torch.arange(0, d, 2).float() / d))
    torch.testing.assert_close(rope_inv_freq(d, base, alpha), expected, rtol=0, atol=0)


def test_logn_scale_formula():
    scale = logn_scale(start=10, length=20, seq_length=16)
    for i, value in enumerate(scale.tolist()):
        position = 10 + i + 1  # 1-based
        expected = math.log(position) / math.log(16) if position > 16 else 1.0
        assert value == pytest.approx(expected, rel=1e-6)


def test_rmsnorm_casts_before_weight():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.linspace(0.5, 1.5, 8)
    x = torch.randn(2, 3, 8).to(torch.bfloat16)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm.weight.to(
        torch.bfloat16
    )
    torch.testing.assert_close(norm.to(torch.bfloat16)(x), expected, rtol=0, atol=0)


def test_mlp_w2_is_the_gate():
    config = preset_config("tiny")
    mlp = QWenMLP(config)
    torch.manual_seed(0)
    for p in mlp.parameters():
        p.data.normal_()
    x = torch.randn(3, config.hidden_size)
    expected = mlp.c_proj(mlp.w1(x) * F.silu(mlp.w2(x)))
    swapped = mlp.c_proj(mlp.w2(x) * F.silu(mlp.w1(x)))
    torch.testing.assert_close(mlp(x), expected)
    assert (mlp(x) - swapped).abs().max() > 1e-2


def test_rope_partial_rotary_leaves_tail_untouched():
    config = preset_config("tiny", rotary_pct=0.5)
    cos, sin = rope_cos_sin(config, torch.ones(1), start=3, length=5)
    x = torch.randn(1, 4, 5, config.head_dim)
    y = apply_rope(x, cos, sin)
    d = config.rotary_dim
    torch.testing.assert_close(y[..., d:], x[..., d:], rtol=0, atol=0)
    assert (y[..., :d] - x[..., :d]).abs().max() > 1e-3
    # norm of each rotated pair is preserved
    torch.testing.assert_close(y[..., :d].norm(dim=-1), x[..., :d].norm(dim=-1))


def test_attention_bias_offset_causal_and_padding():
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    bias = attention_bias(mask, start=3, length=2, dtype=torch.float32, device=torch.device("cpu"))
    allowed = bias[0, 0] == 0
    assert allowed.tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    assert bias.min() == torch.finfo(torch.float32).min  # masked exactly once, never doubled


def test_sdpa_equals_eager(tiny_model):
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    outputs = {}
    for impl in ("eager", "sdpa"):
        tiny_model.set_attn_implementation(impl)
        outputs[impl] = (tiny_model(ids).logits, tiny_model(ids, attention_mask=mask).logits)
    tiny_model.set_attn_implementation("sdpa")
    for eager, sdpa in zip(outputs["eager"], outputs["sdpa"], strict=True):
        torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_name", ["tiny_model", "long_context_model"])
def test_kv_cache_decode_equals_full_recompute(model_name, request):
    model = request.getfixturevalue(model_name)
    ids = random_ids(1, 48, seed=3)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :20])
    cache = out.past_key_values
    steps = [out.logits]
    for t in range(20, 48):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    if model_name == "long_context_model":
        # NTK alpha stays at the 20-token prefill's (3; seq_length 16), while a fresh 48-token pass
        # would pick 7: recompute with the alpha pinned to compare like with like.
        assert cache.ntk_alpha.tolist() == [3.0]
        pinned = KVCache.for_model(model, batch_size=1, capacity=48)
        pinned.ntk_alpha = torch.tensor([3.0])
        full = model(ids, past_key_values=pinned).logits
        assert (full - model(ids, use_cache=False).logits).abs().max() > 1e-5  # alpha 7 differs
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)
    assert cache.length == 48


def test_kv_cache_keeps_prefill_ntk_alpha_while_decoding(long_context_model):
    ids = random_ids(1, 30, seed=5)  # 30 tokens, seq_length 16 -> alpha 3
    cache = long_context_model(ids).past_key_values
    assert cache.ntk_alpha.tolist() == [3.0]
    for t in range(40):  # crosses 32 = 2 * seq_length, where a fresh prefill would pick alpha 7
        long_context_model(torch.tensor([[t + 100]]), past_key_values=cache)
    assert cache.ntk_alpha.tolist() == [3.0] and cache.length == 70


def test_chunked_prefill_on_cache_equals_full_forward(tiny_model):
    """A multi-token forward on top of a cache needs the offset causal mask (reference has none)."""
    ids = random_ids(1, 30, seed=7)
    full = tiny_model(ids, use_cache=False).logits
    cache = tiny_model(ids[:, :10]).past_key_values
    chunk = tiny_model(ids[:, 10:], past_key_values=cache).logits
    torch.testing.assert_close(chunk, full[:, 10:], rtol=0, atol=1e-4)


def test_kv_cache_grows_past_its_capacity(tiny_model):
    ids = random_ids(1, 300, seed=8)
    cache = KVCache.for_model(tiny_model, batch_size=1, capacity=16)
    first = cache.capacity
    tiny_model(ids[:, :200], past_key_values=cache)
    logits = tiny_model(ids[:, 200:], past_key_values=cache).logits
    assert cache.capacity > first and cache.length == 300
    pinned = KVCache.for_model(tiny_model, batch_size=1, capacity=300)
    pinned.ntk_alpha = torch.ones(1)  # 300 > seq_length 256: keep the prefill's alpha, as decoding does
    torch.testing.assert_close(logits, tiny_model(ids, past_key_values=pinned).logits[:, 200:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_name", ["tiny_model", "long_context_model"])
def test_padded_batch_rows_equal_prompts_alone(model_name, request, monkeypatch):
    """Per-row NTK alphas make padded rows match. LogN is off here: it uses the padded absolute
    positions (spec 2.6), so with it rows legitimately differ (checked against the oracle instead)."""
    model = request.getfixturevalue(model_name)
    monkeypatch.setattr(model.config, "use_logn_attn", False)
    lengths = [40, 25, 9]
    prompts = [random_ids(1, n, seed=10 + n)[0] for n in lengths]
    T, pad = max(lengths), 151646
    ids = torch.full((len(prompts), T), pad)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :] = p
        mask[row, T - len(p) :] = 1
    batched = model(ids, attention_mask=mask, use_cache=False).logits
    for row, p in enumerate(prompts):
        alone = model(p[None], use_cache=False).logits[0]
        torch.testing.assert_close(batched[row, T - len(p) :], alone, rtol=0, atol=1e-4)


def test_padded_batch_greedy_equals_alone(tiny_model):
    prompts = [random_ids(1, n, seed=n)[0] for n in (12, 5)]
    ids = torch.full((2, 12), 151646)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, 12 - len(p) :], mask[row, 12 - len(p) :] = p, 1
    out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], do_sample=False)
    for row, p in enumerate(prompts):
        alone = tiny_model.generate(p[None], max_new_tokens=8, eos_token_id=[], do_sample=False)
        assert out[row, 12:].tolist() == alone[0, len(p) :].tolist()


def test_greedy_generate_equals_argmax_recompute(tiny_model):
    ids = random_ids(1, 6, seed=11)
    out = tiny_model.generate(ids, max_new_tokens=10, eos_token_id=[], do_sample=False, repetition_penalty=1.0)
    seq = ids
    for _ in range(10):
        nxt = tiny_model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert out.tolist() == seq.tolist()


def test_greedy_generate_stops_at_eos_and_pads_finished_rows(tiny_model):
    ids = random_ids(2, 5, seed=12)
    free = tiny_model.generate(ids, max_new_tokens=6, eos_token_id=[], do_sample=False)
    eos = int(free[0, 7])  # make row 0's third new token the eos
    out = tiny_model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=151643, do_sample=False)
    assert out[0, 5:8].tolist() == free[0, 5:8].tolist()
    assert set(out[0, 8:].tolist()) <= {151643}


def test_context_length_error_names_the_limit():
    config = preset_config("tiny", use_dynamic_ntk=False, use_logn_attn=False, seq_length=32,
                           max_position_embeddings=32)  # fmt: skip
    model = QWenLMHeadModel(config).eval()
    with pytest.raises(ContextLengthError, match="32"):
        model(random_ids(1, 33))


def test_token_ids_past_the_vocabulary_name_the_mismatch():
    """A checkpoint whose vocab_size does not cover the tokenizer's ids: a ValueError the CLI prints, not IndexError."""
    model = QWenLMHeadModel(preset_config("tiny", vocab_size=1000)).eval()
    with pytest.raises(ValueError, match=r"token ids 5\.\.151643 do not fit this model's embedding of 1000 tokens"):
        model(torch.tensor([[5, 151643]]))


def test_attention_mask_shape_is_checked(tiny_model):
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(random_ids(1, 5), attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_logits_to_keep_and_output_indexing(tiny_model):
    ids = random_ids(1, 7)
    out = tiny_model(ids, use_cache=False)
    last = tiny_model(ids, use_cache=False, logits_to_keep=1)
    torch.testing.assert_close(last.logits, out.logits[:, -1:], rtol=0, atol=1e-6)
    assert out[0] is out.logits and out.past_key_values is None


def test_kv_cache_select_rows(tiny_model):
    ids = random_ids(3, 8, seed=13)
    cache = tiny_model(ids).past_key_values
    keys_row2 = cache[0][0][2].clone()
    cache.select_rows([2, 0])
    assert cache.batch_size == 2
    torch.testing.assert_close(cache[0][0][0], keys_row2)
    step = tiny_model(ids[[2, 0], -1:], past_key_values=cache).logits  # rows continue independently
    assert step.shape[0] == 2


def test_generate_refuses_a_prompt_that_cannot_fit_before_any_compute():
    config = preset_config(
        "tiny", use_dynamic_ntk=False, use_logn_attn=False, seq_length=32, max_position_embeddings=32
    )
    model = QWenLMHeadModel(config).eval()
    with pytest.raises(ContextLengthError, match=r"30 tokens.*max_new_tokens 5.*32"):
        model.generate(random_ids(1, 30), max_new_tokens=5)
