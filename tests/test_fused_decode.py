"""The fused CPU decode step (generation/fused.py over kernels/cpu_step.cpp) computes exactly the model's forward."""

from __future__ import annotations

import pytest
import torch
from token_ids import random_ids

from qwenlm import kernels
from qwenlm.engine import EngineArgs, LLMEngine
from qwenlm.generation import fused
from qwenlm.generation.generate import generate_steps
from qwenlm.generation.params import SamplingParams
from qwenlm.model import ContextLengthError, KVCache, load_model
from qwenlm.model.paged_kv_cache import PagedKVCache
from qwenlm.testing import make_random_checkpoint

WEIGHTS = {
    "dense": {},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4", "quantization_group_size": 32},
}


@pytest.fixture(autouse=True)
def _fused_step_library():
    """Built on first use (here, not at collection); without AVX-512 or AVX2 there is nothing to test."""
    if not kernels.fused_step_available():
        pytest.skip("no fused step library on this machine")


@pytest.fixture(scope="module")
def partial_rotary_checkpoint(tmp_path_factory):
    """Half the head dims rotated, biases on every linear, and seq_length 16: NTK and LogN switch on early."""
    return make_random_checkpoint(
        tmp_path_factory.mktemp("fused-rotary"), preset="tiny", seed=2, rotary_pct=0.5, no_bias=False,
        seq_length=16, max_position_embeddings=16,
    )  # fmt: skip


def _load(folder, dtype, weights):
    return load_model(folder, torch_dtype=dtype, progress=False, **WEIGHTS[weights])


def _both_paths(model, ids: torch.Tensor, prefill: int, capacity: int | None = None):
    """Logits of each decode step [steps, V] and the caches, from model.forward and from the fused step."""
    with torch.inference_mode():
        caches = [KVCache.for_model(model, 1, capacity or ids.shape[1]) for _ in range(2)]
        for cache in caches:
            model(ids[:, :prefill], past_key_values=cache)
        decoder = fused.fused_decoder(model, caches[1])
        assert decoder is not None, fused.unsupported_reason(model, caches[1])
        plain, fast = [], []
        for t in range(prefill, ids.shape[1]):
            plain.append(model(ids[:, t : t + 1], past_key_values=caches[0]).logits[0, -1])
            fast.append(decoder(int(ids[0, t]))[0, -1])
    return torch.stack(plain), torch.stack(fast), caches


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpoint", ["long_context_checkpoint", "partial_rotary_checkpoint"])
def test_fused_step_equals_the_forward_bit_for_bit(request, checkpoint, dtype, weights):
    """Prefill inside seq_length (16), then decode past it: LogN switches on mid-way; a second prefill past it
    runs with NTK alpha 3 from the start."""
    model = _load(request.getfixturevalue(checkpoint), dtype, weights)
    for prefill in (10, 24):
        ids = random_ids(1, prefill + 12, seed=prefill)
        plain, fast, caches = _both_paths(model, ids, prefill)
        assert caches[1].length == caches[0].length == ids.shape[1]
        assert torch.equal(plain, fast)
        for layer in range(len(caches[0])):
            assert all(torch.equal(a, b) for a, b in zip(caches[0][layer], caches[1][layer], strict=True))


@pytest.fixture(scope="module")
def odd_shapes_checkpoint(tmp_path_factory):
    """Sizes that are no multiple of the kernels' vectors: hidden 60, head dim 20 (RoPE halves of 10), an MLP of
    100 (SiLU's vector runs plus a tail, as ATen splits them); seq_length 48, so LogN is on past it."""
    return make_random_checkpoint(
        tmp_path_factory.mktemp("fused-odd"), preset="tiny", seed=4, hidden_size=60, num_attention_heads=3,
        kv_channels=20, intermediate_size=200, seq_length=48, max_position_embeddings=128,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_step_equals_the_forward_on_odd_shapes_and_long_caches(odd_shapes_checkpoint, dtype):
    """Vector tails everywhere, and a cache that grows past 64 tokens, where the heads' attention goes parallel."""
    model = _load(odd_shapes_checkpoint, dtype, "dense")
    ids = random_ids(1, 80, seed=8)
    plain, fast, caches = _both_paths(model, ids, 56)
    assert torch.equal(plain, fast)
    for layer in range(len(caches[0])):
        assert all(torch.equal(a, b) for a, b in zip(caches[0][layer], caches[1][layer], strict=True))


def test_a_cache_that_does_not_fit_the_plan_is_refused_by_name(long_context_checkpoint):
    model = _load(long_context_checkpoint, torch.float32, "dense")
    step = fused.FusedStep(model)
    wrong = KVCache.for_model(model, 1, 8)
    keys = [k.to(torch.bfloat16) for k in wrong.keys]
    with pytest.raises(RuntimeError, match="layer 0's cache does not fit"):
        step.plan.bind(keys, [v.to(torch.bfloat16) for v in wrong.values])
    with pytest.raises(RuntimeError, match="one key and one value buffer per layer"):
        step.plan.bind(wrong.keys[:1], wrong.values[:1])
    with pytest.raises(RuntimeError, match="bind a one-row cache first"):
        step.plan.step(0, 0, torch.ones(1, 8))
    step.plan.bind(wrong.keys, wrong.values)
    vocab = model.config.vocab_size
    with pytest.raises(RuntimeError, match=f"token id {vocab} is outside the embedding"):
        step.plan.step(vocab, 0, torch.ones(1, 8))
    end = wrong.capacity
    with pytest.raises(RuntimeError, match=f"position {end} is outside the cache"):
        step.plan.step(0, end, torch.ones(1, 8))


def test_fused_step_applies_the_act_order_permutation(long_context_checkpoint):
    """GPTQ act-order layers gather their input columns first; the fused step gathers them the same way."""
    model = _load(long_context_checkpoint, torch.float32, "int4")
    mlp = model.transformer.h[1].mlp
    mlp.c_proj.perm = torch.randperm(mlp.c_proj.in_features, generator=torch.Generator().manual_seed(0))
    plain, fast, _ = _both_paths(model, random_ids(1, 20, seed=1), 12)
    assert torch.equal(plain, fast)


def test_fused_step_grows_a_full_cache(tiny_model):
    ids = random_ids(1, 300, seed=2)  # KVCache rounds capacity up to 256: the step past it must grow the cache
    plain, fast, caches = _both_paths(tiny_model, ids, 250, capacity=251)
    assert caches[1].capacity > 256 and torch.equal(plain, fast)


def test_fused_step_stops_at_the_context_limit(long_context_model):
    limit = long_context_model.config.max_context_length
    with torch.inference_mode():
        cache = KVCache.for_model(long_context_model, 1, 8)
        long_context_model(random_ids(1, 4), past_key_values=cache)
        decoder = fused.fused_decoder(long_context_model, cache)
        cache.length = limit  # as if the context were full
        with pytest.raises(ContextLengthError, match=str(limit)):
            decoder(int(random_ids(1, 1)[0, 0]))
    assert cache.length == limit


def _greedy(model, prompt, monkeypatch, fused_on: bool, vocab_limit: int | None = None,
            **settings) -> tuple[list[int], dict[str, int]]:  # fmt: skip
    """Greedy tokens of generate_steps and how many steps the fused decoder ran, by kind (logits or argmax)."""
    monkeypatch.setenv("QWENLM_FUSED_DECODE", "1" if fused_on else "0")
    calls = {"logits": 0, "argmax": 0}
    for kind, name in (("logits", "__call__"), ("argmax", "argmax")):
        original = getattr(fused.FusedDecoder, name)

        def counted(self, *args, _original=original, _kind=kind):
            calls[_kind] += 1
            return _original(self, *args)

        monkeypatch.setattr(fused.FusedDecoder, name, counted)
    params = SamplingParams(max_new_tokens=16, do_sample=False, eos_token_ids=(), stop_words_ids=(), **settings)
    steps = generate_steps(model, [prompt], params, vocab_limit=vocab_limit, compile=False)
    return [step.token_ids[0] for step in steps], calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_generate_decodes_through_the_fused_step_with_the_same_tokens(long_context_checkpoint, monkeypatch, dtype):
    model = _load(long_context_checkpoint, dtype, "dense")
    prompt = random_ids(1, 12, seed=3)[0].tolist()
    fast, fused_steps = _greedy(model, prompt, monkeypatch, True)
    plain, plain_steps = _greedy(model, prompt, monkeypatch, False)
    assert fused_steps == {"logits": 0, "argmax": 15} and plain_steps == {"logits": 0, "argmax": 0}
    assert fast == plain


@pytest.mark.parametrize(
    "settings, kind",
    [({"repetition_penalty": 1.3}, "logits"), ({"logit_bias": {7: 4.0}}, "logits"), ({}, "argmax")],
    ids=["penalty", "bias", "plain"],
)
def test_greedy_decoding_under_a_vocab_limit_and_processors_keeps_the_forwards_tokens(
    long_context_checkpoint, monkeypatch, settings, kind
):
    """Plain greedy decoding takes the step's own argmax (under generate's vocab limit); a repetition penalty or
    a logit bias needs the logits, so those steps return them."""
    model = _load(long_context_checkpoint, torch.bfloat16, "dense")
    prompt = random_ids(1, 12, seed=4)[0].tolist()
    unlimited, _ = _greedy(model, prompt, monkeypatch, False, **settings)
    limit = sorted(unlimited)[len(unlimited) // 2]  # half the free-running tokens are at or past it
    fast, fused_steps = _greedy(model, prompt, monkeypatch, True, vocab_limit=limit, **settings)
    plain, _ = _greedy(model, prompt, monkeypatch, False, vocab_limit=limit, **settings)
    assert fused_steps[kind] == 15 and sum(fused_steps.values()) == 15
    assert fast == plain and max(plain) < limit


class WrappedEmbedding(torch.nn.Embedding):
    """An embedding the model calls like its own, of a type the fused step does not look rows up in itself."""


def _wrap_embedding(model) -> None:
    wte = model.transformer.wte
    wrapped = WrappedEmbedding(wte.num_embeddings, wte.embedding_dim, dtype=wte.weight.dtype)
    wrapped.load_state_dict(wte.state_dict())
    model.transformer.wte = wrapped


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda m: m.set_attn_implementation("eager"), "eager attention"),
        (lambda m: m.transformer.h[0].mlp.register_forward_hook(lambda *a: None), "forward hook"),
        (lambda m: m.use_kernels(False), "kernels are turned off"),
        (lambda m: m.train(), "training mode"),
        (lambda m: _wrap_embedding(m), "WrappedEmbedding token embedding"),
    ],
    ids=["eager", "hook", "no-kernels", "training", "embedding"],
)
def test_what_the_fused_step_does_not_cover_keeps_the_forward(long_context_checkpoint, monkeypatch, change, reason):
    model = _load(long_context_checkpoint, torch.float32, "dense")
    change(model)
    cache = KVCache.for_model(model, 1, 8)
    cache.ntk_alpha = torch.ones(1)  # as after a prefill
    with torch.no_grad():
        assert reason in fused.unsupported_reason(model, cache)
    if not model.training:
        tokens, fused_steps = _greedy(model, random_ids(1, 6, seed=4)[0].tolist(), monkeypatch, True)
        assert sum(fused_steps.values()) == 0 and len(tokens) == 16


def test_int8_kv_cache_and_batches_keep_the_forward(long_context_checkpoint, monkeypatch):
    model = load_model(long_context_checkpoint, torch_dtype=torch.float32, progress=False, use_cache_quantization=True)
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, 8)
        cache.ntk_alpha = torch.ones(1)
        assert "float KVCache" in fused.unsupported_reason(model, cache)
    tokens, fused_steps = _greedy(model, random_ids(1, 6, seed=5)[0].tolist(), monkeypatch, True)
    assert sum(fused_steps.values()) == 0 and len(tokens) == 16
    dense = _load(long_context_checkpoint, torch.float32, "dense")
    with torch.inference_mode():
        assert "one row" in fused.unsupported_reason(dense, KVCache.for_model(dense, 2, 8))


@pytest.mark.parametrize("weights", ["dense", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paged_fused_step_equals_the_engines_forward(long_context_checkpoint, dtype, weights):
    """The engine's one-sequence decode: K/V through a block table (blocks out of order), NTK alpha 3, LogN."""
    model = _load(long_context_checkpoint, dtype, weights)
    pools = [PagedKVCache.for_model(model, num_blocks=16, block_size=4) for _ in range(2)]
    blocks, alpha, prefill = [9, 2, 14, 5, 0, 7, 11, 3, 12, 6], 3.0, 24
    ids = random_ids(1, 38, seed=6)
    with torch.inference_mode():
        for pool in pools:
            view = pool.batch([blocks], [0], [prefill], torch.tensor([alpha]))
            model(ids[:, :prefill], past_key_values=view, cache_positions=[0])
        step = fused.fused_step(model, pools[1])
        assert step is not None, fused.unsupported_reason(model, pools[1])
        for t in range(prefill, ids.shape[1]):
            view = pools[0].batch([blocks], [t], [1], torch.tensor([alpha]))
            plain = model(ids[:, t : t + 1], past_key_values=view, cache_positions=[t]).logits
            assert torch.equal(plain, step.paged(int(ids[0, t]), pools[1], blocks, t, alpha))
    assert all(
        torch.equal(a, b) for a, b in zip(pools[0].keys + pools[0].values, pools[1].keys + pools[1].values, strict=True)
    )


def test_one_paged_step_alternates_sequences_with_different_ntk_alphas(long_context_checkpoint):
    """The engine keeps one FusedStep for every sequence: its RoPE table must follow each step's alpha (and
    position), not the previous step's."""
    model = _load(long_context_checkpoint, torch.bfloat16, "dense")
    pools = [PagedKVCache.for_model(model, num_blocks=16, block_size=4) for _ in range(2)]
    seqs = [
        ([9, 2, 14, 5, 0, 7, 11], 3.0, 20, random_ids(1, 27, seed=8)),
        ([1, 4, 8, 10, 13], 1.0, 12, random_ids(1, 19, seed=9)),
    ]
    with torch.inference_mode():
        for pool in pools:
            for blocks, alpha, prefill, ids in seqs:
                view = pool.batch([blocks], [0], [prefill], torch.tensor([alpha]))
                model(ids[:, :prefill], past_key_values=view, cache_positions=[0])
        step = fused.fused_step(model, pools[1])
        for k in range(7):
            for blocks, alpha, prefill, ids in seqs:
                t = prefill + k
                view = pools[0].batch([blocks], [t], [1], torch.tensor([alpha]))
                plain = model(ids[:, t : t + 1], past_key_values=view, cache_positions=[t]).logits
                assert torch.equal(plain, step.paged(int(ids[0, t]), pools[1], blocks, t, alpha)), (alpha, t)


@pytest.mark.parametrize("settings, kind", [({}, "argmax"), ({"repetition_penalty": 1.2}, "logits")],
                         ids=["greedy", "penalty"])  # fmt: skip
def test_the_engine_decodes_a_lone_sequence_through_the_fused_step(long_context_checkpoint, qwen_tokenizer,
                                                                     monkeypatch, settings, kind):  # fmt: skip
    """Plain greedy decoding takes the step's argmax (no logits leave it); anything to process gets the logits."""
    model = _load(long_context_checkpoint, torch.bfloat16, "int8")
    calls = {"logits": 0, "argmax": 0}
    for name, method in (("logits", "paged"), ("argmax", "paged_argmax")):
        original = getattr(fused.FusedStep, method)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(fused.FusedStep, method, counted)
    params = SamplingParams(max_new_tokens=12, do_sample=False, eos_token_ids=(), stop_words_ids=(), **settings)
    prompt = random_ids(1, 20, seed=7)[0].tolist()  # past seq_length: NTK alpha 3 and LogN
    runs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("QWENLM_FUSED_DECODE", setting)
        engine = LLMEngine(model, qwen_tokenizer, EngineArgs(max_num_seqs=2, max_model_len=64, block_size=4))
        runs[setting] = engine.generate_batch([prompt], params)[0].token_ids
    assert calls[kind] == 11 and sum(calls.values()) == 11 and runs["1"] == runs["0"]
