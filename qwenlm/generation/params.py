"""`SamplingParams`: the validated, immutable decoding settings of one request.

params = SamplingParams.from_generation_config(model.generation_config, temperature=0.7, stop="Observation:")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..model.config import GenerationConfig

# Temperatures below this are treated as 0, i.e. greedy (dividing by ~0 would overflow anyway).
GREEDY_TEMPERATURE = 1e-5

_DEFAULT_MAX_NEW_TOKENS = 512

# OpenAI's logit_bias range; -100 bans a token outright (see sampling.apply_logit_bias).
MAX_LOGIT_BIAS = 100.0

# GenerationConfig keys that shape the prompt or the batch, not the choice of the next token.
_IGNORED_KEYS = frozenset({"pad_token_id", "bos_token_id", "chat_format", "max_window_size", "max_length"})

# Hugging Face / GenerationConfig spellings accepted as overrides -> our field name.
_ALIASES = {"eos_token_id": "eos_token_ids", "stop_strings": "stop"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _token_id_tuple(field: str, value: Any) -> tuple[int, ...]:
    """An int or a sequence of non-negative ints -> a tuple (a single id is the common eos form)."""
    if _is_int(value):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"SamplingParams field {field!r} must be a token id or a sequence of them, got {value!r}")
    if not all(_is_int(i) and i >= 0 for i in value):
        raise ValueError(f"SamplingParams field {field!r} must hold non-negative int token ids, got {value!r}")
    return tuple(value)


def _stop_words_tuple(value: Any) -> tuple[tuple[int, ...], ...]:
    bad = ValueError(
        f"SamplingParams field 'stop_words_ids' must be a sequence of non-empty sequences of non-negative "
        f"int token ids, got {value!r}"
    )
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise bad
    out = []
    for seq in value:
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or len(seq) == 0:
            raise bad
        if not all(_is_int(i) and i >= 0 for i in seq):
            raise bad
        out.append(tuple(seq))
    return tuple(out)


def _logit_bias_tuple(value: Any) -> tuple[tuple[int, float], ...]:
    """`{token id: bias}` or `[(id, bias), ...]` -> sorted `((id, bias), ...)`, biases in OpenAI's [-100, 100]."""
    bad = ValueError(
        f"SamplingParams field 'logit_bias' must map non-negative int token ids to numbers in "
        f"[{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value!r}"
    )
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise bad
    out: dict[int, float] = {}
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise bad
        token, bias = pair
        if not (_is_int(token) and token >= 0 and _is_number(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise bad
        out[token] = float(bias)
    return tuple(sorted(out.items()))


def _stop_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(s, str) and s for s in value):
        raise ValueError(f"SamplingParams field 'stop' must be a non-empty string or a sequence of them, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop; validated once, then shared freely.

    Semantics follow Hugging Face `generate`: `top_k` 0 and `top_p` 1.0 switch those filters off,
    `repetition_penalty` 1.0 is off. Lists are accepted for the tuple fields and stored as tuples,
    and `stop` may be a single string.
    """

    max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS
    """Upper bound on generated tokens (stop tokens included)."""
    do_sample: bool = False
    """Sample from the processed distribution; False means greedy argmax."""
    temperature: float = 1.0
    """Logit divisor when sampling; below 1e-5 counts as 0, i.e. greedy."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest top set with probability mass >= top_p (1.0 = off)."""
    min_p: float = 0.0
    """Keep only tokens at least min_p times as likely as the most likely one (0.0 = off)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on every token already in the sequence, prompt included (1.0 = off)."""
    seed: int | None = None
    """Seed for this request's torch.Generator; None draws one from OS entropy."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end generation (not part of the returned text)."""
    stop_words_ids: tuple[tuple[int, ...], ...] = ()
    """Qwen stop-word token sequences (e.g. ((151645,), (151644,)) for ChatML)."""
    stop: tuple[str, ...] = ()
    """Stop strings: output text is cut before the first of them."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """OpenAI logit_bias as `((token id, bias), ...)`: added to the logits before any other processor;
    -100 bans the token. A `{id: bias}` dict is accepted too."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams field 'max_new_tokens' must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"SamplingParams field 'do_sample' must be a bool, got {self.do_sample!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"SamplingParams field 'temperature' must be >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"SamplingParams field 'top_k' must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams field 'top_p' must be in (0, 1] (1.0 = off), got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams field 'min_p' must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(
                f"SamplingParams field 'repetition_penalty' must be > 0 (1.0 = off), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"SamplingParams field 'seed' must be an int in [-2**63, 2**64) or None: {self.seed!r}")
        # Frozen dataclass: normalisation has to go through object.__setattr__.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "min_p", float(self.min_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        object.__setattr__(self, "eos_token_ids", _token_id_tuple("eos_token_ids", self.eos_token_ids))
        object.__setattr__(self, "stop_words_ids", _stop_words_tuple(self.stop_words_ids))
        object.__setattr__(self, "stop", _stop_tuple(self.stop))
        object.__setattr__(self, "logit_bias", _logit_bias_tuple(self.logit_bias))

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: sampling off, or a temperature of (about) zero."""
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE

    @property
    def is_plain_argmax(self) -> bool:
        """True when the next token is the argmax of the raw logits: greedy, with no logit bias and no
        repetition penalty (the only processors that apply to greedy decoding)."""
        return self.is_greedy and not self.logit_bias and self.repetition_penalty == 1.0

    @classmethod
    def from_generation_config(cls, gen: GenerationConfig | None = None, **overrides: Any) -> SamplingParams:
        """Build params from a checkpoint's generation config, then apply per-request overrides.

        Args:
            gen: the model's `GenerationConfig`; None means `GenerationConfig()` (HF defaults).
            **overrides: our field names, or the HF spellings `eos_token_id` (int or list) and
                `stop_strings`. A None value means "not given". GenerationConfig keys that do not
                affect sampling (pad/bos ids, chat_format, max_window_size, max_length) are ignored.

        Raises:
            ValueError: on an unknown override key (before anything else is done) or invalid values.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | set(_ALIASES) | _IGNORED_KEYS
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown}; known: {sorted(known)}")

        gen = GenerationConfig.coerce(gen) or GenerationConfig()
        values: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "temperature": gen.temperature,
            "top_k": gen.top_k,
            "top_p": gen.top_p,
            "repetition_penalty": gen.repetition_penalty,
            "seed": gen.seed,
            "eos_token_ids": tuple(gen.eos_token_ids),
            "stop_words_ids": gen.stop_words_ids or (),
        }
        # A null in generation_config.json means "use the default", as it does for HF.
        values = {k: v for k, v in values.items() if v is not None}

        given = {k: v for k, v in overrides.items() if v is not None and k not in _IGNORED_KEYS}
        for alias, name in _ALIASES.items():
            if alias in given and name in given:
                raise ValueError(f"sampling options {alias!r} and {name!r} are the same setting; give only one")
        values.update({_ALIASES.get(k, k): v for k, v in given.items()})
        return cls(**values)
