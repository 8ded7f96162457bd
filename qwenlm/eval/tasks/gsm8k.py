"""GSM8K: base models 8-shot from gsm8k_prompt.txt (evaluate_gsm8k.py), chat models 0-shot or with the
reference's 4 built-in shots (evaluate_chat_gsm8k.py --use-fewshot); each with its own answer extraction."""

from __future__ import annotations

from ..data import GSM8K_FILES, GSM8K_PROMPT, DataError, find_file, read_jsonl
from ..extract import (
    GSM8K_BASE_CUTS,
    cut_at,
    gsm8k_base_answer,
    gsm8k_chat_correct,
    gsm8k_chat_number,
    gsm8k_gold,
)
from ..metrics import percent
from ..prompts import gsm8k_base_prompt, gsm8k_chat_prompt
from ..runner import EvalRun, batched


def run(ev: EvalRun) -> dict:
    options = ev.options
    path = find_file(options.data, GSM8K_FILES, "gsm8k")
    docs = read_jsonl(path, required=("question", "answer"))[: options.limit]
    ev.files.append(path)
    shots = options.shots if options.shots is not None else (8 if ev.mode == "base" else 0)
    ev.extra["shots"] = shots
    fewshot = ""
    if ev.mode == "base":
        if shots != 8:
            raise ValueError(f"base GSM8K is 8-shot, from {GSM8K_PROMPT} (as the reference); drop --shots {shots}")
        prompt_file = (path.parent if path.is_file() else options.data) / GSM8K_PROMPT
        if not prompt_file.is_file():
            raise DataError(f"base GSM8K needs {prompt_file} (the reference's 8-shot prompt file) beside the data")
        fewshot = prompt_file.read_text(encoding="utf-8")
        ev.files.append(prompt_file)
    elif shots not in (0, 4):
        raise ValueError(f"chat GSM8K is 0-shot or 4-shot (the reference's --use-fewshot); got --shots {shots}")
    for i, doc in enumerate(docs):
        if not isinstance(doc["question"], str) or not isinstance(doc["answer"], str):
            raise DataError(f"{path}:{i + 1}: 'question' and 'answer' must be strings")
        try:
            gsm8k_gold(doc["answer"]) if ev.mode == "base" else None
        except ValueError as err:
            raise DataError(f"{path}:{i + 1}: {err}") from None
        if ev.mode == "chat" and gsm8k_chat_number(doc["answer"]) is None:
            raise DataError(f"{path}:{i + 1}: the answer holds no number")
    todo = [i for i in range(len(docs)) if str(i) not in ev.log.done]
    max_new = options.max_new_tokens or 512
    with ev.progress(len(todo)) as bar:
        for batch in batched(todo, options.batch_size):
            if ev.mode == "base":
                _base_batch(ev, docs, batch, fewshot, max_new)
            else:
                _chat_batch(ev, docs, batch, shots == 4, max_new)
            bar.update(len(batch))
    hits = [ev.log.done[str(i)]["acc"] for i in range(len(docs))]
    return {"summary": {"Accuracy": percent(hits)}, "items": len(hits)}


def _base_batch(ev: EvalRun, docs: list[dict], batch: list[int], fewshot: str, max_new: int) -> None:
    prompts = [gsm8k_base_prompt(fewshot, docs[i]["question"]) for i in batch]
    # The reference encodes with the raw tiktoken encoder: special-token text in the data is an error.
    ids = [ev.tokenizer.encode(p, allowed_special=set(), disallowed_special="all") for p in prompts]
    raws = ev.backend.complete(ids, max_new, GSM8K_BASE_CUTS)
    for i, prompt, raw in zip(batch, prompts, raws, strict=True):
        completion = cut_at(raw, GSM8K_BASE_CUTS)
        pred, gold = gsm8k_base_answer(completion), gsm8k_gold(docs[i]["answer"])
        ev.log.write({"id": str(i), "task": "gsm8k", "index": i, "question": docs[i]["question"], "prompt": prompt,
                      "output": raw, "completion": completion, "pred": pred, "gold": gold,
                      "acc": pred == gold})  # fmt: skip


def _chat_batch(ev: EvalRun, docs: list[dict], batch: list[int], use_fewshot: bool, max_new: int) -> None:
    prompts = [gsm8k_chat_prompt(docs[i]["question"], use_fewshot) for i in batch]
    responses = ev.backend.chat(prompts, max_new_tokens=max_new, repetition_penalty=1.0)
    for i, prompt, response in zip(batch, prompts, responses, strict=True):
        answer = docs[i]["answer"]
        ev.log.write({"id": str(i), "task": "gsm8k", "index": i, "question": docs[i]["question"], "prompt": prompt,
                      "completion": response, "pred": gsm8k_chat_number(response),
                      "gold": gsm8k_chat_number(answer), "acc": gsm8k_chat_correct(response, answer)})  # fmt: skip
