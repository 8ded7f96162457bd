"""Fixture benchmarks written in the public layouts (C-Eval, MMLU, CMMLU, GSM8K, HumanEval, plugin, text).

A plain module, not conftest.py: test modules import these writers by name, and two conftest.py files (tests/ and
tests/eval/) would shadow each other under the one module name `conftest`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

SHOTS = [("1+1=?", "1", "2", "3", "4", "B"), ("2+2=?", "4", "5", "6", "7", "A"), ("3+3=?", "5", "6", "7", "8", "B"),
         ("首都是？", "北京", "上海", "广州", "深圳", "A"),
         ("Which is a fruit?", "car", "apple", "sky", "road", "B")]  # fmt: skip
ITEMS = [("5+5=?", "10", "11", "12", "13", "A"), ("水的化学式是____。", "H2O", "CO2", "NaCl", "O2", "A"),
         ("Pick the colour", "red", "dog", "run", "blue", "D")]  # fmt: skip
NUMERIC = [("Half of 1?", "0.5", "2", "1", "3", "A")]  # a numeric column: pandas renders "2" as "2.0" here


def _csv(path: Path, rows: list, header: list | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_ceval(root: Path, subjects=("computer_network", "college_physics")) -> Path:
    for s in subjects:
        _csv(root / "dev" / f"{s}_dev.csv", [(i, *r, "because") for i, r in enumerate(SHOTS)],
             ["id", "question", "A", "B", "C", "D", "answer", "explanation"])  # fmt: skip
        _csv(root / "val" / f"{s}_val.csv", [(i, *r) for i, r in enumerate(ITEMS)],
             ["id", "question", "A", "B", "C", "D", "answer"])  # fmt: skip
    return root


def write_mmlu(root: Path, subjects=("abstract_algebra", "anatomy")) -> Path:
    for s in subjects:
        _csv(root / "data" / "dev" / f"{s}_dev.csv", SHOTS)
        _csv(root / "data" / "test" / f"{s}_test.csv", ITEMS + NUMERIC)
    return root


def write_cmmlu(root: Path, subjects=("agronomy", "ancient_chinese")) -> Path:
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    for s in subjects:
        _csv(root / "dev" / f"{s}.csv", [(i, *r) for i, r in enumerate(SHOTS)], header)
        _csv(root / "test" / f"{s}.csv", [(i, *r) for i, r in enumerate(ITEMS)], header)
    return root


GSM8K_PROMPT = ("Question: Tom has 2 apples and buys 3 more. How many apples does he have?\nLet's think step by step\n"
                "Tom starts with 2 apples.\nHe buys 3 more, 2 + 3 = 5.\nThe answer is 5\n\n"
                "Question: A box holds 4 pens. How many pens are in 2 boxes?\nLet's think step by step\n"
                "Each box holds 4 pens, 2 * 4 = 8.\nThe answer is 8\n")  # fmt: skip


def write_gsm8k(root: Path) -> Path:
    _jsonl(root / "test.jsonl", [
        {"question": "Sam has 3 cats and gets 4 more. How many cats?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A pack has 1,000 sheets. How many in 2 packs?", "answer": "2 * 1000 = 2000\n#### 2,000"},
    ])  # fmt: skip
    (root / "gsm8k_prompt.txt").write_text(GSM8K_PROMPT, encoding="utf-8")
    return root


HUMANEVAL = [
    {"task_id": "HumanEval/0", "entry_point": "add",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(1, 2)\n    3\n    """\n',
     "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"},
    {"task_id": "HumanEval/1", "entry_point": "double",
     "prompt": 'def double(x: int) -> int:\n    """Twice x.\n    >>> double(2)\n    4\n    """\n',
     "canonical_solution": "    return 2 * x\n", "test": "def check(candidate):\n    assert candidate(3) == 6\n"},
]  # fmt: skip


def write_humaneval(root: Path) -> Path:
    _jsonl(root / "HumanEval.jsonl", HUMANEVAL)
    return root


REACT_PROMPT = ("Answer the following questions as best you can. You have access to the following tools:\n\n"
                "search: Search the web. Parameters: [{\"name\": \"query\", \"type\": \"string\"}]\n\n"
                "Question: {q}")  # fmt: skip


def write_plugin(root: Path) -> Path:
    _jsonl(root / "exam_plugin_v20231206_react_positive.jsonl", [
        {"prompt": REACT_PROMPT.replace("{q}", "Weather in Paris?"),
         "response": 'Thought: I should search.\nAction: search\nAction Input: {"query": "Paris weather"}\n'
                     "Observation: sunny\nThought: I know.\nFinal Answer: sunny"},
    ])  # fmt: skip
    _jsonl(root / "exam_plugin_v20231206_react_negative.jsonl", [
        {"prompt": REACT_PROMPT.replace("{q}", "Say hello."), "response": "Thought: no tool.\nFinal Answer: hello"},
    ])  # fmt: skip
    return root
