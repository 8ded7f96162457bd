"""`qwenlm finetune --show-example N`: one sample as the model sees it, trained tokens told apart.

Trained spans are green on a terminal, else wrapped in «...»; everything else (system, user, role names)
is what the loss ignores:

    print(show_example(TrainArgs(model=..., data="chats.json", output="-"), 0, color=False))
"""

from __future__ import annotations

from ..tokenizer import QwenTokenizer
from .args import TrainArgs
from .data import IGNORE_INDEX, DataError, parse_conversation, read_records, tokenize_conversation, trained_tokens

_GREEN, _DIM, _RESET = "\033[32m", "\033[2m", "\033[0m"


def render_labels(tokenizer: QwenTokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded sample with each run of trained (label != -100) tokens marked."""
    out, start = [], 0
    for end in range(1, len(input_ids) + 1):
        trained = labels[start] != IGNORE_INDEX
        if end < len(input_ids) and (labels[end] != IGNORE_INDEX) == trained:
            continue
        text = tokenizer.decode(input_ids[start:end])
        if color:
            out.append(f"{_GREEN if trained else _DIM}{text}{_RESET}")
        else:
            out.append(f"«{text}»" if trained else text)
        start = end
    return "".join(out)


def show_example(args: TrainArgs, index: int, color: bool = False) -> str:
    """Sample `index` of `args.data` tokenized with `args`'s mask and length, with a header and a legend.

    Raises:
        DataError: no such sample, or a malformed one.
    """
    records = read_records(args.data)
    if not 0 <= index < len(records):
        raise DataError(f"--show-example {index}: {args.data} has samples 0 to {len(records) - 1}")
    record, where = records[index]
    tokenizer = QwenTokenizer.from_pretrained(args.model)
    conversation = parse_conversation(record, where)
    full_ids, _ = tokenize_conversation(tokenizer, conversation, 1 << 62, args.system_message, args.mask,
                                        args.encode_special)  # fmt: skip
    ids, labels = tokenize_conversation(tokenizer, conversation, args.model_max_length, args.system_message,
                                        args.mask, args.encode_special)  # fmt: skip
    legend = "green = trained" if color else "«...» = trained"
    header = (
        f"sample {index} ({where}): {len(ids)} tokens, {trained_tokens(labels)} trained targets, mask={args.mask}"
        f" ({legend}; the rest is context the loss ignores)"
    )
    notes = []
    if len(full_ids) > len(ids):
        notes.append(f"cut from {len(full_ids)} to {len(ids)} tokens by --model-max-length {args.model_max_length}")
    if conversation.dropped_first_turn:
        notes.append("its first turn was not a user turn and was dropped (as the reference does)")
    body = render_labels(tokenizer, ids, labels, color)
    return "\n".join([header, *[f"note: {n}" for n in notes], "", body])
