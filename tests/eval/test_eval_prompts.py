"""Prompts byte-exact against the reference's templates (expected strings written out by hand), and the data
readers: layouts, pandas' rendering of cells, clear errors."""

from __future__ import annotations

import pytest
from benchmark_files import write_ceval, write_mmlu

from qwenlm.eval.data import DataError, Question, read_choice_task, read_jsonl
from qwenlm.eval.prompts import (
    chat_choice_prompt,
    choice_prompt,
    gsm8k_base_prompt,
    gsm8k_chat_prompt,
    humaneval_chat_prompt,
)

SHOT = Question(0, "1+1=?", ("1", "2", "3", "4"), "B")
ITEM = Question(0, "5+5=?", ("10", "11", "12", "13"), "A")


def test_mmlu_base_prompt_is_the_reference_template():
    expected = (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "Question: 1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Question: 5+5=?\nA. 10\nB. 11\nC. 12\nD. 13\nAnswer:"
    )
    assert choice_prompt("mmlu", "high_school_mathematics", [SHOT, SHOT], ITEM, k=1) == expected


def test_ceval_and_cmmlu_base_prompts_are_the_reference_template():
    expected = "问题：1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n问题：5+5=?\nA. 10\nB. 11\nC. 12\nD. 13\n答案："
    assert choice_prompt("ceval", "law", [SHOT], ITEM, k=1) == expected
    assert choice_prompt("cmmlu", "arts", [SHOT], ITEM, k=1) == expected
    assert choice_prompt("ceval", "law", [SHOT], ITEM, k=0) == "问题：5+5=?\nA. 10\nB. 11\nC. 12\nD. 13\n答案："


def test_chat_choice_prompts_are_the_reference_template():
    assert chat_choice_prompt("ceval", ITEM) == "5+5=?\n\nA. 10\nB. 11\nC. 12\nD. 13\n"
    assert chat_choice_prompt("mmlu", ITEM) == (
        "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D as the "
        "answer to this question.\n\n5+5=?\nA. 10\nB. 11\nC. 12\nD. 13\n"
    )


def test_gsm8k_prompts_are_the_reference_template():
    assert gsm8k_base_prompt("SHOTS\n", "Q?") == "SHOTS\n\nQuestion: Q?\nLet's think step by step\n"
    assert gsm8k_chat_prompt("Q?", use_fewshot=False) == "Q?"
    four = gsm8k_chat_prompt("Q?", use_fewshot=True)
    assert four.startswith("Question: Angelo and Melanie want to plan how many hours over the next week")
    assert four.endswith("The four baskets together have 32+114=146 fruits.\nThe answer is 146\n\n"
                         "Question: Q?\nLet's think step by step")  # fmt: skip
    assert four.count("\nThe answer is ") == 4 and "His team also scores 6 3 pointers" in four  # the typo stays


def test_humaneval_chat_prompt_is_the_humanevalpack_template():
    prompt = 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """ Sum.\n    >>> add(1, 2)\n    3\n'
    prompt += '    """\n'
    assert humaneval_chat_prompt(prompt, "add") == (
        "Write a Python function `add(a: int, b: int) -> int` to solve the following problem:\n"
        "Sum.\n>>> add(1, 2)\n3\n\n" + prompt
    )


def test_csv_cells_are_rendered_as_pandas_renders_them(tmp_path):
    # A numeric option column comes back as floats ("2" -> "2.0"); "None" becomes NaN -> "nan".
    path = tmp_path / "data" / "test" / "high_school_mathematics_test.csv"
    path.parent.mkdir(parents=True)
    path.write_text("Half of 1?,0.5,2,None,x,A\nTwice 1?,2,0.5,y,z,A\n", encoding="utf-8")
    subjects = read_choice_task("mmlu", tmp_path, shots=0)
    items = subjects["high_school_mathematics"].items
    assert items[0].options == ("0.5", "2.0", "nan", "x")
    assert items[1].options == ("2.0", "0.5", "y", "z")


def test_subjects_are_those_present_in_the_reference_order(tmp_path):
    write_mmlu(tmp_path, subjects=("anatomy", "abstract_algebra", "zzz_custom"))
    assert list(read_choice_task("mmlu", tmp_path)) == ["abstract_algebra", "anatomy", "zzz_custom"]
    assert list(read_choice_task("mmlu", tmp_path, subjects=["anatomy"])) == ["anatomy"]
    with pytest.raises(DataError, match="unknown subject.*'nope'"):
        read_choice_task("mmlu", tmp_path, subjects=["nope"])


def test_bad_files_are_named_with_what_was_expected(tmp_path):
    root = write_ceval(tmp_path / "ceval", subjects=("law",))
    (root / "dev" / "law_dev.csv").unlink()
    with pytest.raises(DataError, match=r"missing file .*dev/law_dev\.csv"):
        read_choice_task("ceval", root)
    (root / "val" / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"law_val\.csv: row 2: answer 'E' is not one of A, B, C, D"):
        read_choice_task("ceval", root, shots=0)
    (root / "val" / "law_val.csv").write_text("id,q,A,B\n0,q,a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"missing column\(s\) \['question', 'C', 'D', 'answer'\].*id,question"):
        read_choice_task("ceval", root, shots=0)
    with pytest.raises(DataError, match="no val/ folder"):
        read_choice_task("ceval", tmp_path)
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"task_id": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    with pytest.raises(DataError, match=r"x\.jsonl:1: missing field\(s\) \['prompt'\]"):
        read_jsonl(bad, required=("task_id", "prompt"))
