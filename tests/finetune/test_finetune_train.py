"""Training on tiny real checkpoints (in process): the loss goes down for full and LoRA, Q-LoRA runs, the
loss pieces equal their plain versions, adapters reload and merge to the same logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ft_data import write_chats
from safetensors import safe_open
from safetensors.torch import load_file

from qwenlm import AutoModelForCausalLM
from qwenlm.finetune import LoraArgs, TrainArgs, train
from qwenlm.finetune.adapters import read_adapter
from qwenlm.finetune.loss import CausalLMLoss, chunked_cross_entropy, enable_gradient_checkpointing
from qwenlm.finetune.merge import merge_lora
from qwenlm.finetune.schedule import lr_factor
from qwenlm.model import load_model


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """24 short arithmetic chats (the model can learn the answer format quickly)."""
    return write_chats(tmp_path_factory.mktemp("ft-data") / "data.json")


def run(model, data, output, **options) -> object:
    lora = LoraArgs(**options.pop("lora", {}))
    defaults = dict(batch_size=4, grad_accum=1, gradient_checkpointing=False, save_steps=0, seed=0)
    return train(TrainArgs(model=str(model), data=str(data), output=str(output), lora=lora, **{**defaults, **options}),
                 progress=False)  # fmt: skip


def losses(result) -> list[float]:
    return [entry["loss"] for entry in result.log if "loss" in entry]


@pytest.fixture(scope="module")
def lora_run(finetune_checkpoints, data_file, tmp_path_factory):
    """A base-model LoRA run (so control-token rows are trained too), kept for the reload/merge tests."""
    out = tmp_path_factory.mktemp("ft-lora") / "out"
    result = run(finetune_checkpoints["base"], data_file, out, method="lora", max_steps=20, learning_rate=2e-2,
                 batch_size=2, lora={"r": 8, "dropout": 0.0})  # fmt: skip
    return result, out


def test_lora_lowers_the_loss_and_saves_a_peft_adapter(lora_run, finetune_checkpoints):
    result, out = lora_run
    curve = losses(result)
    assert len(curve) == 20 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.4, curve
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(finetune_checkpoints["base"].resolve())
    assert (
        config["r"] == 8
        and config["lora_alpha"] == 16
        and set(config["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"}
    )
    assert config["trainable_token_indices"] == {"wte": [151643, 151644, 151645], "lm_head": [151643, 151644, 151645]}
    adapter = read_adapter(out)
    assert len(adapter.lora) == 5  # c_attn, attn.c_proj, w1, w2, mlp.c_proj of the one block
    assert "transformer.h.0.attn.c_attn" in adapter.lora and set(adapter.token_rows) == {"transformer.wte", "lm_head"}
    assert (out / "qwen.tiktoken").is_file()


def test_full_finetuning_lowers_the_loss_and_writes_the_original_layout(finetune_checkpoints, data_file, tmp_path):
    result = run(finetune_checkpoints["chat"], data_file, tmp_path / "full", method="full", max_steps=15,
                 learning_rate=3e-3, batch_size=2)  # fmt: skip
    curve = losses(result)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.4, curve
    model = load_model(tmp_path / "full", progress=False)  # the released layout: loads as any checkpoint
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    files = [safe_open(path, "pt") for path in (tmp_path / "full").glob("*.safetensors")]
    stored = {f.get_slice(name).get_dtype() for f in files for name in f.keys()}  # noqa: SIM118
    assert config["torch_dtype"] == "bfloat16" and stored == {"BF16"}  # the base's released dtype, not fp32 masters
    base = load_model(finetune_checkpoints["chat"], torch_dtype=torch.float32, progress=False)
    assert set(model.state_dict()) == set(base.state_dict())
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    for name in ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        assert (tmp_path / "full" / name).is_file()


def test_learning_rate_follows_warmup_then_cosine(lora_run):
    result, _ = lora_run
    rates = [entry["learning_rate"] for entry in result.log if "learning_rate" in entry]
    expected = [2e-2 * lr_factor(step, 20, 1, "cosine") for step in range(20)]
    assert rates == pytest.approx(expected)
    assert rates[0] == 0 and rates[1] == pytest.approx(2e-2) and rates[-1] < 3e-4  # it decays: no WarmupLR trap


def test_saved_adapter_reloads_to_identical_logits(lora_run, finetune_checkpoints):
    _, out = lora_run
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 18, 5519, 220, 19, 30, 151645, 198, 151644, 77091, 198]])
    peft = pytest.importorskip("peft")
    reference = peft.PeftModel.from_pretrained(load_model(finetune_checkpoints["base"], torch_dtype=torch.float32,
                                                          progress=False), str(out)).eval()  # fmt: skip
    with torch.no_grad():
        want = reference.base_model.model(ids, use_cache=False).logits
        unmerged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, merge_adapter=False)
        merged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
        got_unmerged = unmerged(ids, use_cache=False).logits
        got_merged = merged(ids, use_cache=False).logits
        base = load_model(finetune_checkpoints["base"], torch_dtype=torch.float32, progress=False)(ids).logits
    torch.testing.assert_close(got_unmerged, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_merged, want, rtol=0, atol=2e-5)
    assert (got_merged - base).abs().max() > 0.1  # the adapter changed something


def test_merge_lora_equals_the_adapter_applied(lora_run, tmp_path):
    _, out = lora_run
    merged_dir = merge_lora(out, tmp_path / "merged", progress=False)
    ids = torch.randint(0, 151000, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[0, 2], ids[1, 4] = 151644, 151645  # rows the adapter replaced
    with torch.no_grad():
        merged = load_model(merged_dir, torch_dtype=torch.float32, progress=False)(ids).logits
        applied = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, merge_adapter=False)(ids).logits
        base = load_model(read_adapter(out).base_model, torch_dtype=torch.float32, progress=False)(ids).logits
    # The merged weights are stored in the base's dtype (bf16), so they differ from W + s*B@A by its rounding.
    assert (merged - applied).abs().max() < 0.05 * (applied - base).abs().max()
    adapter = read_adapter(out)
    a, b = adapter.lora["transformer.h.0.mlp.w1"]
    name = "transformer.h.0.mlp.w1.weight"
    stored = load_file(Path(adapter.base_model) / "model.safetensors")[name]
    written = load_file(merged_dir / "model.safetensors")[name]
    assert written.dtype == stored.dtype == torch.bfloat16
    assert torch.equal(written, (stored.float() + adapter.scaling("transformer.h.0.mlp.w1") * (b @ a)).bfloat16())
    with pytest.raises(ValueError, match="already exists and is not empty"):
        merge_lora(out, merged_dir, progress=False)


@pytest.fixture(scope="module")
def gptq_base(finetune_checkpoints, tmp_path_factory):
    from qwenlm.quant.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("ft-gptq") / "int4"
    quantize_checkpoint(finetune_checkpoints["chat"], out, 4, group_size=32, method="rtn", progress=False)
    return out


def test_qlora_on_gptq_int4_trains_and_merges_into_the_float_base(gptq_base, finetune_checkpoints, data_file, tmp_path):
    result = run(gptq_base, data_file, tmp_path / "q", method="qlora", max_steps=6, learning_rate=1e-2,
                 lora={"r": 4})  # fmt: skip
    assert all(math.isfinite(x) for x in losses(result))
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 18, 151645, 198]])
    with torch.no_grad():
        adapted = AutoModelForCausalLM.from_pretrained(tmp_path / "q", torch_dtype=torch.float32)
        assert type(adapted.transformer.h[0].attn.c_attn).__name__ == "LoraLinear"  # kept beside the int4 weight
        adapted(ids)
    with pytest.raises(ValueError, match="GPTQ .* cannot be merged into.*--model"):
        merge_lora(tmp_path / "q", tmp_path / "m", progress=False)
    requantized = merge_lora(tmp_path / "q", tmp_path / "m", base=finetune_checkpoints["chat"], requantize="rtn",
                             group_size=32, progress=False)  # fmt: skip
    assert json.loads((requantized / "quantize_config.json").read_text())["bits"] == 4
    assert load_model(requantized, progress=False).quantization == "GPTQ 4-bit"


def test_qlora_on_the_fly_int4_base_model_trains_token_rows(finetune_checkpoints, data_file, tmp_path):
    result = run(finetune_checkpoints["base"], data_file, tmp_path / "q", method="qlora", max_steps=3,
                 batch_size=2, learning_rate=1e-2, lora={"r": 4, "quant_group_size": 32})  # fmt: skip
    assert all(math.isfinite(x) for x in losses(result))
    adapter = read_adapter(tmp_path / "q")
    assert set(adapter.token_rows) == {"transformer.wte", "lm_head"}
    ids = torch.tensor([[151644, 77091, 198, 18]])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization="int4", quantization_group_size=32)
    assert type(model.transformer.wte).__name__ == "TokenRows"  # the quantized embedding is wrapped
    assert torch.isfinite(model(ids).logits).all()


def test_chunked_loss_equals_plain_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = labels[1, 5:] = -100
    rows = []
    head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    total, count = chunked_cross_entropy(hidden, labels, head, chunk_size=3)  # 6 targets: 2 chunks, recomputed
    total.backward()
    assert max(rows) == 3 and sum(rows) == 2 * count  # never more than a chunk of logits; each recomputed once
    grad = hidden.grad.clone()
    hidden.grad = None
    want = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    want.backward()
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(grad, hidden.grad)


def test_gradient_checkpointing_and_packing_keep_the_math(finetune_checkpoints):
    model = load_model(finetune_checkpoints["chat"], torch_dtype=torch.float32, progress=False).train()
    loss = CausalLMLoss(model, chunk_size=4)
    ids = torch.randint(0, 151000, (1, 12), generator=torch.Generator().manual_seed(1))

    def grads(*args):
        model.zero_grad()
        total, _ = loss(*args)
        total.backward()
        return total.detach(), model.transformer.h[0].mlp.w1.weight.grad.clone()

    plain = grads(ids, ids)
    enable_gradient_checkpointing(model)
    checkpointed = grads(ids, ids)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    # one packed row holding two samples == the two samples run alone
    first, second = ids[:, :5], ids[:, 5:]
    segments = torch.tensor([[1] * 5 + [2] * 7])
    labels = ids.clone()
    labels[0, 5] = -100  # a sample's first token is never a target
    packed, _ = loss(ids, labels, segments)
    alone = loss(first, first)[0] + loss(second, second)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_eval_loss_and_log_file(finetune_checkpoints, data_file, tmp_path):
    result = run(finetune_checkpoints["chat"], data_file, tmp_path / "e", method="lora", max_steps=4, val_size=4,
                 eval_steps=2, logging_steps=2, lora={"r": 4})  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "e" / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [2, 4]
    assert [line["step"] for line in lines if "eval_loss" in line] == [2, 4]
    assert {"step", "loss", "learning_rate", "tokens", "tokens_per_second", "grad_norm"} <= set(lines[0])
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)
