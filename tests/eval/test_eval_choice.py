"""C-Eval / MMLU / CMMLU end to end on tiny checkpoints: predictions are the argmax over the choice tokens of
the model's own logits, batching and prefix reuse change nothing, resume skips done items, chat goes
through chat()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_files import write_mmlu

from qwenlm.chat import chat
from qwenlm.cli import main
from qwenlm.eval.backends import InProcessBackend
from qwenlm.eval.extract import chat_choice_answer
from qwenlm.tokenizer import QwenTokenizer

CHOICE_IDS = {"mmlu": [362, 425, 356, 422], "ceval": [32, 33, 34, 35], "cmmlu": [32, 33, 34, 35]}  # spec 3.7


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(task: str, checkpoint: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    main(["eval", task, "--model", str(checkpoint), "--data", str(data), "--output", str(out), "--dtype", "float32",
          "--device", "cpu", *extra])  # fmt: skip
    return rows(out)


@pytest.fixture(scope="module")
def long_mmlu(tmp_path_factory) -> Path:
    """MMLU with one prompt past 2048 tokens (the reference keeps its last 2047)."""
    root = write_mmlu(tmp_path_factory.mktemp("mmlu-long"), subjects=("anatomy",))
    with open(root / "data" / "test" / "anatomy_test.csv", "a", encoding="utf-8") as f:
        f.write('"' + "word " * 2100 + 'end?",a,b,c,d,C\n')
    return root


@pytest.mark.parametrize("task", ["mmlu", "ceval", "cmmlu"])
def test_base_predictions_are_the_argmax_over_the_choice_tokens(task, base_checkpoint, base_model, eval_data,
                                                                 long_mmlu, tmp_path):  # fmt: skip
    data = long_mmlu if task == "mmlu" else eval_data / task
    out = run(task, base_checkpoint, data, tmp_path / "out.jsonl", "--batch-size", "3")
    tokenizer = QwenTokenizer.from_pretrained(base_checkpoint)
    truncated = 0
    for row in out:
        ids = tokenizer.encode(row["prompt"])
        if len(ids) > 2048:
            ids, truncated = ids[-2047:], truncated + 1
        with torch.no_grad():
            logits = base_model(torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), -1)
        chosen = logprobs[CHOICE_IDS[task]]
        assert row["pred"] == "ABCD"[int(chosen.argmax())]
        assert row["logprobs"] == pytest.approx(chosen.tolist(), abs=1e-4)
        assert row["correct"] == (row["pred"] == row["answer"])
    assert truncated == (1 if task == "mmlu" else 0)
    results = json.loads((tmp_path / "out.results.json").read_text())
    per_subject = {s: v["accuracy"] for s, v in results["subjects"].items()}
    if task == "mmlu":  # micro: every question counts once
        assert results["summary"]["Average"] == pytest.approx(100 * sum(r["correct"] for r in out) / len(out))
    else:  # macro: the mean of the subjects' accuracies
        assert results["summary"]["Average"] == pytest.approx(sum(per_subject.values()) / len(per_subject))
    assert results["provenance"]["model"]["sha256"] and results["provenance"]["data_files"]


def test_batch_n_equals_batch_1(base_checkpoint, eval_data, tmp_path):
    one = run("mmlu", base_checkpoint, eval_data / "mmlu", tmp_path / "b1.jsonl")
    many = run("mmlu", base_checkpoint, eval_data / "mmlu", tmp_path / "b4.jsonl", "--batch-size", "4")
    assert [r["pred"] for r in one] == [r["pred"] for r in many]
    for a, b in zip(one, many, strict=True):
        assert a["prompt"] == b["prompt"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-6)


def test_prefix_reuse_equals_whole_prompts(base_model, qwen_tokenizer):
    backend = InProcessBackend(base_model, qwen_tokenizer)
    prefix = qwen_tokenizer.encode("问题：1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n")
    texts = ("问题：短？\n答案：", "问题：一个长一点的问题，有更多的字？\nA. x\n答案：")
    suffixes = [qwen_tokenizer.encode(s) for s in texts]
    reused = backend.choice_logprobs(prefix, suffixes, CHOICE_IDS["ceval"])
    whole = backend.choice_logprobs([], [prefix + s for s in suffixes], CHOICE_IDS["ceval"])
    alone = [backend.choice_logprobs([], [prefix + s], CHOICE_IDS["ceval"])[0] for s in suffixes]
    for a, b, c in zip(reused, whole, alone, strict=True):
        assert a == pytest.approx(c, abs=1e-5) and b == pytest.approx(c, abs=1e-5)


def test_resume_skips_done_items(base_checkpoint, eval_data, tmp_path):
    out = tmp_path / "ceval.jsonl"
    first = run("ceval", base_checkpoint, eval_data / "ceval", out, "--limit", "2")
    assert len(first) == 4
    with pytest.raises(SystemExit, match="already exists; pass --resume"):
        run("ceval", base_checkpoint, eval_data / "ceval", out)
    marked = dict(first[0], pred="Z", correct=False)  # a done item that a recomputation would overwrite
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [marked, *first[1:]])
    out.write_text(text + '{"id": "half a line', encoding="utf-8")  # an interrupted write
    after = run("ceval", base_checkpoint, eval_data / "ceval", out, "--resume")
    assert after[:4] == [marked, *first[1:]] and len(after) == 6
    assert {r["id"] for r in after} == {f"{s}/{i}" for s in ("computer_network", "college_physics") for i in range(3)}
    with pytest.raises(SystemExit, match="--resume: .* was made with kv_cache_int8 False, this run has True"):
        run("ceval", base_checkpoint, eval_data / "ceval", out, "--resume", "--kv-cache-int8")


def test_chat_choice_goes_through_chat(tiny_checkpoint, tiny_model, eval_data, tmp_path):
    out = run("ceval", tiny_checkpoint, eval_data / "ceval", tmp_path / "c.jsonl", "--max-new-tokens", "6",
              "--batch-size", "2", "--subjects", "college_physics")  # fmt: skip
    tokenizer = QwenTokenizer.from_pretrained(tiny_checkpoint)
    assert len(out) == 3 and all(r["prompt"].endswith("D. " + r["prompt"].split("D. ")[-1]) for r in out)
    for row in out:
        response, _ = chat(tiny_model, tokenizer, row["prompt"], None, do_sample=False, repetition_penalty=1.0,
                           max_new_tokens=6)  # fmt: skip
        assert row["response"] == response
        options = tuple(line[3:] for line in row["prompt"].split("\n\n", 1)[1].splitlines())
        assert row["pred"] == chat_choice_answer("ceval", response, row["prompt"].split("\n\n")[0], options)


def test_bad_requests_are_one_line_errors(base_checkpoint, eval_data, tmp_path):
    out = str(tmp_path / "x.jsonl")
    with pytest.raises(SystemExit, match="needs a chat model .* it is a base model; drop --chat"):
        run("mmlu", base_checkpoint, eval_data / "mmlu", tmp_path / "x.jsonl", "--chat")
    with pytest.raises(SystemExit, match=r"unknown subject\(s\) \['nope'\]"):
        run("mmlu", base_checkpoint, eval_data / "mmlu", tmp_path / "x.jsonl", "--subjects", "nope")
    with pytest.raises(SystemExit, match="give --model PATH .* or --endpoint URL"):
        main(["eval", "mmlu", "--data", str(eval_data), "--output", out])
    with pytest.raises(SystemExit, match="does not answer"):
        main(["eval", "mmlu", "--endpoint", "http://127.0.0.1:9/v1", "--base", "--data", str(eval_data / "mmlu"),
              "--output", out])  # fmt: skip
    with pytest.raises(SystemExit, match="2"):  # argparse: unknown task
        main(["eval", "nosuchtask"])


def test_data_and_output_mistakes_are_found_before_the_model_loads(eval_data, tmp_path):
    """A model that does not exist is never reached: the output file and the data are checked first."""
    import shutil

    taken = tmp_path / "taken.jsonl"
    taken.write_text('{"id": "x"}\n')
    missing = str(tmp_path / "no-model")
    with pytest.raises(SystemExit, match="taken.jsonl already exists"):
        main(["eval", "mmlu", "--model", missing, "--data", str(eval_data / "mmlu"), "--output", str(taken)])
    broken = tmp_path / "gsm8k"
    shutil.copytree(eval_data / "gsm8k", broken)
    test_file = next(broken.rglob("*.jsonl"))
    test_file.write_text(test_file.read_text() + '{"question": "no answer here"}\n')
    with pytest.raises(SystemExit, match="answer"):
        main(["eval", "gsm8k", "--model", missing, "--data", str(broken), "--output", str(tmp_path / "g.jsonl")])
