"""Finetuning data: read conversation files, turn each sample into (input_ids, labels), batch them.

Two record formats, in a JSON list or JSONL (one record per line):

    {"id": "identity_0", "conversations": [{"from": "user", "value": "你好"}, {"from": "assistant", "value": "..."}]}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}, ...]}

A leading system turn sets that sample's system message. The prompt bytes come from
`qwenlm.chat_format.render_sft_turns` (the one ChatML builder), so what is trained is what chat sends:

    input_ids, labels = tokenize_conversation(tokenizer, record, max_len=512, mask="assistant")
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..chat_format import DEFAULT_SYSTEM, SFTMask, render_sft_turns
from ..files import read_text_file
from ..tokenizer import QwenTokenizer

IGNORE_INDEX = -100  # labels with this value are not trained (transformers' LabelSmoother.ignore_index)
_ROLE_KEYS = (("from", "value"), ("role", "content"))
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT spellings, as LlamaFactory reads them


class DataError(ValueError):
    """A data file or sample that is not in the expected format; the message names the file and line/index."""


@dataclass
class Conversation:
    """One parsed sample: the system message (None: use the default) and its user/assistant turns."""

    turns: list[tuple[str, str]]
    system: str | None = None
    dropped_first_turn: bool = False  # a first non-user turn was dropped (the reference does this)
    where: str = ""  # "file:line" or "file[index]", for messages


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------
def parse_conversation(record: Any, where: str = "sample") -> Conversation:
    """Check one record (or a bare list of turns) and return its system message and turns.

    Accepted: `{"conversations": [...]}` (from/value), `{"messages": [...]}` (role/content), or the list
    itself; roles user/assistant (human/gpt too), system only first. A first non-user turn after the
    optional system is dropped, as the reference does (`dropped_first_turn` says so).

    Raises:
        DataError: not a record, empty, unknown role, system not first, non-text content, or no assistant
            turn; the message starts with `where`.
    """
    turns_raw, system = _turn_list(record, where)
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(turns_raw):
        role, content = _turn_fields(turn, f"{where}: turn {i}")
        if role == "system":
            if i != 0:
                raise DataError(f"{where}: turn {i} is a system turn; a system message may only come first")
            system = content
            continue
        turns.append((role, content))
    dropped = bool(turns) and turns[0][0] != "user"
    if dropped:
        turns = turns[1:]
    if not turns:
        raise DataError(f"{where}: the conversation has no user or assistant turns")
    if all(role != "assistant" for role, _ in turns):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    return Conversation(turns, system, dropped, where)


def _turn_list(record: Any, where: str) -> tuple[list, str | None]:
    system = None
    if isinstance(record, Mapping):
        key = next((k for k in ("conversations", "messages") if k in record), None)
        if key is None:
            raise DataError(f"{where}: a record needs a 'conversations' or 'messages' list, got keys {sorted(record)}")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string, got {type(system).__name__}")
        record = record[key]
    if isinstance(record, (str, bytes)) or not isinstance(record, Sequence):
        raise DataError(f"{where}: expected a list of turns, got {type(record).__name__}")
    if not record:
        raise DataError(f"{where}: the conversation is empty")
    return list(record), system


def _turn_fields(turn: Any, where: str) -> tuple[str, str]:
    if not isinstance(turn, Mapping):
        raise DataError(f"{where}: expected an object with from/value or role/content, got {type(turn).__name__}")
    keys = next(((r, t) for r, t in _ROLE_KEYS if r in turn), None)
    if keys is None:
        raise DataError(f"{where}: no 'from' or 'role' key (keys: {sorted(turn)})")
    role_key, text_key = keys
    if text_key not in turn:
        raise DataError(f"{where}: has {role_key!r} but no {text_key!r}")
    role, content = turn[role_key], turn[text_key]
    role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ("system", "user", "assistant"):
        raise DataError(
            f"{where}: unknown role {role!r}; expected 'user' or 'assistant' ('system' first only). Function "
            "calls are ReAct text inside user/assistant turns (see the README's finetuning section)"
        )
    if not isinstance(content, str):
        raise DataError(f"{where}: {text_key!r} must be a string, got {type(content).__name__}")
    return role, content


def read_records(path: str | os.PathLike) -> list[tuple[Any, str]]:
    """The records of a JSON-list or JSONL file, each with where it came from ("file[3]" / "file:4").

    The format is told from the content (a JSON list starts with '['), not the file name.

    Raises:
        FileNotFoundError: no such file.
        DataError: invalid JSON (named with line and column), a JSON file that is not a list, or no records.
    """
    path = Path(path)
    try:
        text = read_text_file(path, "data file")
    except ValueError as err:
        raise DataError(str(err)) from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        records = [(record, f"{path}[{i}]") for i, record in enumerate(data)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); expected a JSON list or "
                    "one JSON object per line"
                ) from None
    if not records:
        raise DataError(f"{path} holds no samples")
    return records


# --------------------------------------------------------------------------------------------------
# Tokens and labels
# --------------------------------------------------------------------------------------------------
def tokenize_conversation(
    tokenizer: QwenTokenizer,
    conversation: Any,
    max_len: int,
    system_message: str = DEFAULT_SYSTEM,
    mask: SFTMask = "assistant",
    encode_special: bool | None = None,
) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` of one sample, unpadded, cut at `max_len`; labels are -100 where not trained.

    Labels are aligned with the ids (the loss shifts them by one), as the reference's are.

    Args:
        conversation: a record (`{"conversations": ...}` / `{"messages": ...}`) or a list of turns.
        system_message: used when the sample has no system turn of its own.
        mask: "reference" reproduces the reference `finetune.py` preprocess token for token (spec 7.2),
            including its permissive encoding of data text and its dropping of a first non-user turn;
            "assistant" trains only each assistant reply, its `<|im_end|>` and the `\\n` after it.
        encode_special: whether special-token text inside the data becomes control tokens; default: only
            with mask="reference" (the reference does it; otherwise a sample could forge a turn boundary).

    Raises:
        DataError: see `parse_conversation`.
    """
    if not isinstance(conversation, Conversation):
        conversation = parse_conversation(conversation)
    if encode_special is None:
        encode_special = mask == "reference"
    system = conversation.system if conversation.system is not None else system_message
    allowed = "all" if encode_special else set()
    ids, trained = render_sft_turns(tokenizer, system, conversation.turns, allowed, mask)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, trained, strict=True)]
    return ids[:max_len], labels[:max_len]


def trained_tokens(labels: Sequence[int]) -> int:
    """Targets the loss sees: labels after the one-token shift that are not -100."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


@dataclass
class DataStats:
    """What happened to the samples of one file (reported before training)."""

    samples: int = 0
    truncated: int = 0  # longer than max_len, cut
    dropped: int = 0  # nothing left to train after the cut: not used
    first_turn_dropped: int = 0  # a first non-user turn dropped (reference behaviour)
    tokens: int = 0
    trained: int = 0
    dropped_where: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        share = 100 * self.trained / max(self.tokens, 1)
        text = (
            f"{name}: {self.samples - self.dropped} samples, {self.tokens} tokens ({self.trained} trained, "
            f"{share:.0f}%); {self.truncated} truncated"
        )
        if self.dropped:
            text += f", {self.dropped} dropped with nothing left to train (e.g. {', '.join(self.dropped_where[:3])})"
        if self.first_turn_dropped:
            text += f", {self.first_turn_dropped} with a first non-user turn dropped"
        return text


@dataclass
class SFTDataset:
    """Tokenized samples, ready to batch. `examples[i]` is `(input_ids, labels)`."""

    examples: list[tuple[list[int], list[int]]]
    stats: DataStats
    sources: list[str]  # where each example came from

    def __len__(self) -> int:
        return len(self.examples)


def build_dataset(
    tokenizer: QwenTokenizer,
    records: Sequence[tuple[Any, str]],
    max_len: int,
    system_message: str = DEFAULT_SYSTEM,
    mask: SFTMask = "assistant",
    encode_special: bool | None = None,
    progress: bool = True,
) -> SFTDataset:
    """Parse and tokenize every record; count truncated samples and drop (and count) empty ones.

    Raises:
        DataError: the first malformed record, named by file and line/index.
    """
    stats, examples, sources = DataStats(), [], []
    for record, where in tqdm(records, desc="Tokenizing", unit="sample", disable=not progress, leave=False):
        conversation = parse_conversation(record, where)
        full_ids, full_labels = tokenize_conversation(
            tokenizer, conversation, 1 << 62, system_message, mask, encode_special
        )
        stats.samples += 1
        stats.first_turn_dropped += conversation.dropped_first_turn
        ids, labels = full_ids[:max_len], full_labels[:max_len]
        if len(full_ids) > max_len:
            stats.truncated += 1
        if trained_tokens(labels) == 0:
            stats.dropped += 1
            stats.dropped_where.append(where)
            continue
        stats.tokens += len(ids)
        stats.trained += trained_tokens(labels)
        examples.append((ids, labels))
        sources.append(where)
    return SFTDataset(examples, stats, sources)


def split_validation(records: list, val_size: float, seed: int) -> tuple[list, list]:
    """Hold out `val_size` records (a count >= 1, or a fraction < 1), chosen with `seed`."""
    count = int(val_size) if val_size >= 1 else int(round(val_size * len(records)))
    count = max(1, count) if val_size > 0 else 0
    if count >= len(records):
        raise DataError(f"val_size={val_size} leaves no training samples out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------
def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample in the batch (dynamic padding): ids with `pad_id`, labels with -100.

    No attention mask is needed: with right padding and causal attention no real token sees a pad.
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "labels": labels}


def pack(examples: Sequence[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedily pack examples (in the given order) into rows of at most `max_len` tokens.

    Returns rows of `(input_ids, labels, segment)`, `segment` numbering the samples inside a row (1, 2, ...);
    the training forward keeps attention inside a segment and restarts positions at each. Each sample's first
    label is dropped: it would be predicted from the previous sample's last token.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    segment: list[int] = []
    for example_ids, example_labels in examples:
        if ids and len(ids) + len(example_ids) > max_len:
            rows.append((ids, labels, segment))
            ids, labels, segment = [], [], []
        number = (segment[-1] if segment else 0) + 1
        ids, labels = ids + example_ids, labels + [IGNORE_INDEX] + example_labels[1:]
        segment = segment + [number] * len(example_ids)
    if ids:
        rows.append((ids, labels, segment))
    return rows
