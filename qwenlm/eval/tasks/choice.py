"""C-Eval, MMLU and CMMLU: base models by next-token scoring (5-shot), chat models through chat() (0-shot).

Base (evaluate_{ceval,mmlu,cmmlu}.py): the logits at the prompt's last token, softmax over the vocabulary,
the four choice tokens' probabilities gathered, a softmax over those four (what the reference stores as
prob_A..D), argmax. The per-item row keeps both the reference's probs and the four full-vocabulary logprobs.
"""

from __future__ import annotations

import torch

from ..categories import CEVAL_HARD, category_members
from ..data import LETTERS, Question, read_choice_task
from ..extract import chat_choice_answer
from ..metrics import choice_summary, percent
from ..prompts import chat_choice_prompt, choice_token_texts, few_shot_prefix, format_choice_example
from ..runner import EvalRun, batched

MMLU_MAX_SEQ_LEN = 2048  # evaluate_mmlu.py --max-seq-len: longer prompts keep their last 2047 tokens


def choice_token_ids(tokenizer, task: str) -> list[int]:
    ids = [tokenizer.encode(text) for text in choice_token_texts(task)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the choice tokens {choice_token_texts(task)} are not single tokens for this tokenizer")
    return [i[0] for i in ids]


def reference_probs(logprobs: list[float]) -> list[float]:
    """softmax over the four choices' vocabulary probabilities (not their logits), in float32, as the reference
    computes it for an fp32 model. When all four probabilities are tiny, they come out equal (0.25 each) and
    the argmax takes A, as the reference's does."""
    probs = torch.tensor(logprobs, dtype=torch.float32).exp()
    return torch.softmax(probs, dim=0).tolist()


def reference_pred(probs: list[float]) -> str:
    """np.argmax: the first of equal maxima."""
    return LETTERS[probs.index(max(probs))]


def run(ev: EvalRun) -> dict:
    options = ev.options
    shots = options.shots if options.shots is not None else (5 if ev.mode == "base" else 0)
    if ev.mode == "chat" and shots != 0:
        raise ValueError("chat models are evaluated 0-shot, as the reference's chat scripts do; drop --shots")
    subjects = read_choice_task(ev.task, options.data, options.split, options.subjects, shots=shots)
    ev.files += [f for s in subjects.values() for f in s.files]
    ev.extra["shots"] = shots
    todo = {name: [q for q in s.items[: options.limit] if f"{name}/{q.index}" not in ev.log.done]
            for name, s in subjects.items()}  # fmt: skip
    with ev.progress(sum(len(v) for v in todo.values())) as bar:
        for name, items in todo.items():
            subject = subjects[name]
            if ev.mode == "base":
                _score_subject(ev, name, subject.shots, items, shots, bar)
            else:
                _chat_subject(ev, name, items, bar)
    per_subject = {
        name: [ev.log.done[f"{name}/{q.index}"]["correct"] for q in s.items[: options.limit]]
        for name, s in subjects.items()
    }
    return summarize(ev.task, per_subject)


def summarize(task: str, per_subject: dict[str, list[bool]]) -> dict:
    extra = {"Hard": CEVAL_HARD} if task == "ceval" else None
    summary = choice_summary(per_subject, category_members(task), macro=task != "mmlu", extra_groups=extra)
    return {
        "summary": summary,
        "subjects": {s: {"accuracy": percent(h), "n": len(h)} for s, h in per_subject.items()},
        "aggregation": "micro (all questions pooled)" if task == "mmlu" else "macro (mean of subject accuracies)",
        "items": sum(len(h) for h in per_subject.values()),
    }


def _row(ev: EvalRun, subject: str, item: Question, prompt: str, pred: str | None, **extra) -> dict:
    return {"id": f"{subject}/{item.index}", "task": ev.task, "subject": subject, "index": item.index,
            "prompt": prompt, "pred": pred, "answer": item.answer, "correct": pred == item.answer, **extra}  # fmt: skip


def _score_subject(ev: EvalRun, subject: str, shot_rows: list[Question], items: list[Question], k: int, bar) -> None:
    tokenizer, task = ev.tokenizer, ev.task
    choice_ids = choice_token_ids(tokenizer, task)
    prefix_text = few_shot_prefix(task, subject, shot_rows, k)
    prefix_ids = tokenizer.encode(prefix_text)
    for batch in batched(items, ev.options.batch_size):
        prompts = [prefix_text + format_choice_example(task, q, include_answer=False) for q in batch]
        shared, alone = [], []  # (row, suffix ids) that continue the shared prefix / (row, whole ids) that do not
        for row, prompt in enumerate(prompts):
            ids = tokenizer.encode(prompt)
            if task == "mmlu" and len(ids) > MMLU_MAX_SEQ_LEN:
                alone.append((row, ids[len(ids) - MMLU_MAX_SEQ_LEN + 1 :]))
            elif ids[: len(prefix_ids)] == prefix_ids and len(ids) > len(prefix_ids):
                shared.append((row, ids[len(prefix_ids) :]))
            else:  # the tokens merge across the prefix boundary: score the whole prompt
                alone.append((row, ids))
        logprobs: dict[int, list[float]] = {}
        for prefix, group in ((prefix_ids, shared), ([], alone)):
            if group:
                scores = ev.backend.choice_logprobs(prefix, [ids for _, ids in group], choice_ids)
                logprobs.update({row: s for (row, _), s in zip(group, scores, strict=True)})
        for row, (item, prompt) in enumerate(zip(batch, prompts, strict=True)):
            probs = reference_probs(logprobs[row])
            pred = reference_pred(probs)
            ev.log.write(_row(ev, subject, item, prompt, pred, probs=probs, logprobs=logprobs[row]))
        bar.update(len(batch))


def _chat_subject(ev: EvalRun, subject: str, items: list[Question], bar) -> None:
    max_new = ev.options.max_new_tokens or 512
    for batch in batched(items, ev.options.batch_size):
        prompts = [chat_choice_prompt(ev.task, q) for q in batch]
        responses = ev.backend.chat(prompts, max_new_tokens=max_new, repetition_penalty=1.0)
        for item, prompt, response in zip(batch, prompts, responses, strict=True):
            pred = chat_choice_answer(ev.task, response, item.question, item.options)
            ev.log.write(_row(ev, subject, item, prompt, pred, response=response))
        bar.update(len(batch))
