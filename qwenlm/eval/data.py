"""Readers of the benchmarks' public file layouts, from a local folder (nothing is ever downloaded).

    subjects, files = read_choice_task("ceval", Path("data/ceval"))     # {subject: Subject}, files read
    problems = read_jsonl(path, required=("task_id", "prompt"))

Layouts (spec 9, notes 1.9):
    ceval   {dev,val,test}/<subject>_{split}.csv, header id,question,A,B,C,D,answer[,explanation]
    mmlu    [data/]{dev,val,test}/<subject>_{split}.csv, no header: question,A,B,C,D,answer
    cmmlu   {dev,test}/<subject>.csv, header ,Question,A,B,C,D,Answer
    gsm8k   test.jsonl (question, answer) and gsm8k_prompt.txt (the base 8-shot prompt)
    humaneval  HumanEval.jsonl[.gz] (task_id, prompt, entry_point, canonical_solution, test)
    plugin  exam_plugin_v20231206_react_{positive,negative}.jsonl (prompt, response)

CSV files are read with pandas exactly as the reference scripts read them, because the prompt text is
pandas' rendering of each cell: a numeric option column comes back as numbers ("2" stays "2", but in a
column that also holds "0.5" it becomes "2.0"), and cells such as "None" or "NA" become "nan".
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = ("A", "B", "C", "D")

# task -> (splits the items may come from, the default one); few-shot rows always come from dev
CHOICE_SPLITS = {"ceval": (("val", "test", "dev"), "val"), "mmlu": (("test", "val", "dev"), "test"),
                 "cmmlu": (("test", "dev"), "test")}  # fmt: skip
GSM8K_FILES = ("test.jsonl", "gsm8k_test.jsonl")
GSM8K_PROMPT = "gsm8k_prompt.txt"
HUMANEVAL_FILES = ("HumanEval.jsonl", "HumanEval.jsonl.gz", "human-eval-v2-20210705.jsonl")
PLUGIN_FILES = {
    "positive": "exam_plugin_v20231206_react_positive.jsonl",
    "negative": "exam_plugin_v20231206_react_negative.jsonl",
}


class DataError(ValueError):
    """A dataset file is missing or malformed (the message names the file, the row and what was expected)."""


@dataclass
class Question:
    """One multiple-choice row, its cells rendered as the reference renders them."""

    index: int  # row number in its file, 0-based (the resume key)
    question: str
    options: tuple[str, str, str, str]
    answer: str | None  # "A".."D", or None where the split has no labels


@dataclass
class Subject:
    name: str
    items: list[Question]
    shots: list[Question]  # the few-shot split's rows in file order (the first K are used)
    files: list[Path] = field(default_factory=list)


def _cell(value: Any) -> str:
    """A pandas cell as the reference's f-strings print it (numpy int 2 -> "2", float 2.0 -> "2.0", NaN -> "nan")."""
    return value if isinstance(value, str) else f"{value}"


def _read_csv(path: Path, header: bool) -> Any:
    try:
        import pandas as pd
    except ImportError as err:
        raise RuntimeError("reading the CSV benchmarks needs pandas: pip install 'qwenlm[eval]'") from err
    if not path.is_file():
        raise DataError(f"missing file {path}")
    names = None if header else ["question", "A", "B", "C", "D", "answer"]
    try:
        return pd.read_csv(path, names=names)
    except Exception as err:  # pandas' ParserError / UnicodeDecodeError / EmptyDataError
        raise DataError(f"{path}: cannot be read as CSV ({err})") from None


def _questions(path: Path, task: str, labelled: bool) -> list[Question]:
    frame = _read_csv(path, header=task != "mmlu")
    q_col, a_col = ("Question", "Answer") if task == "cmmlu" else ("question", "answer")
    wanted = [q_col, *LETTERS] + ([a_col] if labelled else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        layout = {"ceval": "id,question,A,B,C,D,answer", "mmlu": "question,A,B,C,D,answer (no header)",
                  "cmmlu": ",Question,A,B,C,D,Answer"}[task]  # fmt: skip
        raise DataError(f"{path}: missing column(s) {missing}; expected the {task} layout {layout}")
    first_row_line = 2 if task != "mmlu" else 1
    out = []
    for i, row in enumerate(frame.to_dict(orient="records")):
        answer = row.get(a_col)
        answer = answer if isinstance(answer, str) else None
        if labelled and answer not in LETTERS:
            raise DataError(f"{path}: row {i + first_row_line}: answer {row.get(a_col)!r} is not one of A, B, C, D")
        options = tuple(_cell(row[c]) for c in LETTERS)
        out.append(Question(i, _cell(row[q_col]), options, answer))  # type: ignore[arg-type]
    return out


def _choice_file(root: Path, task: str, split: str, subject: str) -> Path:
    return root / split / (f"{subject}.csv" if task == "cmmlu" else f"{subject}_{split}.csv")


def choice_root(task: str, data_dir: Path) -> Path:
    """The folder holding the split folders (MMLU's tarball unpacks to data/{dev,test,val})."""
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir} is not a folder; {task} expects {_layout_hint(task)}")
    if task == "mmlu" and not (data_dir / "test").is_dir() and (data_dir / "data" / "test").is_dir():
        return data_dir / "data"
    return data_dir


def _layout_hint(task: str) -> str:
    return {
        "ceval": "dev/<subject>_dev.csv and val/<subject>_val.csv (ceval-exam.zip unpacked)",
        "mmlu": "dev/<subject>_dev.csv and test/<subject>_test.csv (data.tar unpacked)",
        "cmmlu": "dev/<subject>.csv and test/<subject>.csv (cmmlu_v1_0_1.zip unpacked)",
    }[task]


def list_subjects(task: str, root: Path, split: str) -> list[str]:
    """Subjects present in the folder for `split`, in the reference's order (unknown ones after, sorted)."""
    from .categories import SUBJECTS

    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{task}: no {split}/ folder in {root}; expected {_layout_hint(task)}")
    suffix = ".csv" if task == "cmmlu" else f"_{split}.csv"
    present = {p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix)}
    if not present:
        raise DataError(f"{task}: {folder} holds no *{suffix} files; expected {_layout_hint(task)}")
    known = [s for s in SUBJECTS[task] if s in present]
    return known + sorted(present - set(known))


def read_choice_task(
    task: str, data_dir: Path, split: str | None = None, subjects: list[str] | None = None, shots: int = 5
) -> dict[str, Subject]:
    """Read the items (and few-shot rows, when `shots` > 0) of every subject present, or of `subjects`."""
    splits, default = CHOICE_SPLITS[task]
    split = split or default
    if split not in splits:
        raise DataError(f"{task} has no split {split!r}; choose from {list(splits)}")
    root = choice_root(task, data_dir)
    present = list_subjects(task, root, split)
    chosen = present
    if subjects:
        unknown = [s for s in subjects if s not in present]
        if unknown:
            raise DataError(f"{task}: unknown subject(s) {unknown} (not in {root / split}); present: {present}")
        chosen = [s for s in present if s in subjects]
    out = {}
    for name in chosen:
        path = _choice_file(root, task, split, name)
        labelled = not (task == "ceval" and split == "test")  # C-Eval test has no answers
        files = [path]
        shot_rows: list[Question] = []
        if shots > 0:
            dev = _choice_file(root, task, "dev", name)
            shot_rows = _questions(dev, task, labelled=True)
            if len(shot_rows) < shots:
                raise DataError(f"{dev}: {shots}-shot needs {shots} rows, the file has {len(shot_rows)}")
            files.append(dev)
        out[name] = Subject(name, _questions(path, task, labelled), shot_rows, files)
    return out


# --------------------------------------------------------------------------------------------------
# JSONL and text
# --------------------------------------------------------------------------------------------------
def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a .jsonl (or .jsonl.gz) file; a bad line is named with its number and what was expected."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise DataError(f"{path}:{number}: missing field(s) {missing}; expected {list(required)}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no records")
    return rows


def find_file(data: Path, names: tuple[str, ...], what: str) -> Path:
    """`data` itself if it is a file, else the first of `names` inside the folder."""
    if data.is_file():
        return data
    for name in names:
        if (data / name).is_file():
            return data / name
    raise DataError(f"{what}: found none of {list(names)} in {data}")


def read_text(path: Path) -> tuple[str, list[Path]]:
    """Text for perplexity: a .txt file, a .jsonl file ("text" of each record), or a folder of them (sorted);
    documents are joined with a blank line."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"{path} holds no .txt or .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"missing file {path}")
    parts = []
    for f in files:
        if f.suffix == ".jsonl":
            parts += [str(r["text"]) for r in read_jsonl(f, required=("text",))]
        else:
            parts.append(f.read_text(encoding="utf-8"))
    return "\n\n".join(parts), files
