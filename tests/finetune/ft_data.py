"""A small conversation file for finetuning tests (imported by the test modules of this folder)."""

from __future__ import annotations

import json
from pathlib import Path


def write_chats(path: Path, count: int = 24) -> Path:
    """`count` short arithmetic chats in the reference's JSON-list format."""
    records = []
    for i in range(count):
        a, b = 3 + i, 40 - i
        turns = [{"from": "user", "value": f"What is {a} plus {b}?"},
                 {"from": "assistant", "value": f"{a} plus {b} is {a + b}."}]  # fmt: skip
        records.append({"id": f"s{i}", "conversations": turns})
    path.write_text(json.dumps(records), encoding="utf-8")
    return path
