"""Run bookkeeping: the per-item JSONL (written as items complete, resumable), `<name>.results.json` beside it
(summary + provenance, written atomically), the printed tables and `qwenlm eval compare`.

    log = ItemLog(Path("mmlu.jsonl"), resume=True)      # log.done: rows already there, by "id"
    log.write({"id": "anatomy/3", ...})                 # appended and flushed at once
    write_results(results_path(log.path), {...})
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def check_output(path: Path, resume: bool = False, overwrite: bool = False) -> bool:
    """Whether the per-item log `path` holds an earlier run; refuses one that neither flag allows to touch.

    Raises:
        ValueError: `path` holds items and neither resume nor overwrite is given.
    """
    exists = path.is_file() and path.stat().st_size > 0
    if exists and not (resume or overwrite):
        raise ValueError(f"{path} already exists; pass --resume to continue that run or --overwrite to start over")
    return exists


class ItemLog:
    """The per-item JSONL. Without `resume` an existing non-empty file is an error (unless `overwrite`);
    with it, rows already written are kept (a half-written last line from a crash is dropped) and skipped."""

    def __init__(self, path: Path, resume: bool = False, overwrite: bool = False) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        exists = check_output(path, resume, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        if exists and resume:
            self._load()
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        else:
            self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115

    def _load(self) -> None:
        good_bytes = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    if not line.endswith(b"\n"):
                        raise ValueError("unterminated")
                except ValueError:
                    rest = f.read()
                    if rest.strip():
                        raise ValueError(f"{self.path}:{number}: not a JSON line; cannot resume this file") from None
                    break  # an interrupted write: the item is simply redone
                self.done[row["id"]] = row
                good_bytes += len(line)
        with open(self.path, "r+b") as f:
            f.truncate(good_bytes)

    def write(self, row: dict) -> None:
        self.done[row["id"]] = row
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def results_path(output: Path) -> Path:
    """`run.jsonl` -> `run.results.json` (so several runs can share a folder)."""
    return output.with_name(output.name[: -len(output.suffix)] + ".results.json" if output.suffix else output.name
                            + ".results.json")  # fmt: skip


def write_results(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically: a temp file in the same folder, then rename."""
    partial = path.with_name(f".{path.name}.tmp{os.getpid()}")
    partial.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    partial.replace(path)


def read_results(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not a qwenlm eval results file ({err})") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------
def checkpoint_hash(folder: Path) -> str:
    """sha256 over every file of a checkpoint folder (names and contents, sorted), cached per file by
    (size, mtime) in the qwenlm cache so a second run over the same weights does not re-read them."""
    from ..assets import cache_dir, sha256_of

    cache_file = cache_dir() / "eval-file-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_of(path)
        digest.update(f"{path.relative_to(folder)}\0{cache[key]}\n".encode())
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_results(cache_file, cache)
    except OSError:
        pass
    return digest.hexdigest()


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Versions this run used: qwenlm (and its git commit, when run from a checkout), torch, Python."""
    import importlib.metadata

    import torch

    try:
        version = importlib.metadata.version("qwenlm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"qwenlm": version, "git_sha": git_sha(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}  # fmt: skip


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
def format_table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    return "\n".join(out + [line(r) for r in rows[1:]])


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def run_label(results: Mapping[str, Any]) -> str:
    """A short name for a run: the model folder or endpoint, with dtype / quantization."""
    source = results.get("provenance", {}).get("model", {})
    name = Path(source.get("path") or "").name or source.get("endpoint") or "?"
    extras = [x for x in (source.get("dtype"), source.get("quantization")) if x]
    return f"{name} ({', '.join(extras)})" if extras else name


def compare_table(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Two runs' summaries side by side with the difference (the seed cards' BF16 / Int8 / Int4 shape)."""
    if a.get("task") != b.get("task"):
        raise ValueError(f"cannot compare a {a.get('task')!r} run with a {b.get('task')!r} run")
    sa, sb = a.get("summary", {}), b.get("summary", {})
    keys = list(sa) + [k for k in sb if k not in sa]
    rows = []
    for key in keys:
        va, vb = sa.get(key), sb.get(key)
        delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        rows.append([key, fmt(va), fmt(vb), "-" if delta is None else f"{delta:+.2f}"])
    shots = a.get("shots")
    title = f"{a.get('task')} ({a.get('mode') or '-'}" + (f", {shots}-shot)" if shots is not None else ")")
    return title + "\n" + format_table(["", run_label(a), run_label(b), "diff"], rows)


# --------------------------------------------------------------------------------------------------
# The state a task runs with
# --------------------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    """What a task needs: where scores come from, the item log, the options, and what it read."""

    task: str
    mode: str | None  # "base", "chat", or None (ppl)
    backend: Any
    tokenizer: Any
    log: ItemLog
    options: Any  # the parsed command line (shots, limit, subjects, batch_size, max_new_tokens, seed, ...)
    files: list[Path] = field(default_factory=list)  # data files read (hashed into the provenance)
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific provenance (sandbox isolation, ...)

    def progress(self, total: int, unit: str = "item"):
        from tqdm import tqdm

        return tqdm(total=total, desc=f"{self.task} ({self.mode})" if self.mode else self.task, unit=unit,
                    dynamic_ncols=True)  # fmt: skip


def batched(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]
