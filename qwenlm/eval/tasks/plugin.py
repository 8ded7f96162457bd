"""Tool use (evaluate_plugin.py, ReAct): Tool Selection (action_right_rate) and Tool Input (ROUGE-L of the
json5-normalised Action Input over Qwen tokens) on the positive set, False Positive Error (bad_rate) on the
negative set. Generation is `chat()` with the checkpoint's own settings, greedy (the script leaves the
repetition penalty at the checkpoint's value)."""

from __future__ import annotations

from ..data import PLUGIN_FILES, DataError, read_jsonl
from ..extract import parse_react
from ..metrics import qwen_token_string, rouge_l_f1
from ..runner import EvalRun, batched

ACTION_MARK = "\nAction: "


def run(ev: EvalRun) -> dict:
    options = ev.options
    folder = options.data
    sets = {name: folder / file for name, file in PLUGIN_FILES.items() if (folder / file).is_file()}
    if not sets:
        raise DataError(f"plugin: found neither of {list(PLUGIN_FILES.values())} in {folder}")
    jobs = {name: read_jsonl(path, required=("prompt", "response"))[: options.limit] for name, path in sets.items()}
    ev.files += list(sets.values())
    ev.extra["shots"] = 0
    todo = [(name, i) for name, rows in jobs.items() for i in range(len(rows)) if f"{name}/{i}" not in ev.log.done]
    max_new = options.max_new_tokens or 512
    with ev.progress(len(todo)) as bar:
        for batch in batched(todo, options.batch_size):
            prompts = [jobs[name][i]["prompt"] for name, i in batch]
            responses = ev.backend.chat(prompts, max_new_tokens=max_new, repetition_penalty=None)
            for (name, i), prompt, gen in zip(batch, prompts, responses, strict=True):
                ev.log.write(score_job(ev.tokenizer, name, i, prompt, gen, jobs[name][i]["response"]))
            bar.update(len(batch))
    summary = {}
    for name, rows in jobs.items():
        done = [ev.log.done[f"{name}/{i}"] for i in range(len(rows))]
        if name == "positive":
            summary["Tool Selection (Acc.)"] = 100.0 * sum(r["action_right"] for r in done) / len(done)
            summary["Tool Input (Rouge-L)"] = 100.0 * sum(r["action_input_rouge"] for r in done) / len(done)
        else:
            summary["False Positive Error"] = 100.0 * sum(r["bad"] for r in done) / len(done)
    return {"summary": summary, "items": sum(len(r) for r in jobs.values())}


def score_job(tokenizer, subset: str, index: int, prompt: str, gen: str, gold: str) -> dict:
    """One job's row: action right (positive), ROUGE-L of the action input (positive), bad (negative)."""
    row = {"id": f"{subset}/{index}", "task": "plugin", "set": subset, "index": index, "prompt": prompt,
           "gen": gen, "response": gold}  # fmt: skip
    if subset == "negative":
        return {**row, "bad": ACTION_MARK in gen}
    pred, ref = parse_react(gen), parse_react(gold)
    right = ACTION_MARK in gen and pred["action"].strip().lower() == ref["action"].strip().lower()
    rouge = rouge_l_f1(qwen_token_string(tokenizer, ref["action_input"]),
                       qwen_token_string(tokenizer, pred["action_input"]))  # fmt: skip
    return {**row, "action": pred["action"], "action_input": pred["action_input"], "action_right": right,
            "action_input_rouge": rouge}  # fmt: skip
