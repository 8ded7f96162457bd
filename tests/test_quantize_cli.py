"""`qwenlm quantize` end to end on the tiny checkpoint: file layout, packing, reload, quality, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qwenlm.quant.quantize as quantize_module
from qwenlm.cli import main
from qwenlm.model import QwenConfig, load_model
from qwenlm.quant.calibration import (
    CalibrationError,
    builtin_samples,
    read_calibration_file,
    tokenize_samples,
)
from qwenlm.quant.gptq import QuantResult
from qwenlm.quant.quantize import QUANTIZED_MODULES, quantize_checkpoint

GROUP = 32  # divides every in_features of the tiny model (64, 64, 64, 64, 128)
CALIBRATION_SAMPLES = 8
SEQ_LEN = 48
SPEC_QUANTIZE_CONFIG_KEYS = {
    "bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
    "model_name_or_path", "model_file_base_name",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Fixtures: one CLI run per (method, bits), with the quantizer's results kept through a spy
# --------------------------------------------------------------------------------------------------
def _record(sample) -> dict:
    return {"text": sample} if isinstance(sample, str) else {"messages": sample}


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    """Built-in-style samples as .jsonl (text, OpenAI messages and Qwen finetune conversations)."""
    samples = builtin_samples()
    records = [_record(s) for s in samples[: CALIBRATION_SAMPLES - 1]]
    records.append(
        {"conversations": [{"from": "user", "value": "写一句问候语。"}, {"from": "assistant", "value": "你好！"}]}
    )
    file = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in records), encoding="utf-8")
    return file


def run_cli(argv: list[str]) -> dict[str, QuantResult]:
    """`qwenlm quantize ...` through `main`, returning the QuantResult of every quantized module."""
    results: dict[str, QuantResult] = {}
    real = quantize_module.quantize_checkpoint

    def spy(*args, **kwargs):
        return real(*args, on_quantized=lambda name, result: results.__setitem__(name, result), **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize_module, "quantize_checkpoint", spy)
        main(["quantize", *argv])
    return results


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, calibration_file, tmp_path_factory):
    """(method, bits) -> (output folder, results); each run once per module, on first use."""
    runs: dict[tuple[str, int], tuple[Path, dict[str, QuantResult]]] = {}

    def get(method: str, bits: int) -> tuple[Path, dict[str, QuantResult]]:
        if (method, bits) not in runs:
            out = tmp_path_factory.mktemp(f"{method}{bits}") / "out"
            args = ["--model", str(tiny_checkpoint), "--output", str(out), "--bits", str(bits)]
            args += ["--group-size", str(GROUP), "--method", method, "--seq-len", str(SEQ_LEN)]
            if method == "gptq":
                count = "all" if bits == 8 else str(CALIBRATION_SAMPLES)
                args += ["--calibration", str(calibration_file), "--num-samples", count]
            runs[method, bits] = out, run_cli(args)
        return runs[method, bits]

    return get


RUNS = [("gptq", 4), ("gptq", 8), ("rtn", 4), ("rtn", 8)]


def _module_names(num_layers: int) -> list[str]:
    return [f"transformer.h.{i}.{m}" for i in range(num_layers) for m in QUANTIZED_MODULES]


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


# --------------------------------------------------------------------------------------------------
# Layout (spec 11.1 / 11.2): what other GPTQ loaders read
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, bits", RUNS)
def test_quantize_writes_spec_tensor_layout(quantized, tiny_checkpoint, method, bits):
    out, results = quantized(method, bits)
    config = QwenConfig.from_pretrained(tiny_checkpoint)
    tensors = _read_all(out)
    pf = 32 // bits
    shapes = {"attn.c_attn": (64, 192), "attn.c_proj": (64, 64), "mlp.w1": (64, 128), "mlp.w2": (64, 128),
              "mlp.c_proj": (128, 64)}  # fmt: skip
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "transformer.wte.weight": (torch.float16, (config.vocab_size, 64)),
        "transformer.ln_f.weight": (torch.float16, (64,)),
        "lm_head.weight": (torch.float16, (config.vocab_size, 64)),
    }
    for i in range(config.num_hidden_layers):
        expected[f"transformer.h.{i}.ln_1.weight"] = (torch.float16, (64,))
        expected[f"transformer.h.{i}.ln_2.weight"] = (torch.float16, (64,))
        for module, (k, n) in shapes.items():
            name = f"transformer.h.{i}.{module}"
            expected[f"{name}.qweight"] = (torch.int32, (k // pf, n))
            expected[f"{name}.qzeros"] = (torch.int32, (k // GROUP, n // pf))
            expected[f"{name}.scales"] = (torch.float16, (k // GROUP, n))
            expected[f"{name}.g_idx"] = (torch.int32, (k,))
            expected[f"{name}.bias"] = (torch.float16, (n,))
    assert {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()} == expected
    assert sorted(results) == sorted(_module_names(config.num_hidden_layers))
    # Symmetric: every stored zero is 2^(b-1) - 1 (AutoGPTQ's off-by-one), i.e. 0x77777777 / 0x7F7F7F7F.
    word = 0x77777777 if bits == 4 else 0x7F7F7F7F
    assert all(bool((t == word).all()) for name, t in tensors.items() if name.endswith("qzeros"))
    assert all(torch.equal(t, torch.arange(t.numel(), dtype=torch.int32) // GROUP)
               for name, t in tensors.items() if name.endswith("g_idx"))  # fmt: skip


@pytest.mark.parametrize("method, bits", [("gptq", 4), ("rtn", 8)])
def test_quantize_writes_configs_and_copies_tokenizer_files(quantized, tiny_checkpoint, method, bits):
    out, _ = quantized(method, bits)
    quantize_config = json.loads((out / "quantize_config.json").read_text())
    assert set(quantize_config) == SPEC_QUANTIZE_CONFIG_KEYS
    assert quantize_config == {
        "bits": bits, "group_size": GROUP, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
        "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
    }  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {**quantize_config, "quant_method": "gptq", "checkpoint_format": "gptq"}
    assert config["torch_dtype"] == "float16" and config["fp16"] is True and config["bf16"] is False
    source = json.loads((tiny_checkpoint / "config.json").read_text())
    assert {k: v for k, v in config.items() if k in source and k not in ("fp16", "bf16", "fp32")} == {
        k: v for k, v in source.items() if k not in ("fp16", "bf16", "fp32")
    }
    for name in ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert not list(out.parent.glob(".*partial*"))  # the temporary folder was renamed into place


def _unpack_python(words: list[list[int]], bits: int) -> list[list[int]]:
    """Independent AutoGPTQ unpacking along rows, on plain Python ints: value j of a word sits at bit b*j."""
    pf, mask = 32 // bits, (1 << bits) - 1
    out = []
    for row in words:
        for j in range(pf):
            out.append([((w & 0xFFFFFFFF) >> (bits * j)) & mask for w in row])
    return out


@pytest.mark.parametrize("method, bits", [("gptq", 4), ("gptq", 8), ("rtn", 4)])
def test_packed_tensors_hold_the_quantizer_codes(quantized, method, bits):
    out, results = quantized(method, bits)
    tensors = _read_all(out)
    for name, result in results.items():
        codes = _unpack_python(tensors[f"{name}.qweight"].tolist(), bits)  # [K, N], input-major
        assert codes == result.q.T.tolist(), name
        zeros_t = _unpack_python(tensors[f"{name}.qzeros"].T.tolist(), bits)  # qzeros packs along N
        assert [[z + 1 for z in row] for row in zeros_t] == result.zeros.T.tolist(), name
        assert torch.equal(tensors[f"{name}.scales"], result.scales), name
        assert torch.equal(tensors[f"{name}.g_idx"], result.g_idx), name


def test_bias_tensors_keep_the_float_bias_or_zeros(quantized, tiny_model):
    out, _ = quantized("rtn", 4)
    tensors = _read_all(out)
    float_state = tiny_model.state_dict()
    for name in _module_names(tiny_model.config.num_hidden_layers):
        bias = float_state.get(f"{name}.bias")
        expected = torch.zeros(tensors[f"{name}.bias"].shape) if bias is None else bias
        assert torch.equal(tensors[f"{name}.bias"], expected.half()), name
    assert bool(tensors["transformer.h.0.attn.c_attn.bias"].any())  # c_attn has a real bias


# --------------------------------------------------------------------------------------------------
# Reload and quality
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, bits", RUNS)
def test_output_reloads_with_exactly_the_quantized_weights(quantized, tiny_model, method, bits):
    out, results = quantized(method, bits)
    model = load_model(out, torch_dtype=torch.float32, progress=False)
    for name, result in results.items():
        module = model.get_submodule(name)
        assert torch.equal(module.dequantized_weight(torch.float32), result.dequantize(torch.float32)), name
    for name in ("transformer.wte.weight", "transformer.h.1.ln_2.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[name], tiny_model.state_dict()[name].half().float()), name
    assert torch.isfinite(model(torch.tensor([[9707, 11, 1879, 0]])).logits).all()


def test_gptq_logits_closer_to_float_than_rtn(quantized, tiny_model, tiny_checkpoint, calibration_file):
    """On the calibration text, GPTQ's logits are nearer the float model's than round-to-nearest's.

    Measured on tiny random models (seeds 0-2), 4 bits, group 32: mean squared logit error ratio
    gptq/rtn 0.53-0.56. (On held-out text the ratio is ~1 for these random weights and 384 tokens of
    calibration, so the assertion stays on the calibration samples, where GPTQ's objective lives.)
    """
    rows = quantize_module.calibration_ids(tiny_checkpoint, calibration_file, CALIBRATION_SAMPLES, SEQ_LEN)
    models = {"float": tiny_model}
    for method in ("gptq", "rtn"):
        models[method] = load_model(quantized(method, 4)[0], torch_dtype=torch.float32, progress=False)
    with torch.inference_mode():
        logits = {k: [m(torch.tensor([row]), use_cache=False).logits for row in rows] for k, m in models.items()}
    errors = {
        method: sum(float((a - b).pow(2).mean()) for a, b in zip(logits[method], logits["float"], strict=True))
        for method in ("gptq", "rtn")
    }
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_library_desc_act_sharded_output_reloads(tiny_checkpoint, calibration_file, tmp_path):
    results: dict[str, QuantResult] = {}
    report = quantize_checkpoint(
        tiny_checkpoint, tmp_path / "out", bits=4, group_size=GROUP, calibration=calibration_file, num_samples=6,
        seq_len=48, desc_act=True, true_sequential=False, progress=False, max_shard_size="8MB",
        on_quantized=results.__setitem__,
    )  # fmt: skip
    out = report.output_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(_read_all(out))
    assert report.num_samples == 6 and 0 < report.num_tokens <= 6 * 48
    assert set(report.losses) == set(results) and all(loss >= 0 for loss in report.losses.values())
    assert json.loads((out / "quantize_config.json").read_text())["desc_act"] is True
    permuted = [r for r in results.values() if not torch.equal(r.g_idx, torch.arange(r.g_idx.numel()) // GROUP)]
    assert permuted  # act-order reordered the groups
    model = load_model(out, torch_dtype=torch.float32, progress=False)
    for name, result in results.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), result.dequantize()), name


def test_builtin_calibration_is_used_with_a_notice(tiny_checkpoint, tmp_path, capsys):
    results = run_cli(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out"), "--bits", "8",
                       "--group-size", "64", "--seq-len", "16", "--num-samples", "4"])  # fmt: skip
    err = capsys.readouterr().err
    assert "built-in" in err and "--calibration" in err
    assert len(results) == 10
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_quantize_into_existing_empty_folder(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    run_cli(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out"), "--bits", "4", "--method", "rtn",
             "--group-size", "-1"])  # fmt: skip
    assert (tmp_path / "out" / "quantize_config.json").is_file()
    assert json.loads((tmp_path / "out" / "quantize_config.json").read_text())["group_size"] == -1


# --------------------------------------------------------------------------------------------------
# Bad input: a clear one-line error, before any heavy work, and nothing written
# --------------------------------------------------------------------------------------------------
def _cli_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(["quantize", *argv])
    return str(info.value.code)


def _base(tiny_checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny_checkpoint), "--output", str(out), "--bits", "4", "--group-size", "32", *extra]


def test_cli_refuses_without_model(tmp_path, capsys):
    assert _cli_error(["--output", str(tmp_path / "out"), "--bits", "4"]) == "2"
    assert "--model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_bits(tiny_checkpoint, tmp_path, capsys):
    assert _cli_error(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--bits", "3"]) == "2"
    assert "--bits" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_checkpoint(tiny_checkpoint, tmp_path / "o", bits=3, method="rtn")


def test_group_size_not_dividing_names_the_module(tiny_checkpoint, tmp_path):
    message = _cli_error(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--bits", "4",
                          "--group-size", "48", "--method", "rtn"])  # fmt: skip
    assert message.startswith("error: group_size 48 does not divide in_features=64 of transformer.h.*.attn.c_attn")
    assert not (tmp_path / "o").exists()
    message = _cli_error(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--bits", "8"])
    assert "group_size 128 does not divide in_features=64" in message  # the default is too big for the tiny model


def test_missing_calibration_file(tiny_checkpoint, tmp_path):
    message = _cli_error(_base(tiny_checkpoint, tmp_path / "o", "--calibration", str(tmp_path / "nope.jsonl")))
    assert message.startswith("error: calibration file") and "nope.jsonl" in message and "does not exist" in message
    assert not (tmp_path / "o").exists()


def test_empty_calibration_file(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert "has no samples" in _cli_error(_base(tiny_checkpoint, tmp_path / "o", "--calibration", str(empty)))


def test_too_few_calibration_samples_says_how_many(tiny_checkpoint, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("First paragraph.\n\nSecond one,\nover two lines.\n\n\nThird.\n")
    message = _cli_error(_base(tiny_checkpoint, tmp_path / "o", "--calibration", str(small), "--num-samples", "5"))
    assert "has 3 samples, fewer than num_samples=5" in message and "all" in message
    assert "has 3 samples" in _cli_error(_base(tiny_checkpoint, tmp_path / "o", "--calibration", str(small)))
    assert not (tmp_path / "o").exists()


def test_bad_num_samples_is_refused(tiny_checkpoint, calibration_file, tmp_path, capsys):
    message = _cli_error(_base(tiny_checkpoint, tmp_path / "o", "--calibration", str(calibration_file),
                               "--num-samples", "0"))  # fmt: skip
    assert "num_samples must be >= 1" in message
    assert _cli_error(_base(tiny_checkpoint, tmp_path / "o", "--num-samples", "many")) == "2"
    assert "expected a number or 'all'" in capsys.readouterr().err


def test_already_quantized_checkpoint_is_refused(quantized, tmp_path):
    out, _ = quantized("rtn", 4)
    message = _cli_error(_base(out, tmp_path / "again", "--method", "rtn"))
    assert "is already quantized (gptq)" in message and "float checkpoint" in message


def test_output_folder_not_empty_is_refused(tiny_checkpoint, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    message = _cli_error(_base(tiny_checkpoint, tmp_path / "o", "--method", "rtn"))
    assert "already exists and is not empty" in message
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["keep.txt"]


def test_asymmetric_needs_v2_format(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="gptq_v2"):
        quantize_checkpoint(tiny_checkpoint, tmp_path / "o", bits=4, group_size=32, method="rtn", sym=False)


# --------------------------------------------------------------------------------------------------
# Calibration files
# --------------------------------------------------------------------------------------------------
def test_read_calibration_file_formats(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        json.dumps({"text": "plain"}) + "\n\n"
        + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}) + "\n"
        + json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    assert read_calibration_file(jsonl) == [
        "plain",
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    ]
    as_json = tmp_path / "b.json"
    as_json.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert read_calibration_file(as_json) == ["one", "two"]
    txt = tmp_path / "c.txt"
    txt.write_text("para one\r\nstill one\r\n\r\npara two\n\n\n\n", encoding="utf-8")
    assert read_calibration_file(txt) == ["para one\nstill one", "para two"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n{"prompt": "x"}\n', "line 2: expected a 'text' string"),
        ("bad.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', "turn 0 needs a role"),
        ("bad.json", '{"text": "not a list"}', "must hold a JSON list"),
        ("bad.csv", "text\nhello\n", "must be .jsonl, .json or .txt"),
    ],
)
def test_bad_calibration_files(tmp_path, name, content, message):
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        read_calibration_file(file)


def test_tokenize_samples_renders_chatml_and_truncates(qwen_tokenizer):
    tok = qwen_tokenizer
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text_ids, chat_ids, prompt_ids = tokenize_samples(tok, ["Hello world", chat, chat[:1]], seq_len=100)
    assert text_ids == tok.encode("Hello world")
    assert chat_ids[0] == tok.im_start_id and chat_ids[-2:] == [tok.im_end_id, *tok.encode("\n")]
    assert tok.decode(chat_ids).endswith("<|im_start|>assistant\nhello<|im_end|>\n")
    assert tok.decode(prompt_ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenize_samples(tok, ["a b c d e f g h"], seq_len=3) == [tok.encode("a b c d e f g h")[:3]]
    with pytest.raises(CalibrationError, match="sample 0"):
        tokenize_samples(tok, [[{"role": "assistant", "content": "first"}]], seq_len=10)


def test_builtin_samples_are_varied():
    samples = builtin_samples()
    texts = [s for s in samples if isinstance(s, str)]
    chats = [s for s in samples if not isinstance(s, str)]
    assert len(samples) >= 24 and len(chats) >= 4
    assert any("的" in t for t in texts) and any("the" in t for t in texts) and any("def " in t for t in texts)
