"""Perplexity over context lengths (the seed's long-context table): the text tokenized once, cut into
consecutive non-overlapping windows of exactly L tokens (the remainder dropped); ppl = exp(mean NLL of
tokens 2..L of every window). One item row per length."""

from __future__ import annotations

import math

from ..data import DataError, read_text
from ..runner import EvalRun, batched


def windows_of(ids: list[int], length: int) -> list[list[int]]:
    return [ids[i * length : (i + 1) * length] for i in range(len(ids) // length)]


def run(ev: EvalRun) -> dict:
    options = ev.options
    text, files = read_text(options.data)
    ev.files += files
    ids = ev.tokenizer.encode(text, allowed_special=set())  # special-token text is plain text here
    lengths = options.context_lengths
    for length in lengths:
        if length < 2:
            raise ValueError(f"--context-lengths: {length} is too short (a window needs 2 tokens)")
        if len(ids) < length:
            raise DataError(f"{options.data}: the text is {len(ids)} tokens, shorter than one {length}-token window")
    todo = [n for n in lengths if str(n) not in ev.log.done]
    plan = {n: windows_of(ids, n)[: options.limit] for n in todo}
    with ev.progress(sum(len(w) for w in plan.values()), unit="window") as bar:
        for length, windows in plan.items():
            nll = 0.0
            for batch in batched(windows, options.batch_size):
                nll += math.fsum(ev.backend.window_nlls(batch))
                bar.update(len(batch))
            tokens = len(windows) * (length - 1)
            ev.log.write({"id": str(length), "task": "ppl", "context_length": length, "windows": len(windows),
                          "tokens_scored": tokens, "nll": nll / tokens, "ppl": math.exp(nll / tokens)})  # fmt: skip
    ev.extra["text_tokens"] = len(ids)
    return {"summary": {str(n): ev.log.done[str(n)]["ppl"] for n in lengths}, "items": len(lengths)}
