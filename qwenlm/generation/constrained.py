"""Grammar-constrained decoding: only tokens that keep the output inside a grammar can be sampled.

Built on llguidance, the structured-output engine vLLM and SGLang ship: it compiles JSON schemas and
Lark grammars against our tiktoken vocabulary and answers "which next tokens are allowed?" per step
as a bitmask in microseconds, so each row of a continuous batch carries its own grammar state. This
module knows nothing of HTTP or of the engine: grammar text in, a per-request `GrammarConstraint` out.

    compiler = GrammarCompiler(tokenizer, end_token_ids=[151643, 151645])   # ~1 s, once per process
    constraint = compiler.compile(json_schema_grammar({"type": "object"}))
    logits = constraint.mask_logits(logits)      # before sampling: forbidden tokens -> -inf
    constraint.advance(token)                    # after: the grammar moves on

Once the grammar is complete only the end tokens stay allowed, so the model stops by itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# How generated JSON is laid out: json.dumps' default separators and no free whitespace. Free whitespace
# lets a weak model emit blanks forever (a known structured-output failure); a fixed layout cannot.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The grammar or JSON schema cannot be compiled; the message says why (meant for the client)."""


class GrammarUnavailable(RuntimeError):
    """llguidance is not installed."""


def json_value_rule(schema: Mapping[str, Any] | None, *, lenient: bool = False) -> str:
    """A Lark rule body (llguidance's `%json`) for one JSON value matching `schema`; None = any object.
    `lenient`: schema keywords llguidance cannot enforce are ignored instead of refused.

    Raises:
        GrammarError: `schema` is not a JSON object (a dict).
    """
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, Mapping):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        options = {**JSON_STYLE, "lenient": lenient}
        return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise GrammarError(f"the JSON schema cannot be serialised: {err}") from None


def json_schema_grammar(schema: Mapping[str, Any] | None, *, lenient: bool = False) -> str:
    """A grammar whose only sentences are JSON values matching `schema` (None = any JSON object)."""
    return f"start: {json_value_rule(schema, lenient=lenient)}"


def guided_grammar(kind: str, value: Any) -> str:
    """vLLM's guided decoding as grammar text: `json` (a schema, or its JSON text), `json_object`, `regex`,
    `choice` (a list of strings) or `grammar` (Lark or llama.cpp's GBNF, which llguidance translates).

    Raises:
        GrammarError: the value does not describe a constraint (bad JSON, no choices, bad GBNF).
        GrammarUnavailable: llguidance is not installed.
    """
    if kind == "json_object":
        return json_schema_grammar(None)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as err:
                raise GrammarError(f"the JSON schema is not valid JSON: {err}") from None
        return json_schema_grammar(value, lenient=True)
    if kind == "choice" and (not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value)):
        raise GrammarError("choice needs a non-empty list of strings")
    try:
        import llguidance
    except ImportError:
        raise GrammarUnavailable("structured output needs the llguidance package: pip install llguidance") from None
    text = json.dumps(value, ensure_ascii=False) if kind == "choice" else value
    try:
        return llguidance.grammar_from({"regex": "regex", "choice": "choice", "grammar": "grammar"}[kind], text)
    except (ValueError, RuntimeError) as err:
        raise GrammarError(_headline(str(err))) from None


def lark_string(text: str) -> str:
    """`text` as a Lark string literal (JSON string escaping, which llguidance's Lark reads)."""
    return json.dumps(text, ensure_ascii=False)


class GrammarConstraint:
    """One request's grammar state. Not thread-safe: the engine thread alone uses it once it runs.

    Never raises on model output: a token the grammar refuses (only possible when something else
    picked it) puts it in an error state, where only the end tokens are allowed, so the request ends.
    """

    def __init__(self, matcher: Any, end_token_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._end_token_ids = list(end_token_ids)

    @property
    def finished(self) -> bool:
        """The grammar is complete (or broken): nothing but an end token may follow."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        """Why the matcher broke, "" when it did not."""
        return str(self._matcher.get_error())

    def allowed(self, vocab_size: int) -> Tensor:
        """[vocab_size] bool: the tokens that may come next (CPU)."""
        bits = np.zeros(vocab_size, dtype=np.uint8)
        if not self._matcher.is_error():
            packed = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            unpacked = np.unpackbits(packed, bitorder="little")  # bit i of byte j = token 8j + i
            n = min(vocab_size, unpacked.size)
            bits[:n] = unpacked[:n]
        if not bits.any():  # broken grammar: let the request end rather than sample from nothing
            bits[[t for t in self._end_token_ids if t < vocab_size]] = 1
        return torch.from_numpy(bits.view(np.bool_))

    def mask_logits(self, logits: Tensor) -> Tensor:
        """`logits` [B, V] with every token the grammar forbids at -inf (same mask for each row)."""
        allowed = self.allowed(logits.shape[-1]).to(logits.device)
        return torch.where(allowed, logits, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Feed the token that was sampled (an end token after completion is fine)."""
        if token_id in self._end_token_ids and self._matcher.is_stopped():
            return
        self._matcher.consume_token(int(token_id))


class GrammarCompiler:
    """Compiles grammars against one tokenizer. Building it indexes the vocabulary (about a second);
    compiling a grammar is then fast (a millisecond for typical schemas), so keep one per process.

    Args:
        tokenizer: a `QwenTokenizer` (regular tokens from `get_vocab()`, specials from `special_tokens`).
        end_token_ids: the tokens that end a reply; the only ones allowed once the grammar is complete.

    Raises:
        GrammarUnavailable: llguidance is not installed.
    """

    def __init__(self, tokenizer: Any, end_token_ids: Sequence[int]) -> None:
        try:
            import llguidance
        except ImportError:
            raise GrammarUnavailable("structured output needs the llguidance package: pip install llguidance") from None
        from ..tokenizer import PAT_STR

        self.end_token_ids = list(end_token_ids)
        self._llguidance = llguidance
        self._tokenizer = llguidance.LLTokenizer.from_tiktoken(
            encoder=tokenizer.get_vocab(),
            special_tokens=dict(tokenizer.special_tokens),
            pattern=PAT_STR,
            eos_token=self.end_token_ids,
            n_vocab=len(tokenizer),
        )

    def compile(self, grammar: str) -> GrammarConstraint:
        """A fresh constraint (at the grammar's start) for `grammar` (Lark text or llguidance JSON).

        Raises:
            GrammarError: the grammar (or the JSON schema inside it) is invalid or unsupported.
        """
        matcher_cls = self._llguidance.LLMatcher
        is_error, messages = matcher_cls.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise GrammarError(_headline(messages[0] if messages else "invalid grammar"))
        matcher = matcher_cls(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_headline(matcher.get_error()))
        return GrammarConstraint(matcher, self.end_token_ids)


def _headline(message: str) -> str:
    """llguidance's error without its position prefix and echoed source ("at 1(8): failed ...\n  1 | ...")."""
    first = message.strip().splitlines()[0] if message.strip() else "invalid grammar"
    return first.split(": ", 1)[1] if first.startswith("at ") and ": " in first else first
