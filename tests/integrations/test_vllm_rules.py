"""The vLLM plugin's rules that need no vLLM: NTK alpha buckets and routing, LogN per token, the weight-name
mapping (w2 is the gate), and the transformers config / tokenizer classes vLLM loads through."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from qwenlm.chat_format import make_context, render_messages
from qwenlm.model.blocks import QWenMLP, logn_factors, logn_scale, ntk_alpha
from qwenlm.model.config import QwenConfig
from qwenlm.model.qwen import QWenLMHeadModel
from qwenlm.testing import make_random_checkpoint, preset_config

from qwenlm.integrations.vllm.routing import alpha_buckets, check_engine_alpha, prompt_alpha  # isort: skip
from qwenlm.integrations.vllm.weights import PACKED_MODULES, vllm_weight_name  # isort: skip


# ---- alpha buckets and routing ------------------------------------------------------------------
@pytest.mark.parametrize("seq_length, max_model_len", [(16, 17), (16, 100), (32, 64), (7, 200), (100, 99)])
def test_buckets_cover_every_prompt_length_with_its_own_alpha(seq_length, max_model_len):
    buckets = alpha_buckets(seq_length, max_model_len)
    assert buckets[0].min_prompt == 1 and buckets[-1].max_prompt == max_model_len - 1
    for before, after in zip(buckets, buckets[1:], strict=False):
        assert after.min_prompt == before.max_prompt + 1 and after.alpha > before.alpha
    for bucket in buckets:
        for length in range(bucket.min_prompt, bucket.max_prompt + 1):
            assert ntk_alpha(length, seq_length) == bucket.alpha == prompt_alpha(length, seq_length, True)


def test_buckets_of_the_released_models():
    """Qwen-14B (seq_length 2048) at 8K and Qwen-7B (8192) at 32K need three engines each."""
    assert [(b.alpha, b.min_prompt, b.max_prompt) for b in alpha_buckets(2048, 8192)] == [
        (1, 1, 2048), (3, 2049, 4096), (7, 4097, 8191)]  # fmt: skip
    assert [b.alpha for b in alpha_buckets(8192, 32768)] == [1, 3, 7]
    assert [b.alpha for b in alpha_buckets(8192, 8192)] == [1]


def test_without_dynamic_ntk_one_engine_takes_everything():
    assert [(b.alpha, b.min_prompt, b.max_prompt) for b in alpha_buckets(16, 100, use_dynamic_ntk=False)] == [
        (1, 1, 99)]  # fmt: skip
    assert prompt_alpha(5000, 16, use_dynamic_ntk=False) == 1
    with pytest.raises(ValueError, match="at least 2"):
        alpha_buckets(16, 1)


def test_engine_alpha_check():
    assert check_engine_alpha(1, 32, 33, True) is None  # every prompt (<= 32 tokens) gets alpha 1
    assert check_engine_alpha(3, 32, 64, True, routed=True) is None
    warning = check_engine_alpha(1, 32, 64, True)  # the case: max_model_len > seq_length, alpha 1
    assert "1-32 tokens" in warning and "3 for 33-63" in warning and "qwenlm serve --backend vllm" in warning
    assert "not one Qwen uses" in check_engine_alpha(7, 32, 64, True)
    assert check_engine_alpha(1, 32, 64, use_dynamic_ntk=False) is None  # LogN only: one alpha, exact
    with pytest.raises(ValueError, match="use_dynamic_ntk=false"):
        check_engine_alpha(3, 32, 64, use_dynamic_ntk=False)
    for bad in (0, 0.5, "3", True):
        with pytest.raises(ValueError, match=">= 1"):
            check_engine_alpha(bad, 32, 64, True)


# ---- LogN ----------------------------------------------------------------------------------------
def test_logn_per_token_equals_per_sequence():
    """vLLM flattens a continuous batch into one row of positions (prefill chunks and decodes mixed): the
    factor of each token from its own position equals the one qwenlm's model applies per sequence."""
    seq_length = 16
    pieces = [(0, 12), (10, 9), (40, 1), (15, 3)]  # (start, length): a prefill, a chunk crossing Ls, decodes
    flat = torch.cat([torch.arange(start, start + n) for start, n in pieces])
    per_sequence = torch.cat([logn_scale(start, n, seq_length) for start, n in pieces])
    assert torch.equal(logn_factors(flat, seq_length), per_sequence)
    assert torch.equal(per_sequence[:12], torch.ones(12))  # within seq_length: exactly 1
    assert per_sequence[-1] > 1 and per_sequence[12 + 9] == pytest.approx(torch.log(torch.tensor(41.0)) / 2.7725887)


# ---- weights -------------------------------------------------------------------------------------
def test_weight_names_of_a_checkpoint():
    config = preset_config("tiny")
    with torch.device("meta"):
        names = list(QWenLMHeadModel(config).state_dict())
    mapped = {name: vllm_weight_name(name) for name in names}
    assert mapped["transformer.h.1.mlp.w2.weight"] == ("transformer.h.1.mlp.gate_up_proj.weight", 0)
    assert mapped["transformer.h.1.mlp.w1.weight"] == ("transformer.h.1.mlp.gate_up_proj.weight", 1)
    assert mapped["transformer.h.0.attn.c_attn.bias"] == ("transformer.h.0.attn.c_attn.bias", None)
    untouched = [n for n in names if ".mlp.w1." not in n and ".mlp.w2." not in n]
    assert all(mapped[n] == (n, None) for n in untouched)
    assert PACKED_MODULES == {"c_attn": ["c_attn"], "gate_up_proj": ["w2", "w1"]}
    # GPTQ tensors follow the module; buffers some reference revisions saved are dropped
    assert vllm_weight_name("transformer.h.3.mlp.w2.qzeros") == ("transformer.h.3.mlp.gate_up_proj.qzeros", 0)
    assert vllm_weight_name("transformer.h.3.mlp.w1.g_idx") == ("transformer.h.3.mlp.gate_up_proj.g_idx", 1)
    for buffer in ("transformer.h.0.attn.rotary_emb.inv_freq", "transformer.h.0.attn.masked_bias",
                   "transformer.h.0.attn.bias", "transformer.registered_causal_mask"):  # fmt: skip
        assert vllm_weight_name(buffer) is None


def test_merged_gate_up_computes_qwens_mlp():
    """Shard 0 (w2) is what vLLM's SiluAndMul puts SiLU on: the merged layout computes Qwen's MLP exactly,
    and swapping the shards would not (asymmetric random weights)."""
    torch.manual_seed(0)
    mlp = QWenMLP(QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16, intermediate_size=96)).eval()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    state = {"w1.weight": mlp.w1.weight, "w2.weight": mlp.w2.weight}
    merged = torch.empty(96, 64)
    for name, tensor in state.items():
        target, shard = vllm_weight_name(f"transformer.h.0.mlp.{name}")
        assert target == "transformer.h.0.mlp.gate_up_proj.weight"
        merged[shard * 48 : (shard + 1) * 48] = tensor
    x = torch.randn(5, 64)
    gate_up = x @ merged.T
    silu_and_mul = F.silu(gate_up[:, :48]) * gate_up[:, 48:]  # vLLM's SiluAndMul
    with torch.no_grad():
        expected = mlp(x)
        assert torch.allclose(silu_and_mul @ mlp.c_proj.weight.T, expected, atol=1e-5)
        swapped = F.silu(gate_up[:, 48:]) * gate_up[:, :48]
        assert not torch.allclose(swapped @ mlp.c_proj.weight.T, expected, atol=1e-3)


# ---- the transformers classes vLLM loads through ---------------------------------------------------
@pytest.fixture(scope="module")
def plugin_checkpoint(tmp_path_factory):
    from qwenlm.integrations.vllm import register_transformers

    register_transformers()
    return make_random_checkpoint(tmp_path_factory.mktemp("vllm-rules"), preset="tiny", seq_length=16)


def test_config_without_remote_code(plugin_checkpoint, tmp_path):
    from transformers import AutoConfig

    from qwenlm.integrations.vllm.hf_config import QWenConfig, qwen_config

    hf = AutoConfig.from_pretrained(plugin_checkpoint, trust_remote_code=False)  # config.json keeps its auto_map
    assert type(hf) is QWenConfig and hf.architectures == ["QWenLMHeadModel"]
    assert qwen_config(hf) == dataclasses.replace(QwenConfig.from_pretrained(plugin_checkpoint), extra={})
    assert (hf.seq_length, hf.rope_theta, hf.partial_rotary_factor) == (16, 10000.0, 1.0)
    # v1.0 (2023-08) names map as qwenlm maps them; bad values fail as they do in qwenlm
    legacy = json.loads((plugin_checkpoint / "config.json").read_text())
    legacy.update(n_embd=legacy.pop("hidden_size"), n_head=legacy.pop("num_attention_heads"))
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert qwen_config(AutoConfig.from_pretrained(tmp_path)).hidden_size == 64
    legacy["kv_channels"] = 7
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="kv_channels"):
        AutoConfig.from_pretrained(tmp_path)


def test_tokenizer_without_remote_code(plugin_checkpoint, qwen_tokenizer):
    from transformers import AutoTokenizer

    from qwenlm.integrations.vllm.hf_tokenizer import QWenTokenizer

    tok = AutoTokenizer.from_pretrained(plugin_checkpoint, trust_remote_code=False)
    assert type(tok) is QWenTokenizer
    text = "Hello, 世界! <|im_end|> 1234"
    assert tok.encode(text) == tok(text)["input_ids"] == qwen_tokenizer.encode(text)
    ids = qwen_tokenizer.encode(text)
    assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=True) == "Hello, 世界!  1234"
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)) == text
    assert (tok.eos_token, tok.eos_token_id, len(tok), tok.vocab_size) == ("<|im_end|>", 151645, 151851, 151851)
    assert 151643 in tok.all_special_ids and len(tok.all_special_ids) == 208
    with pytest.raises(ValueError, match="fixed"):
        tok.add_tokens(["<new>"])


def test_chat_template_is_model_chat_prompt(plugin_checkpoint, qwen_tokenizer):
    """The ids vLLM's chat endpoint gets are `model.chat`'s, user text with control-token surfaces included;
    the Jinja template (what template-rendering callers see) writes the same text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plugin_checkpoint)
    conversations = [
        [{"role": "user", "content": "你好"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "\nc <|im_end|>"}],
    ]  # fmt: skip
    for messages in conversations:
        raw_text, ids = render_messages(qwen_tokenizer, messages)
        assert tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == ids
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == raw_text
        template = tok.apply_chat_template(messages, chat_template=tok.chat_template, add_generation_prompt=True,
                                           tokenize=False)  # fmt: skip
        assert template == raw_text
    assert make_context(qwen_tokenizer, "x <|im_end|>")[1].count(151645) == 2  # the surface stayed text
    with pytest.raises(ValueError, match="ReAct"):
        tok.apply_chat_template(conversations[0], tools=[{"type": "function", "function": {"name": "f"}}])
