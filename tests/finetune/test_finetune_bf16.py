"""Pure-bf16 training (`--precision bf16-pure`): stochastic rounding keeps updates that round-to-nearest loses,
BF16AdamW is torch's AdamW to bf16 resolution, full and LoRA runs hold everything in bf16 and learn, resume
is bit-exact (the rounding generator is saved), and the memory estimate is 8 bytes per parameter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ft_data import write_chats
from safetensors.torch import load_file

from qwenlm.cli import main
from qwenlm.finetune import LoraArgs, TrainArgs, train
from qwenlm.finetune import trainer as trainer_module
from qwenlm.finetune.memory import GiB, estimate_memory
from qwenlm.finetune.optim import BF16AdamW, stochastic_round_bf16
from qwenlm.finetune.trainer import prepare, run_loop
from qwenlm.testing import preset_config


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("ft-bf16") / "data.json")


def pure_args(model, data, output, **options) -> TrainArgs:
    defaults = dict(method="full", precision="bf16-pure", batch_size=2, grad_accum=1, gradient_checkpointing=False,
                    save_steps=0, seed=0, learning_rate=3e-3)  # fmt: skip
    return TrainArgs(model=str(model), data=str(data), output=str(output), **{**defaults, **options})


def test_stochastic_rounding_keeps_what_round_to_nearest_loses():
    weight = torch.full((200_000,), 0.02).bfloat16()  # bf16 steps near 0.02 are 2**-13 = 1.2e-4 apart
    below, above = weight[0].float().item(), weight[0].float().item() + 2**-13
    for delta in (1e-5, -3e-5):  # well under half a step: round-to-nearest gives the weight back
        exact = weight.float() + delta
        assert torch.equal(exact.bfloat16(), weight)
        rounded = stochastic_round_bf16(exact, torch.Generator().manual_seed(1))
        assert rounded.dtype == torch.bfloat16
        assert set(rounded.float().unique().tolist()) <= {below - 2**-13, below, above}  # a neighbour, never more
        assert rounded.float().mean().item() == pytest.approx(exact[0].item(), abs=1e-6)  # unbiased on average
        again = stochastic_round_bf16(exact, torch.Generator().manual_seed(1))
        assert torch.equal(rounded, again)  # the seeded generator decides everything
    values = torch.tensor([float("inf"), -float("inf"), 0.0, -2.5, 1.0])
    assert torch.equal(stochastic_round_bf16(values), values.bfloat16())  # representable values stay put


def test_bf16_adamw_is_torch_adamw_to_bf16_resolution_and_moves_tiny_updates():
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 300, generator=generator) * 0.02).bfloat16()
    grads = [torch.randn(64, 300, generator=generator).bfloat16() for _ in range(3)]
    ours, reference = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.float())
    options = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizer, plain = BF16AdamW([ours], seed=1, **options), torch.optim.AdamW([reference], **options)
    for grad in grads:  # each step from the same weights and moments: the difference is bf16's rounding only
        ours.grad, reference.grad = grad.clone(), grad.float()
        optimizer.step()
        plain.step()
        state, want = optimizer.state[ours], plain.state[reference]
        assert ours.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        for key in ("exp_avg", "exp_avg_sq"):  # rounded to nearest
            torch.testing.assert_close(state[key], want[key].bfloat16(), rtol=2**-8, atol=0)
            want[key].copy_(state[key].float())
        largest = torch.maximum(ours.detach().float().abs(), reference.detach().abs())
        spacing = 2.0 ** (torch.frexp(largest)[1] - 8).float()  # bf16 keeps 8 significant bits
        assert ((ours.detach().float() - reference.detach()).abs() <= spacing * 1.001).all()
        reference.data = ours.detach().float()

    # lr 1e-5 on weights near 0.02: round-to-nearest never moves them, stochastic rounding moves them by the update
    start = torch.full((50_000,), 0.02).bfloat16()
    moved = {}
    for stochastic in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = BF16AdamW([param], lr=1e-5, weight_decay=0.0, seed=3, stochastic_rounding=stochastic)
        for _ in range(10):
            param.grad = torch.ones_like(param)  # Adam's step is lr x sign for a constant gradient
            optimizer.step()
        moved[stochastic] = (param.detach().float() - start.float()).mean().item()
    assert moved[False] == 0.0
    assert moved[True] == pytest.approx(-10 * 1e-5, rel=0.1)
    with pytest.raises(ValueError, match="bfloat16 parameters only, got torch.float32"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(3))])


def test_pure_bf16_full_finetuning_holds_bf16_and_learns(finetune_checkpoints, data_file, tmp_path):
    run = prepare(pure_args(finetune_checkpoints["chat"], data_file, tmp_path / "full", max_steps=12), progress=False)
    assert {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
    result = run_loop(run, 0, progress=False)
    assert isinstance(run.optimizer, BF16AdamW)
    states = [t for state in run.optimizer.state.values() for k, t in state.items() if k != "step"]
    assert len(states) == 2 * len(list(run.model.parameters())) and {t.dtype for t in states} == {torch.bfloat16}
    curve = [entry["loss"] for entry in result.log if "loss" in entry]
    assert all(math.isfinite(x) for x in curve) and sum(curve[-3:]) / 3 < curve[0] - 0.4, curve
    saved = load_file(tmp_path / "full" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # the released dtype, no conversion
    assert json.loads((tmp_path / "full" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_pure_bf16_lora_keeps_the_adapter_in_bf16(finetune_checkpoints, data_file, tmp_path):
    args = pure_args(finetune_checkpoints["base"], data_file, tmp_path / "lora", method="lora", max_steps=10,
                     learning_rate=2e-2, lora=LoraArgs(r=4, dropout=0.0))  # fmt: skip
    run = prepare(args, progress=False)
    trained = [p for p in run.model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}  # LoRA A/B and the control-token rows
    curve = [entry["loss"] for entry in run_loop(run, 0, progress=False).log if "loss" in entry]
    assert sum(curve[-3:]) / 3 < curve[0] - 0.2, curve
    assert {t.dtype for t in load_file(tmp_path / "lora" / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_pure_bf16_resume_after_interrupt_is_bit_exact(finetune_checkpoints, data_file, tmp_path, monkeypatch):
    model = finetune_checkpoints["chat"]
    options = dict(max_steps=4, grad_accum=2, batch_size=1, save_steps=0, learning_rate=1e-3)
    train(pure_args(model, data_file, tmp_path / "whole", **options), progress=False)

    step_once = trainer_module.train_step

    def interrupted(run, step):  # Ctrl-C during step 3: the state after 2 steps is saved
        if step == 2:
            raise KeyboardInterrupt
        return step_once(run, step)

    monkeypatch.setattr(trainer_module, "train_step", interrupted)
    with pytest.raises(RuntimeError, match="interrupted after step 2"):
        train(pure_args(model, data_file, tmp_path / "cut", **options), progress=False)
    monkeypatch.undo()
    saved = torch.load(tmp_path / "cut" / "checkpoint-2" / "rng-0.pt", weights_only=False)
    fresh = torch.Generator().manual_seed(0).get_state()
    assert not torch.equal(saved["generators"]["stochastic_rounding"], fresh)  # it advanced, and it is saved
    train(pure_args(model, data_file, tmp_path / "cut", resume="latest", **options), progress=False)
    whole, resumed = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name
    for result in (tmp_path / "cut").glob("model*.safetensors"):
        result.unlink()  # as if interrupted again after checkpoint-2 (a finished run is not resumed at all)
    with pytest.raises(ValueError, match="pure_bf16 True -> False"):
        train(pure_args(model, data_file, tmp_path / "cut", resume="latest", precision="fp32", **options))


def test_estimate_is_8_bytes_per_parameter_and_1_8b_fits_in_24_gib(tmp_path, data_file, capsys):
    folder = tmp_path / "q18"
    folder.mkdir()
    preset_config("1.8b").save_pretrained(folder)  # config.json alone
    shape = dict(batch_size=1, model_max_length=512, gradient_checkpointing=True)
    pure = estimate_memory(pure_args(folder, data_file, "-", **shape), world=1, device="cpu")
    master = estimate_memory(pure_args(folder, data_file, "-", precision="bf16", **shape), world=1, device="cpu")
    count = 1_836_828_672  # Qwen-1.8B's parameters
    state = pure.parts["weights (bf16)"] + pure.parts["gradients (bf16)"] + pure.parts["AdamW moments (bf16)"]
    assert state == 8 * count
    assert pure.total < 16.5 * GiB < 24 * GiB < master.total  # 15.6 GiB vs 32.8 GiB
    assert master.total - pure.total == pytest.approx((16 + 2 - 8) * count)  # no master copy, no autocast copies
    main(["finetune", "--model", str(folder), "--data", str(data_file), "--output", "-", "--method", "full",
          "--model-max-length", "512", "--batch-size", "1", "--bf16", "--pure_bf16", "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("memory estimate for full (bf16-pure)") and "AdamW moments (bf16)" in out
    assert "rounded to bf16 stochastically" in out
    with pytest.raises(SystemExit, match="DeepSpeed keeps its own fp32 master weights"):
        main(["finetune", "--model", str(folder), "--data", str(data_file), "--output", "-", "--precision",
              "bf16-pure", "--deepspeed", "ds_zero2.json", "--dry-run"])  # fmt: skip
    with pytest.raises(SystemExit, match="conflicting precision flags"):
        main(["finetune", "--model", str(folder), "--data", str(data_file), "--output", "-", "--pure_bf16",
              "--fp32", "--dry-run"])  # fmt: skip
