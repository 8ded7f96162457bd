import json

import pytest

from qwenlm.model.config import GenerationConfig, QwenConfig
from qwenlm.testing import PRESETS, preset_config


def test_config_derived_values_from_released_7b_shape():
    config = preset_config("7b")
    assert config.head_dim == 128
    assert config.mlp_width == 11008  # intermediate_size 22016 // 2
    assert config.rotary_dim == 128
    assert config.num_parameters == 7_721_324_544  # spec 1.2, exact


@pytest.mark.parametrize("preset,params", [("1.8b", 1_836_828_672), ("14b", 14_167_290_880), ("72b", 72_287_920_128)])
def test_config_parameter_counts_match_released_models(preset, params):
    assert preset_config(preset).num_parameters == params


def test_config_rotary_pct_partial():
    config = preset_config("tiny", rotary_pct=0.5)
    assert config.rotary_dim == PRESETS["tiny"]["kv_channels"] // 2


def test_config_from_released_json_keeps_informational_keys(tmp_path):
    data = {
        "architectures": ["QWenLMHeadModel"], "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
        "model_type": "qwen", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
        "kv_channels": 128, "intermediate_size": 11008, "seq_length": 8192, "rotary_emb_base": 10000,
        "padded_vocab_size": 151936, "onnx_safe": None, "tokenizer_type": "QWenTokenizer",
        "use_flash_attn": "auto", "bf16": False, "fp16": False, "fp32": False,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = QwenConfig.from_pretrained(tmp_path)
    assert config.hidden_size == 2048 and config.rotary_emb_base == 10000.0
    assert config.extra["padded_vocab_size"] == 151936
    assert config.to_dict()["padded_vocab_size"] == 151936


def test_config_legacy_v1_names_are_mapped():
    config = QwenConfig.from_dict(
        {"n_embd": 64, "n_head": 4, "n_layer": 2, "kv_channels": 16, "ffn_hidden_size": 256, "n_positions": 6144}
    )
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 4, 2)
    assert config.mlp_width == 128 and config.max_position_embeddings == 6144


@pytest.mark.parametrize(
    "field,value",
    [("model_type", "qwen2"), ("hidden_size", 0), ("kv_channels", 7), ("rotary_pct", 1.5),
     ("intermediate_size", 255), ("layer_norm_epsilon", 0.0), ("seq_length", -1)],
)  # fmt: skip
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        preset_config("tiny", **{field: value})


def test_config_at_most_one_precision_flag():
    with pytest.raises(ValueError, match="bf16"):
        preset_config("tiny", bf16=True, fp16=True)


def test_config_unknown_key_warns_and_is_kept():
    with pytest.warns(UserWarning, match="surprise"):
        config = QwenConfig.from_dict({**PRESETS["tiny"], "surprise": 1})
    assert config.extra["surprise"] == 1


def test_config_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        QwenConfig.from_pretrained(tmp_path)


def test_config_invalid_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        QwenConfig.from_pretrained(tmp_path)


def test_config_save_and_reload_round_trip(tmp_path):
    config = preset_config("tiny", rotary_pct=0.5, seq_length=16)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen" and saved["architectures"] == ["QWenLMHeadModel"]
    assert QwenConfig.from_pretrained(tmp_path) == QwenConfig.from_dict(saved)


def test_generation_config_keeps_qwen_keys(tmp_path):
    data = {"chat_format": "chatml", "do_sample": True, "eos_token_id": 151643, "max_new_tokens": 512,
            "max_window_size": 6144, "pad_token_id": 151643, "repetition_penalty": 1.1, "top_k": 0,
            "top_p": 0.8, "stop_words_ids": [[151643]], "decay_bound": 0.0}  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    gen = GenerationConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert (gen.chat_format, gen.max_window_size, gen.stop_words_ids) == ("chatml", 6144, [[151643]])
    assert gen.top_k == 0 and gen.top_p == 0.8 and gen.repetition_penalty == 1.1
    assert gen.extra == {"decay_bound": 0.0}
    assert gen.to_dict()["decay_bound"] == 0.0


def test_generation_config_rejects_unknown_option_and_bad_stop_words():
    with pytest.raises(ValueError, match="top_q"):
        GenerationConfig().updated(top_q=0.5)
    with pytest.raises(ValueError, match="stop_words_ids"):
        GenerationConfig(stop_words_ids=[[]])
    with pytest.raises(ValueError, match="chat_format"):
        GenerationConfig(chat_format="alpaca")
