"""ChatML prompts for Qwen v1 chat models: the single place that turns conversations into token ids.

Everything that builds a prompt or an SFT sample (model.chat, the CLI/web demos, the server, finetuning)
goes through this module, so the bytes the model sees are decided here and nowhere else. Two layers:

- the reference layer, byte-for-byte the original `qwen_generation_utils.py` behaviour: `make_context`,
  `get_stop_words_ids`, `decode_tokens` (quirks included, because `model.chat` parity depends on them);
- the clean layer used by the newer APIs: `trim_response`, the OpenAI-style messages API
  (`messages_to_conversation`, `render_messages`) and `render_conversation` (ids + loss mask for SFT).

    raw_text, ids = make_context(tok, "你好", system=DEFAULT_SYSTEM)   # ids[-3:] == [im_start, 77091, 198]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from .tokenizer import ENDOFTEXT, IMEND, IMSTART, AllowedSpecial, QwenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
CHAT_FORMATS = ("chatml", "raw")


class Message(TypedDict):
    """One chat message as OpenAI-style APIs send it: role is "system", "user" or "assistant"."""

    role: str
    content: str


FinishReason = Literal["stop", "length"]
SFTMask = Literal["reference", "assistant"]
SFT_MASKS: tuple[SFTMask, ...] = ("reference", "assistant")


def _check_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {', '.join(map(repr, CHAT_FORMATS))}")


def _as_ids(tokens: Any) -> list[int]:
    """Token ids from a list, tuple, 1-d numpy array or 1-d torch tensor (generate returns tensors)."""
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return [int(t) for t in tokens]


# --------------------------------------------------------------------------------------------------
# Reference layer (spec 4.2 - 4.4)


def validate_history(history: Sequence[Sequence[str]] | None) -> list[tuple[str, str]]:
    """Check a chat history and return it as a fresh list of `(query, response)` tuples.

    A copy is returned so callers (model.chat appends to it) never mutate the list they were given.

    Raises:
        ValueError: an entry is not a 2-item tuple/list of str; the message names its index.
    """
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    pairs: list[tuple[str, str]] = []
    for i, turn in enumerate(history):
        if not isinstance(turn, (tuple, list)):
            raise ValueError(f"history[{i}] must be a (query, response) tuple or list, got {type(turn).__name__}")
        if len(turn) != 2:
            raise ValueError(f"history[{i}] must have exactly 2 items (query, response), got {len(turn)}")
        for name, value in zip(("query", "response"), turn, strict=True):
            if not isinstance(value, str):
                raise ValueError(f"history[{i}] {name} must be a str, got {type(value).__name__}")
        pairs.append((turn[0], turn[1]))
    return pairs


def make_context(
    tokenizer: QwenTokenizer,
    query: str,
    history: Sequence[Sequence[str]] | None = None,
    system: str = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """Build the generation prompt exactly like the reference `make_context`.

    chatml: system block, then as many history turns as fit, then the new query and an open assistant
    turn (layout in spec 4.1). Role names and contents are encoded with `allowed_special=set()` so
    special-token text written by a user stays plain text; the control tokens are spliced in by id.
    History is walked newest to oldest and a turn is kept only while
    `len(system) + len(turn) + len(kept so far) < max_window_size` (strict); the first turn that does not
    fit is dropped together with every older one. The new query is not counted, so the prompt may end
    up longer than `max_window_size` (reference behaviour).

    raw: `(query, encode(query))` with the permissive default encoding; history and system are ignored.

    Returns:
        `(raw_text, context_tokens)`. `raw_text` is the same layout as a string; `decode_tokens` uses its
        length to cut the prompt off the decoded output.

    Raises:
        ValueError: unknown `chat_format`, or a malformed history (see `validate_history`).
    """
    _check_format(chat_format)
    pairs = validate_history(history)
    if chat_format == "raw":
        return query, tokenizer.encode(query)

    im_start, im_end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = tokenizer.encode("\n")

    def part(role: str, content: str) -> tuple[str, list[int]]:
        # Role and content encoded separately (not as one string), so "\n" + a content starting with "\n"
        # is [198, 198], never the merged [271]; this is what the reference does.
        ids = tokenizer.encode(role, allowed_special=set()) + nl + tokenizer.encode(content, allowed_special=set())
        return f"{role}\n{content}", ids

    system_text, system_ids = part("system", system)
    system_tokens = im_start + system_ids + im_end
    system_raw = f"{IMSTART}{system_text}{IMEND}"

    kept_raw, kept_tokens = "", []
    for q, a in reversed(pairs):
        q_text, q_ids = part("user", q)
        a_text, a_ids = part("assistant", a)
        turn = nl + im_start + q_ids + im_end + nl + im_start + a_ids + im_end
        if len(system_tokens) + len(turn) + len(kept_tokens) >= max_window_size:
            break  # this turn and all older ones are dropped
        kept_tokens = turn + kept_tokens
        kept_raw = f"\n{IMSTART}{q_text}{IMEND}\n{IMSTART}{a_text}{IMEND}" + kept_raw

    q_text, q_ids = part("user", query)
    tokens = system_tokens + kept_tokens + nl + im_start + q_ids + im_end + nl
    tokens += im_start + tokenizer.encode("assistant") + nl
    raw_text = f"{system_raw}{kept_raw}\n{IMSTART}{q_text}{IMEND}\n{IMSTART}assistant\n"
    return raw_text, tokens


def get_stop_words_ids(chat_format: str, tokenizer: QwenTokenizer) -> list[list[int]]:
    """Stop sequences for generation: chatml `[[im_end], [im_start]]`, raw `[encode("Human:"), [eod]]`.

    Raises:
        ValueError: unknown `chat_format`.
    """
    _check_format(chat_format)
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    return [tokenizer.encode("Human:"), [tokenizer.eod_id]]


def decode_tokens(
    tokens: Any,
    tokenizer: QwenTokenizer,
    raw_text_len: int,
    context_length: int,
    chat_format: str,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> str | tuple[str, str]:
    """Turn a full generated sequence (prompt + new tokens) into the response text, like the reference.

    chatml: cut at the first `<|im_start|>`/`<|im_end|>` at or after `context_length`, decode, drop the
    first `raw_text_len` characters (the prompt), `strip()`. End reason `"Gen '<|im_end|>'"` (repr of the
    stop token) or `"Gen length N"` with N = `len(tokens)` (prompt included).

    QUIRK (kept on purpose, `model.chat` parity depends on it): when no stop token is found, the
    reference's scan variable is left on the last index, so the **last generated token is dropped**.
    This matters when generation ran out of `max_new_tokens` (or stopped on eos without `<|im_end|>`).
    Use `trim_response` for the clean behaviour.

    raw: decode everything, drop `raw_text_len` characters, remove every `<|endoftext|>` and strip; the
    reference then splits on `<|endoftext|>`, which can no longer match, so the end reason is always
    `"Gen length N"`. "Human:" is not cut here.

    Args:
        tokens: the ids (list or 1-d tensor) of prompt + generation.
        raw_text_len: `len(raw_text)` from `make_context`.
        context_length: `len(context_tokens)` from `make_context`.
        verbose: print the untrimmed generation and the end reason (as the reference does).
        return_end_reason: return `(text, end_reason)` instead of the text.
        errors: UTF-8 error handler for the decode.

    Raises:
        ValueError: unknown `chat_format`.
    """
    _check_format(chat_format)
    ids = _as_ids(tokens)
    end_reason = f"Gen length {len(ids)}"
    if chat_format == "chatml":
        stops = (tokenizer.im_start_id, tokenizer.im_end_id)
        end = context_length
        for end in range(context_length, len(ids)):  # the value left after a full scan is the quirk
            if ids[end] in stops:
                end_reason = f"Gen {tokenizer.decode([ids[end]])!r}"
                break
        text = tokenizer.decode(ids[:end], errors=errors)[raw_text_len:]
        if verbose:
            print("\nRaw Generate w/o EOD:", tokenizer.decode(ids, errors=errors)[raw_text_len:])
            print("\nRaw Generate:", text)
            print("\nEnd Reason:", end_reason)
        text = text.strip()
    else:
        text = tokenizer.decode(ids, errors=errors)[raw_text_len:]
        if verbose:
            print("\nRaw Generate:", text)
            print("\nEnd Reason:", end_reason)
        text = text.replace(ENDOFTEXT, "").strip()
        if ENDOFTEXT in text:  # dead after the replace above; kept to mirror the reference's order
            end_reason = f"Gen {ENDOFTEXT!r}"
            text = text.split(ENDOFTEXT)[0]
        text = text.strip()
    return (text, end_reason) if return_end_reason else text


# --------------------------------------------------------------------------------------------------
# Clean layer


def trim_response(
    generated_ids: Any, tokenizer: QwenTokenizer, chat_format: str, errors: str = "replace"
) -> tuple[str, FinishReason]:
    """Decode only the newly generated ids up to (not including) the first stop token, then `strip()`.

    Stop tokens: chatml `<|im_start|>`, `<|im_end|>` and also `<|endoftext|>` (the chat models' eos, so a
    generation that ended on eos is a normal stop); raw `<|endoftext|>`, and the decoded text is also cut
    at a literal "<|endoftext|>" spelled with regular tokens (the reference strips that text too). No
    last-token quirk: a generation that ran out of budget keeps every token.

    Returns:
        `(text, finish)` with finish `"stop"` if a stop was found, else `"length"`.

    Raises:
        ValueError: unknown `chat_format`.
    """
    _check_format(chat_format)
    ids = _as_ids(generated_ids)
    stops = {tokenizer.eod_id}
    if chat_format == "chatml":
        stops |= {tokenizer.im_start_id, tokenizer.im_end_id}
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    finish: FinishReason = "length" if cut is None else "stop"
    text = tokenizer.decode(ids[:cut], errors=errors)
    if chat_format == "raw" and ENDOFTEXT in text:
        text, finish = text.split(ENDOFTEXT, 1)[0], "stop"
    return text.strip(), finish


def _message_fields(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] must be a mapping with 'role' and 'content', got {type(message).__name__}")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"messages[{index}] has no {key!r}")
    role, content = message["role"], message["content"]
    if not isinstance(role, str):
        raise ValueError(f"messages[{index}] role must be a str, got {type(role).__name__}")
    if not isinstance(content, str):
        raise ValueError(f"messages[{index}] ({role}) content must be a str, got {type(content).__name__}")
    return role, content


def _parse_messages(
    messages: Sequence[Message], default_system: str, last_role: Literal["user", "assistant"]
) -> tuple[str, list[str]]:
    """Check `[system]? user (assistant user)*...` ending with `last_role`; return (system, turn contents)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; expected at least one user message")
    system, turns = default_system, []
    for i, message in enumerate(messages):
        role, content = _message_fields(message, i)
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}]: a system message is only allowed as the first message")
            system = content
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"messages[{i}]: unknown role {role!r}; expected 'system', 'user' or 'assistant'")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"messages[{i}]: expected role {expected!r} (turns alternate user, assistant), got {role!r}"
            )
        turns.append(content)
    last = len(messages) - 1
    if not turns:
        raise ValueError(f"messages[{last}]: the conversation has no user message")
    ends_with = "user" if len(turns) % 2 == 1 else "assistant"
    if ends_with != last_role:
        raise ValueError(f"messages[{last}]: the conversation must end with role {last_role!r}, got {ends_with!r}")
    return system, turns


def messages_to_conversation(
    messages: Sequence[Message], default_system: str = DEFAULT_SYSTEM
) -> tuple[str, list[tuple[str, str]], str]:
    """Split OpenAI-style messages `[system]? (user, assistant)* user` into `(system, history, query)`.

    A missing system message gets `default_system`. Contents are used verbatim (no stripping).

    Raises:
        ValueError: empty list, non-mapping message, unknown role, system not first, roles not
            alternating, ending with an assistant message, or a role/content that is not a str; the
            message names the offending index.
    """
    system, turns = _parse_messages(messages, default_system, "user")
    history = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    return system, history, turns[-1]


def render_messages(
    tokenizer: QwenTokenizer,
    messages: Sequence[Message],
    max_window_size: int = 6144,
    default_system: str = DEFAULT_SYSTEM,
) -> tuple[str, list[int]]:
    """Generation prompt for OpenAI-style messages: `make_context` on `messages_to_conversation(...)`.

    Going through `make_context` keeps the prompt byte-identical to the reference `model.chat` path,
    history truncation by `max_window_size` included.

    Raises:
        ValueError: see `messages_to_conversation`.
    """
    system, history, query = messages_to_conversation(messages, default_system)
    return make_context(tokenizer, query, history, system=system, max_window_size=max_window_size)


def render_conversation(
    tokenizer: QwenTokenizer,
    messages: Sequence[Message],
    default_system: str = DEFAULT_SYSTEM,
    allowed_special: AllowedSpecial = "all",
    mask: SFTMask = "reference",
) -> tuple[list[int], list[int]]:
    """Tokens and loss mask of a complete conversation `[system]? (user, assistant)+`, for SFT.

    `render_sft_turns` on the parsed messages; see there for the layout and the two mask modes.

    Args:
        default_system: system content used when the first message is not a system message (the
            reference finetune always uses "You are a helpful assistant.").
        allowed_special: how content is encoded. The reference uses the permissive `"all"` (special-token
            text inside the data becomes control tokens); pass `set()` to treat it as plain text.
        mask: "reference" (the reference `finetune.py` labels) or "assistant" (assistant turns only).

    Raises:
        ValueError: the messages are not `[system]? (user, assistant)+` (see `messages_to_conversation`).
    """
    system, turns = _parse_messages(messages, default_system, "assistant")
    roles = ("user" if i % 2 == 0 else "assistant" for i in range(len(turns)))
    return render_sft_turns(tokenizer, system, list(zip(roles, turns, strict=False)), allowed_special, mask)


def render_sft_turns(
    tokenizer: QwenTokenizer,
    system: str,
    turns: Sequence[tuple[str, str]],
    allowed_special: AllowedSpecial = "all",
    mask: SFTMask = "reference",
) -> tuple[list[int], list[int]]:
    """Tokens and loss mask of a system block followed by `(role, content)` turns (role user|assistant).

    Layout (reference `finetune.py` preprocess, spec 7.2): every block, system included, is
    `<|im_start|>{role}\\n{content}<|im_end|>\\n` (so the sample ends with `<|im_end|>\\n`). Turns need not
    alternate (the reference accepts any order); callers that need alternation check it themselves.

    The mask is aligned with the ids (not shifted): `labels = [t if m else -100 for t, m in zip(ids, mask)]`.

    mask="reference" reproduces the reference labels exactly; mask is 1 on
    - `<|im_start|>` of every block (system, user and assistant),
    - every assistant content token,
    - `<|im_end|>` and the `\\n` after it in every block (user and system blocks too),
    and 0 on role names, the `\\n` after them, and system/user content. After the model's one-token shift
    this trains the model to emit `<|im_start|>` and `<|im_end|>` after user text as well (the reference's
    repeated-`<|im_start|>` outputs come from this).

    mask="assistant": mask is 1 only on each assistant turn's content, its `<|im_end|>` and the `\\n` after it.

    Raises:
        ValueError: a role other than user/assistant, or an unknown mask.
    """
    if mask not in SFT_MASKS:
        raise ValueError(f"unknown mask {mask!r}; expected one of {', '.join(map(repr, SFT_MASKS))}")
    nl = tokenizer.encode("\n")
    ids: list[int] = []
    labels_mask: list[int] = []

    def add(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        labels_mask.extend([int(trained)] * len(tokens))

    for i, (role, content) in enumerate([("system", system), *turns]):
        if i > 0 and role not in ("user", "assistant"):
            raise ValueError(f"turns[{i - 1}]: unknown role {role!r}; expected 'user' or 'assistant'")
        reply = role == "assistant"
        add([tokenizer.im_start_id], mask == "reference")
        add(tokenizer.encode(role, allowed_special=set()) + nl, False)
        add(tokenizer.encode(content, allowed_special=allowed_special), reply)
        add([tokenizer.im_end_id] + nl, reply or mask == "reference")
    return ids, labels_mask
