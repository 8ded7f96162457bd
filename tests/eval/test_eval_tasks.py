"""GSM8K, HumanEval generation, plugin and perplexity end to end on tiny checkpoints, checked against the model
computed directly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from benchmark_files import GSM8K_PROMPT, write_plugin
from test_eval_choice import rows, run

from qwenlm.chat import chat
from qwenlm.cli import main
from qwenlm.eval.extract import GSM8K_BASE_CUTS, HUMANEVAL_BASE_CUTS, cut_at, gsm8k_base_answer
from qwenlm.eval.tasks.plugin import score_job
from qwenlm.tokenizer import QwenTokenizer


def _greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer.encode(prompt)
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, len(ids) :].tolist())


def test_gsm8k_base_is_8_shot_from_the_prompt_file(base_checkpoint, base_model, eval_data, tmp_path):
    out = run("gsm8k", base_checkpoint, eval_data / "gsm8k", tmp_path / "g.jsonl", "--max-new-tokens", "10",
              "--batch-size", "2")  # fmt: skip
    tokenizer = QwenTokenizer.from_pretrained(base_checkpoint)
    questions = [json.loads(line)["question"] for line in (eval_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    for row, question in zip(out, questions, strict=True):
        assert row["prompt"] == GSM8K_PROMPT + f"\nQuestion: {question}\nLet's think step by step\n"
        full = _greedy_text(base_model, tokenizer, row["prompt"], 10)
        assert full.startswith(row["output"])  # generation stops early once a cut is reached
        assert row["completion"] == cut_at(full, GSM8K_BASE_CUTS)
        assert row["pred"] == gsm8k_base_answer(row["completion"]) and row["acc"] == (row["pred"] == row["gold"])
    assert [r["gold"] for r in out] == [7, 2000]
    with pytest.raises(SystemExit, match="base GSM8K is 8-shot"):
        run("gsm8k", base_checkpoint, eval_data / "gsm8k", tmp_path / "g2.jsonl", "--shots", "4")


def test_gsm8k_chat_and_plugin_go_through_chat(tiny_checkpoint, tiny_model, eval_data, tmp_path):
    tokenizer = QwenTokenizer.from_pretrained(tiny_checkpoint)
    out = run("gsm8k", tiny_checkpoint, eval_data / "gsm8k", tmp_path / "g.jsonl", "--max-new-tokens", "6", "--limit",
              "1")  # fmt: skip
    response, _ = chat(tiny_model, tokenizer, out[0]["prompt"], None, do_sample=False, repetition_penalty=1.0,
                       max_new_tokens=6)  # fmt: skip
    assert out[0]["prompt"] == "Sam has 3 cats and gets 4 more. How many cats?" and out[0]["completion"] == response
    plugin = run("plugin", tiny_checkpoint, eval_data / "plugin", tmp_path / "p.jsonl", "--max-new-tokens", "6")
    for row in plugin:  # the plugin script keeps the checkpoint's repetition penalty (1.1 for chat models)
        assert row["gen"] == chat(tiny_model, tokenizer, row["prompt"], None, do_sample=False, max_new_tokens=6)[0]
    summary = json.loads((tmp_path / "p.results.json").read_text())["summary"]
    assert set(summary) == {"Tool Selection (Acc.)", "Tool Input (Rouge-L)", "False Positive Error"}


def test_plugin_scores_a_job_like_the_reference(qwen_tokenizer, tmp_path):
    gold = 'Thought: t\nAction: search\nAction Input: {"query": "Paris weather"}\nObservation: o\nFinal Answer: f'
    same = score_job(qwen_tokenizer, "positive", 0, "p", 'Thought: x\nAction:  Search\nAction Input: '
                     "{query: 'Paris weather'}\nObservation:", gold)  # fmt: skip
    assert same["action_right"] and same["action_input_rouge"] == 1.0
    other = score_job(qwen_tokenizer, "positive", 0, "p", "Thought: x\nAction: calc\nAction Input: {}", gold)
    assert not other["action_right"] and other["action_input_rouge"] == 0.0
    no_mark = score_job(qwen_tokenizer, "positive", 0, "p", 'Action: search\nAction Input: {"query": "x"}', gold)
    assert not no_mark["action_right"]  # the reference needs "\nAction: " in the generation
    assert score_job(qwen_tokenizer, "negative", 0, "p", "Sure.\nAction: search", "Final Answer: hi")["bad"]
    with pytest.raises(SystemExit, match="found neither of"):
        main(["eval", "plugin", "--model", "x", "--data", str(tmp_path), "--output", str(tmp_path / "o.jsonl")])
    assert write_plugin(tmp_path / "p").is_dir()


def test_humaneval_base_generation_uses_the_reference_cuts(base_checkpoint, base_model, eval_data, tmp_path):
    out = run("humaneval", base_checkpoint, eval_data / "humaneval", tmp_path / "h.jsonl", "--max-new-tokens", "8",
              "--timeout", "2")  # fmt: skip
    tokenizer = QwenTokenizer.from_pretrained(base_checkpoint)
    problems = [json.loads(line) for line in (eval_data / "humaneval" / "HumanEval.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in out] == ["HumanEval/0", "HumanEval/1"]
    for row, problem in zip(out, problems, strict=True):
        full = _greedy_text(base_model, tokenizer, problem["prompt"], 8)
        assert row["completion"] == cut_at(full, HUMANEVAL_BASE_CUTS) and row["result"]
    assert "pass@1" in json.loads((tmp_path / "h.results.json").read_text())["summary"]


def _direct_ppl(model, ids: list[int], length: int) -> float:
    windows = torch.tensor([ids[i * length : (i + 1) * length] for i in range(len(ids) // length)])
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


def test_ppl_equals_exp_mean_nll(base_checkpoint, base_model, eval_data, tmp_path):
    out = run("ppl", base_checkpoint, eval_data / "text.txt", tmp_path / "ppl.jsonl", "--context-lengths", "32,100",
              "--batch-size", "2")  # fmt: skip
    ids = QwenTokenizer.from_pretrained(base_checkpoint).encode((eval_data / "text.txt").read_text())
    for row, length in zip(out, (32, 100), strict=True):
        assert row["context_length"] == length and row["windows"] == len(ids) // length
        assert row["ppl"] == pytest.approx(_direct_ppl(base_model, ids, length), rel=1e-6)


def test_ppl_long_context_switches(long_context_checkpoint, long_context_model, eval_data, tmp_path):
    with_ntk = run("ppl", long_context_checkpoint, eval_data / "text.txt", tmp_path / "a.jsonl",
                   "--context-lengths", "48")  # fmt: skip
    plain = run("ppl", long_context_checkpoint, eval_data / "text.txt", tmp_path / "b.jsonl", "--context-lengths",
                "48", "--no-ntk")  # fmt: skip
    ids = QwenTokenizer.from_pretrained(long_context_checkpoint).encode((eval_data / "text.txt").read_text())
    assert with_ntk[0]["ppl"] == pytest.approx(_direct_ppl(long_context_model, ids, 48), rel=1e-5)
    assert abs(plain[0]["ppl"] / with_ntk[0]["ppl"] - 1) > 1e-5  # past seq_length 16 NTK changes the numbers
    long_context_model.config.use_dynamic_ntk = False
    try:
        assert plain[0]["ppl"] == pytest.approx(_direct_ppl(long_context_model, ids, 48), rel=1e-5)
    finally:
        long_context_model.config.use_dynamic_ntk = True
    model = json.loads((tmp_path / "b.results.json").read_text())["provenance"]["model"]
    assert model["use_dynamic_ntk"] is False and model["use_logn_attn"] is True
    with pytest.raises(SystemExit, match="window attention .* not in the released modeling code"):
        run("ppl", long_context_checkpoint, eval_data / "text.txt", tmp_path / "c.jsonl", "--window", "256")
    assert rows(tmp_path / "a.jsonl")[0]["tokens_scored"] == (len(ids) // 48) * 47
