"""`qwenlm finetune` / `merge-lora` from the command line: bad input is one clear line (no traceback), the
reference scripts' flags run, --show-example and --dry-run."""

from __future__ import annotations

import json

import pytest
from ft_data import write_chats

from qwenlm.cli import main
from qwenlm.testing import preset_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("ft-cli") / "data.json", count=16)


def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return str(exc.value.code)


def test_bad_input_is_one_clear_error(finetune_checkpoints, data, tmp_path):
    chat = str(finetune_checkpoints["chat"])
    base = ["finetune", "--model", chat, "--output", str(tmp_path / "out"), "--method", "lora"]
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    question = {"messages": [{"role": "user", "content": "only a question"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(question) + "\n")
    assert error_of([*base, "--data", str(bad)]) == f"error: {bad}:2: the conversation has no assistant turn, so " \
                                                    "nothing would be trained"  # fmt: skip
    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps([{"conversations": [{"from": "user", "value": "a"}, {"from": "bot", "value": "b"}]}]))
    assert error_of([*base, "--data", str(roles)]).startswith(f"error: {roles}[0]: turn 1: unknown role 'bot'")
    assert "no sample has anything to train" in error_of([*base, "--data", str(data), "--model-max-length", "16"])
    assert "does not exist" in error_of([*base, "--data", str(tmp_path / "none.json")])
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    message = error_of(["finetune", "--model", chat, "--data", str(data), "--output", str(used)])
    assert "already exists and is not empty" in message and "--resume" in message and "--overwrite" in message
    assert "no checkpoint in" in error_of([*base[:-2], "--data", str(data), "--output", str(used), "--resume"])
    assert "contradicts --use_lora" in error_of([*base, "--data", str(data), "--use_lora", "--q_lora"])
    assert "fp16 training needs a CUDA GPU" in error_of([*base, "--data", str(data), "--fp16", "True"])
    assert "AdamW (adamw_torch) only" in error_of([*base, "--data", str(data), "--optim", "sgd"])
    assert not used.joinpath("checkpoint-1").exists() and not (tmp_path / "out").exists()  # refused before work


def test_reference_script_flags_run(finetune_checkpoints, data, tmp_path):
    """finetune_lora_single_gpu.sh's command line, with finetune.py replaced by `-m qwenlm finetune`."""
    out = tmp_path / "output_qwen"
    main(["finetune", "--model_name_or_path", str(finetune_checkpoints["chat"]), "--data_path", str(data),
          "--bf16", "True", "--output_dir", str(out), "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
          "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "8", "--evaluation_strategy", "no",
          "--save_strategy", "steps", "--save_steps", "1000", "--save_total_limit", "10", "--learning_rate", "3e-4",
          "--weight_decay", "0.1", "--adam_beta2", "0.95", "--warmup_ratio", "0.01", "--lr_scheduler_type", "cosine",
          "--logging_steps", "1", "--report_to", "none", "--model_max_length", "512", "--lazy_preprocess", "True",
          "--gradient_checkpointing", "--use_lora", "--disable_tqdm", "True"])  # fmt: skip
    args = json.loads((out / "finetune_args.json").read_text())
    assert (args["method"], args["precision"], args["batch_size"], args["grad_accum"]) == ("lora", "bf16", 2, 8)
    assert (args["lora"]["r"], args["lora"]["alpha"], args["lora"]["dropout"]) == (64, 16, 0.05)
    assert (out / "adapter_model.safetensors").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1  # 16 samples / (2 x 8) = 1 step


def test_show_example_marks_trained_tokens(finetune_checkpoints, data, capsys):
    main(["finetune", "--model", str(finetune_checkpoints["chat"]), "--data", str(data), "--output", "-",
          "--show-example", "1"])  # fmt: skip
    header, body = capsys.readouterr().out.split("\n\n", 1)
    assert "mask=assistant" in header and "«4 plus 39 is 43.<|im_end|>\n»" in body
    assert "«" not in body.split("<|im_start|>assistant")[0]  # nothing before the reply is trained
    main(["finetune", "--model", str(finetune_checkpoints["chat"]), "--data", str(data), "--output", "-",
          "--show-example", "1", "--mask", "reference"])  # fmt: skip
    shown = capsys.readouterr().out  # the user turn's <|im_end|>\n and the next <|im_start|> are trained
    assert "What is 4 plus 39?«<|im_end|>\n<|im_start|>»assistant" in shown


def test_dry_run_says_what_does_not_fit(tmp_path, data, capsys):
    folder = tmp_path / "q18"
    folder.mkdir()
    preset_config("1.8b").save_pretrained(folder)  # config.json alone: --dry-run loads nothing else
    for method in ("full", "lora", "qlora"):
        main(["finetune", "--model", str(folder), "--data", str(data), "--output", "-", "--method", method,
              "--dry-run", "--precision", "bf16"])  # fmt: skip
    out = capsys.readouterr().out.split("memory estimate for ")[1:]
    totals = [float(part.split("total (estimate)")[1].split("GiB")[0]) for part in out]
    assert totals[0] > 24 > totals[1] > totals[2]  # full needs > 24 GiB at 1.8B (16 bytes per parameter)
    assert "full finetuning keeps 16 bytes per parameter" in out[0] or "fits" in out[0]


def test_overwrite_and_resume_touch_only_what_a_run_wrote(finetune_checkpoints, data, tmp_path):
    """--overwrite never deletes a model's weights (the --model folder, or any folder no run wrote); it removes
    all of an earlier run's result; --resume refuses a finished run and changed settings; a half-written log
    line (the kill's) does not stop a resume."""
    import shutil

    from qwenlm import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(finetune_checkpoints["chat"], model)
    weights = sorted(p.name for p in model.glob("model*.safetensors"))
    lora = ["finetune", "--data", str(data), "--method", "lora", "--lora-r", "2", "--batch-size", "1",
            "--grad-accum", "1", "--disable_tqdm"]  # fmt: skip
    message = error_of([*lora, "--model", str(model), "--output", str(model), "--overwrite", "--max-steps", "1"])
    assert "is the --model folder" in message
    other = tmp_path / "other"
    shutil.copytree(finetune_checkpoints["base"], other)
    message = error_of([*lora, "--model", str(model), "--output", str(other), "--overwrite", "--max-steps", "1"])
    assert "starts over only in a folder an earlier `qwenlm finetune` run wrote" in message
    assert sorted(p.name for p in model.glob("model*.safetensors")) == weights and any(other.glob("model*"))

    out = tmp_path / "out"
    main(["finetune", "--model", str(model), "--data", str(data), "--method", "full", "--output", str(out),
          "--max-steps", "1", "--batch-size", "1", "--grad-accum", "1", "--disable_tqdm"])  # fmt: skip
    main([*lora, "--model", str(model), "--output", str(out), "--overwrite", "--max-steps", "4", "--save-steps", "2"])
    assert not list(out.glob("model*.safetensors")) and not (out / "config.json").exists()
    AutoModelForCausalLM.from_pretrained(out)  # the adapter folder loads (no stale full-model files beside it)
    assert "holds a finished run" in error_of([*lora, "--model", str(model), "--output", str(out), "--resume",
                                                "--max-steps", "4", "--save-steps", "2"])  # fmt: skip

    for name in ("adapter_model.safetensors", "adapter_config.json"):  # as if killed after checkpoint-2
        (out / name).unlink()
    resume = [*lora, "--model", str(model), "--output", str(out), "--resume", "--save-steps", "2"]
    message = error_of([*resume, "--max-steps", "4", "--learning-rate", "1"])
    assert "different settings" in message and "peak_lr" in message
    assert "total steps" in error_of([*resume, "--max-steps", "6"])
    with (out / "train_log.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 1')  # the line a kill cut short
    main([*resume, "--max-steps", "4"])
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (out / "adapter_model.safetensors").is_file()


def test_data_files_are_utf8_with_or_without_a_bom(finetune_checkpoints, tmp_path):
    chat = str(finetune_checkpoints["chat"])
    turns = [{"from": "user", "value": "Café?"}, {"from": "assistant", "value": "Oui."}]
    bom = tmp_path / "bom.json"
    bom.write_text(json.dumps([{"conversations": turns}], ensure_ascii=False), encoding="utf-8-sig")
    main(["finetune", "--model", chat, "--data", str(bom), "--output", "-", "--show-example", "0"])
    latin = tmp_path / "latin.jsonl"
    latin.write_text(json.dumps({"conversations": []}) + "\n" + json.dumps({"conversations": turns}, ensure_ascii=False)
                     + "\n", encoding="latin-1")  # fmt: skip
    message = error_of(["finetune", "--model", chat, "--data", str(latin), "--output", str(tmp_path / "o")])
    assert message == f"error: {latin}:2: not UTF-8 (byte 0xe9 at column 50); save the data file as UTF-8"
