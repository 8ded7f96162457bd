"""Chatting with a Qwen-Chat model: the reference's `model.chat` / `model.chat_stream`, batch chat over
several conversations, and a messages-style API that the server reuses.

    response, history = chat(model, tokenizer, "你好", history=None)
    for text in chat_stream(model, tokenizer, "Tell me a story", history=history): print(text)
    result = chat_messages(model, tokenizer, [{"role": "user", "content": "Hi"}], temperature=0.7)

Prompts come from `chat_format` (byte-exact ChatML); tokens from `generation`. Responses are the text
up to the first ChatML stop token, stripped — the same string whether streamed or not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .chat_format import (
    DEFAULT_SYSTEM,
    get_stop_words_ids,
    make_context,
    render_messages,
    validate_history,
)
from .generation.generate import Chunk, GenerationResult, check_fits, stream_batch
from .generation.params import SamplingParams
from .generation.sampling import with_torch_seed
from .model.config import GenerationConfig

History = list[tuple[str, str]]


def _chat_setup(
    model, tokenizer, generation_config: GenerationConfig | None, stop_words_ids: Sequence[Sequence[int]] | None,
    kwargs: dict[str, Any],
) -> tuple[SamplingParams, int]:  # fmt: skip
    """Sampling params and window size for a chat turn; every option is checked before any compute."""
    if "stream" in kwargs:
        raise TypeError("chat(stream=...) was removed in the reference too; use chat_stream() instead")
    gen = GenerationConfig.coerce(generation_config or model.generation_config) or GenerationConfig()
    if gen.chat_format != "chatml":
        raise ValueError(
            f"chat needs a chat model (generation_config chat_format 'chatml'), but this one is "
            f"{gen.chat_format!r}: it looks like a base model; use generate() for plain continuation"
        )
    max_window_size = kwargs.pop("max_window_size", None) or gen.max_window_size
    stops = [list(s) for s in (stop_words_ids or [])] + get_stop_words_ids("chatml", tokenizer)  # caller's list kept
    params = with_torch_seed(SamplingParams.from_generation_config(gen, stop_words_ids=stops, **kwargs))
    return params, max_window_size


def chat(
    model, tokenizer, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM,
    stop_words_ids: Sequence[Sequence[int]] | None = None, generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> tuple[str, History]:  # fmt: skip
    """One chat turn: `(response, history + [(query, response)])`; the caller's history is not touched.

    kwargs override the generation config for this call (temperature, top_p, max_new_tokens, seed...).
    """
    *_, (response, new_history) = batch_chat(
        model, tokenizer, [query], [history], system, stop_words_ids, generation_config, **kwargs
    )
    return response, new_history


def chat_stream(
    model, tokenizer, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM,
    stop_words_ids: Sequence[Sequence[int]] | None = None, generation_config: GenerationConfig | None = None,
    delta: bool = False, **kwargs: Any,
) -> Iterator[str]:  # fmt: skip
    """Stream a reply. Like the reference, each yield is the whole response so far; with `delta=True`
    each yield is only the new text. The last cumulative yield equals `chat()`'s response."""
    params, window = _chat_setup(model, tokenizer, generation_config, stop_words_ids, kwargs)
    _, context = make_context(tokenizer, query, validate_history(history), system, window)
    check_fits(model, len(context), params.max_new_tokens)  # fail here, not at the first next()
    return _cumulative(stream_batch(model, tokenizer, [context], params), delta)


def _cumulative(steps: Iterator[list[Chunk | None]], delta: bool) -> Iterator[str]:
    """Leading whitespace dropped and trailing whitespace held back, so every cumulative yield is a
    prefix of the next and the last equals the stripped response that `chat()` returns."""
    raw, shown = "", ""
    for chunks in steps:
        raw += chunks[0].text
        text = raw.strip()
        if text != shown:
            yield text[len(shown) :] if delta else text
            shown = text
    if not shown and not delta:
        yield ""


def batch_chat(
    model, tokenizer, queries: Sequence[str], histories: Sequence[History | None] | None = None,
    system: str = DEFAULT_SYSTEM, stop_words_ids: Sequence[Sequence[int]] | None = None,
    generation_config: GenerationConfig | None = None, **kwargs: Any,
) -> list[tuple[str, History]]:  # fmt: skip
    """Several conversations in one left-padded batch; row i equals `chat(queries[i], histories[i])`."""
    histories = list(histories) if histories is not None else [None] * len(queries)
    if len(histories) != len(queries):
        raise ValueError(f"got {len(queries)} queries but {len(histories)} histories")
    checked = [validate_history(h) for h in histories]
    params, window = _chat_setup(model, tokenizer, generation_config, stop_words_ids, kwargs)
    contexts = [make_context(tokenizer, q, h, system, window)[1] for q, h in zip(queries, checked, strict=True)]
    raw = [""] * len(queries)
    for chunks in stream_batch(model, tokenizer, contexts, params):
        for row, chunk in enumerate(chunks):
            if chunk is not None:
                raw[row] += chunk.text
    responses = [text.strip() for text in raw]
    return [(r, [*h, (q, r)]) for r, h, q in zip(responses, checked, queries, strict=True)]


def _messages_setup(model, tokenizer, messages, generation_config, kwargs) -> tuple[SamplingParams, list[int]]:
    params, window = _chat_setup(model, tokenizer, generation_config, None, kwargs)
    return params, render_messages(tokenizer, list(messages), max_window_size=window)[1]


def stream_messages(model, tokenizer, messages: Sequence[dict], generation_config: GenerationConfig | None = None,
                    **kwargs: Any) -> Iterator[Chunk]:  # fmt: skip
    """Messages API: stream `Chunk`s (token id, text delta, finish reason) for an OpenAI-style list of
    `{"role": "system"|"user"|"assistant", "content": str}`. Text is not stripped here."""
    params, context = _messages_setup(model, tokenizer, messages, generation_config, kwargs)
    for chunks in stream_batch(model, tokenizer, [context], params):
        yield chunks[0]


def chat_messages(model, tokenizer, messages: Sequence[dict], generation_config: GenerationConfig | None = None,
                  **kwargs: Any) -> GenerationResult:  # fmt: skip
    """Messages API, whole reply: text (stripped), generated ids, finish reason and prompt size."""
    params, context = _messages_setup(model, tokenizer, messages, generation_config, kwargs)
    text, tokens, reason = "", [], "length"
    for chunks in stream_batch(model, tokenizer, [context], params):
        text, reason = text + chunks[0].text, chunks[0].finish_reason or reason
        tokens.append(chunks[0].token_id)
    return GenerationResult(text=text.strip(), token_ids=tokens, finish_reason=reason, prompt_tokens=len(context))
