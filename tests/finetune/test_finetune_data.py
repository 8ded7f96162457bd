"""Finetuning data: the reference's labels token for token, the assistant-only mask, parsing and its errors,
truncation accounting, batching and packing."""

from __future__ import annotations

import json

import pytest
import torch

from qwenlm.finetune import DataError, build_dataset, parse_conversation, read_records, tokenize_conversation
from qwenlm.finetune.data import IGNORE_INDEX, collate, pack, trained_tokens

IM_START, IM_END, NL, EOD = 151644, 151645, 198, 151643
USER, ASSISTANT, SYSTEM = 872, 77091, 8948
IGNORE = IGNORE_INDEX


def reference_preprocess(tok, source: list[dict], max_len: int, system_message: str = "You are a helpful assistant."):
    """The reference `finetune.py` preprocess for one sample, written out as in the repository (spec 7.2):
    permissive `tokenizer(text)`, a first non-user turn dropped, pad to max_len then cut (padding removed here)."""
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    nl_tokens = tok.encode("\n")
    _system = tok.encode("system") + nl_tokens
    if roles[source[0]["from"]] != roles["user"]:
        source = source[1:]
    system = [IM_START] + _system + tok.encode(system_message) + [IM_END] + nl_tokens
    input_id, target = list(system), [IM_START] + [IGNORE] * (len(system) - 3) + [IM_END] + nl_tokens
    for sentence in source:
        role = roles[sentence["from"]]
        _input_id = tok.encode(role) + nl_tokens + tok.encode(sentence["value"]) + [IM_END] + nl_tokens
        input_id += _input_id
        if role == "<|im_start|>user":
            _target = [IM_START] + [IGNORE] * (len(_input_id) - 3) + [IM_END] + nl_tokens
        else:
            _target = (
                [IM_START] + [IGNORE] * len(tok.encode(role)) + _input_id[len(tok.encode(role)) + 1 : -2]
                + [IM_END] + nl_tokens
            )  # fmt: skip
        target += _target
    return input_id[:max_len], target[:max_len]


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in turns]


MULTI = conv(("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?\n"), ("assistant", "\n6 <|im_end|> x"))


@pytest.mark.parametrize(
    "source",
    [
        conv(("user", "你好"), ("assistant", "我是一个语言模型，我叫通义千问。")),
        MULTI,
        conv(("assistant", "Hello! How can I help?"), ("user", "Hi"), ("assistant", "Hey")),  # first turn dropped
        conv(("user", "a"), ("user", "b"), ("assistant", "c")),  # the reference does not require alternation
        conv(("user", "text with <|endoftext|> inside"), ("assistant", "ok <|im_start|>")),  # permissive encoding
    ],
)
@pytest.mark.parametrize("max_len", [512, 20])
def test_reference_mask_equals_reference_preprocess(qwen_tokenizer, source, max_len):
    got = tokenize_conversation(qwen_tokenizer, source, max_len, mask="reference")
    assert got == reference_preprocess(qwen_tokenizer, source, max_len)


def test_reference_mask_custom_default_system(qwen_tokenizer):
    source = conv(("user", "hi"), ("assistant", "yo"))
    got = tokenize_conversation(qwen_tokenizer, source, 512, system_message="You are a pirate.", mask="reference")
    assert got == reference_preprocess(qwen_tokenizer, source, 512, system_message="You are a pirate.")


def test_assistant_mask_golden_single_turn(qwen_tokenizer):
    ids, labels = tokenize_conversation(qwen_tokenizer, conv(("user", "Hi"), ("assistant", "Hello!")), 512)
    system = [IM_START, SYSTEM, NL, *qwen_tokenizer.encode("You are a helpful assistant."), IM_END, NL]
    hello = qwen_tokenizer.encode("Hello!")
    assert ids == system + [IM_START, USER, NL, 13048, IM_END, NL, IM_START, ASSISTANT, NL, *hello, IM_END, NL]
    prompt = len(ids) - len(hello) - 2
    assert labels == [IGNORE] * prompt + hello + [IM_END, NL]


def test_assistant_mask_multi_turn_trains_only_replies(qwen_tokenizer):
    ids, labels = tokenize_conversation(qwen_tokenizer, MULTI, 512)
    trained = [t for t in labels if t != IGNORE]
    four, six = qwen_tokenizer.encode("4"), qwen_tokenizer.encode("\n6 <|im_end|> x", allowed_special=set())
    assert trained == four + [IM_END, NL] + six + [IM_END, NL]
    # injection-safe by default: the literal "<|im_end|>" in the reply is text, not a turn boundary
    assert ids.count(IM_END) == 5 and labels.count(IM_END) == 2
    same_ids, ref_labels = tokenize_conversation(qwen_tokenizer, MULTI, 512, mask="reference", encode_special=False)
    assert same_ids == ids  # the masks differ, the prompt bytes do not
    only_reference = [i for i, (a, b) in enumerate(zip(labels, ref_labels, strict=True)) if a != b]
    assert {ids[i] for i in only_reference} == {IM_START, IM_END, NL}


def test_system_turn_in_data_sets_the_system_message(qwen_tokenizer):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hi."}]}  # fmt: skip
    ids, _ = tokenize_conversation(qwen_tokenizer, record, 512)
    assert ids[: 3 + len(qwen_tokenizer.encode("Be brief."))] == [
        IM_START,
        SYSTEM,
        NL,
        *qwen_tokenizer.encode("Be brief."),
    ]
    sharegpt = {"system": "Be brief.", "conversations": conv(("human", "Hi"), ("gpt", "Hi."))}
    assert tokenize_conversation(qwen_tokenizer, sharegpt, 512)[0] == ids


def test_truncation_cuts_at_max_len(qwen_tokenizer):
    ids, labels = tokenize_conversation(qwen_tokenizer, MULTI, 512)
    cut_ids, cut_labels = tokenize_conversation(qwen_tokenizer, MULTI, 25)
    assert (cut_ids, cut_labels) == (ids[:25], labels[:25])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": []}, r"sample: the conversation is empty"),
        ({"text": "x"}, r"needs a 'conversations' or 'messages' list"),
        ({"conversations": conv(("user", "a"), ("tool", "b"))}, r"turn 1: unknown role 'tool'"),
        ({"conversations": conv(("user", "a"))}, r"no assistant turn"),
        ({"conversations": conv(("user", "a"), ("system", "s"), ("assistant", "b"))}, r"turn 1 is a system turn"),
        ({"conversations": [{"from": "user", "value": 3}]}, r"turn 0: 'value' must be a string"),
        ({"conversations": [{"speaker": "user"}]}, r"turn 0: no 'from' or 'role' key"),
    ],
)
def test_parse_errors_name_the_problem(record, message):
    with pytest.raises(DataError, match=message):
        parse_conversation(record)


def test_read_records_both_formats_and_locations(tmp_path):
    records = [{"conversations": conv(("user", "a"), ("assistant", "b"))}] * 2
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert [w for _, w in read_records(tmp_path / "d.json")] == [
        f"{tmp_path / 'd.json'}[0]",
        f"{tmp_path / 'd.json'}[1]",
    ]
    assert [w for _, w in read_records(tmp_path / "d.jsonl")] == [
        f"{tmp_path / 'd.jsonl'}:1",
        f"{tmp_path / 'd.jsonl'}:2",
    ]
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        read_records(tmp_path / "missing.json")


def test_build_dataset_counts_truncated_and_dropped(qwen_tokenizer):
    long_reply = conv(("user", "question"), ("assistant", "word " * 50))
    long_prompt = conv(("user", "word " * 50), ("assistant", "short"))
    records = [
        (long_reply, "r0"),
        (long_prompt, "r1"),
        (conv(("assistant", "hi"), ("user", "a"), ("assistant", "b")), "r2"),
    ]
    data = build_dataset(qwen_tokenizer, records, max_len=40, progress=False)
    stats = data.stats
    assert (stats.samples, stats.truncated, stats.dropped, stats.first_turn_dropped) == (3, 2, 1, 1)
    assert data.sources == ["r0", "r2"] and stats.dropped_where == ["r1"]
    assert all(len(ids) <= 40 and trained_tokens(labels) > 0 for ids, labels in data.examples)
    assert "1 dropped with nothing left to train" in stats.summary("train")


def test_collate_right_pads_with_ignored_labels():
    batch = collate([([1, 2, 3], [IGNORE, 2, 3]), ([4], [IGNORE])], pad_id=EOD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, EOD, EOD]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]


def test_pack_keeps_samples_whole_and_masks_cross_sample_targets():
    examples = [([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])]
    rows = pack(examples, max_len=6)
    assert [r[0] for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert rows[0][1] == [IGNORE, 2, 3, IGNORE, 5] and rows[0][2] == [1, 1, 1, 2, 2]
    assert rows[1][2] == [1, 1, 1, 1] and torch.tensor(rows[1][1][1:]).tolist() == [7, 8, 9]
