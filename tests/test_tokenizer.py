"""Tests for qwenlm.tokenizer against the real qwen.tiktoken: golden ids, special-token policy, decoding,
the streaming decoder, HF-style batching, and save/load round trips."""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenlm.assets import QWEN_TIKTOKEN_SHA256
from qwenlm.tokenizer import (
    ENDOFTEXT,
    EXTRAS,
    IMEND,
    IMSTART,
    PAT_STR,
    SPECIAL_START_ID,
    SPECIAL_TOKENS,
    BatchEncoding,
    QwenTokenizer,
    load_tiktoken_bpe,
)

N_VOCAB = 151851
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

# Ids for random streams: single bytes (so incomplete UTF-8 is common), any regular token, any special.
any_valid_id = st.one_of(
    st.integers(0, 255),
    st.integers(0, SPECIAL_START_ID - 1),
    st.integers(SPECIAL_START_ID, N_VOCAB - 1),
)


@pytest.fixture(scope="module")
def left_padded_tokenizer(tiktoken_file) -> QwenTokenizer:
    return QwenTokenizer(str(tiktoken_file), pad_token="<|extra_0|>", padding_side="left")


def _stream(tokenizer: QwenTokenizer, chunks: list[list[int]], **kwargs) -> list[str]:
    decoder = tokenizer.stream_decoder(**kwargs)
    return [decoder.add(chunk) for chunk in chunks] + [decoder.finish()]


# --------------------------------------------------------------------------------------------------
# Constants and vocabulary


def test_pat_str_is_the_spec_regex():
    spec = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    assert PAT_STR == spec


def test_special_tokens_have_fixed_ids(qwen_tokenizer):
    assert len(SPECIAL_TOKENS) == 208 and len(EXTRAS) == 205
    assert EXTRAS[0] == "<|extra_0|>" and EXTRAS[-1] == "<|extra_204|>"
    specials = qwen_tokenizer.special_tokens
    assert specials[ENDOFTEXT] == 151643 == qwen_tokenizer.eod_id
    assert specials[IMSTART] == 151644 == qwen_tokenizer.im_start_id
    assert specials[IMEND] == 151645 == qwen_tokenizer.im_end_id
    assert specials["<|extra_0|>"] == 151646 and specials["<|extra_204|>"] == 151850
    assert sorted(specials.values()) == list(range(151643, 151851))
    for surface, token_id in specials.items():
        assert qwen_tokenizer.encode(surface) == [token_id]
        assert qwen_tokenizer.decode([token_id]) == surface
    assert qwen_tokenizer.all_special_ids == list(range(151643, 151851))


def test_vocab_size_and_len(qwen_tokenizer):
    assert len(qwen_tokenizer) == qwen_tokenizer.vocab_size == N_VOCAB
    vocab = qwen_tokenizer.get_vocab()
    assert len(vocab) == 151643 and all(isinstance(k, bytes) for k in vocab)
    assert vocab[b"\n"] == 198 and vocab[b" "] == 220 and vocab[b"!"] == 0


def test_named_special_tokens_unset_by_default(qwen_tokenizer):
    for role in ("pad", "eos", "bos", "unk"):
        assert getattr(qwen_tokenizer, f"{role}_token") is None
        assert getattr(qwen_tokenizer, f"{role}_token_id") is None
    assert qwen_tokenizer.padding_side == "right" and qwen_tokenizer.model_max_length == 8192


# --------------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize(
    "text, ids",
    [
        ("你好", [108386]),
        ("Hello, world!", [9707, 11, 1879, 0]),
        ("12345", [16, 17, 18, 19, 20]),
        ("\n", [198]),
        ("\n\n", [271]),
        (":\n", [510]),
        ("user", [872]),
        ("assistant", [77091]),
        ("system", [8948]),
        ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
        ("Observation:", [37763, 367, 25]),
        ("Observation:\n", [37763, 367, 510]),
        ("Human:", [33975, 25]),
        (" A", [362]),
        ("Panda", [47, 9817]),
        (" Panda", [72410]),
    ],
)
def test_encode_known_ids(qwen_tokenizer, text, ids):
    assert qwen_tokenizer.encode(text) == ids
    assert qwen_tokenizer.decode(ids) == text


def test_encode_special_surface_parsed_by_default_and_plain_with_empty_allowed(qwen_tokenizer):
    text = 'print("<|endoftext|>")'
    assert qwen_tokenizer.encode(text) == [1350, 445, 151643, 899]
    assert qwen_tokenizer.encode(text, allowed_special=set()) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    # Only the allowed surfaces become special ids.
    mixed = qwen_tokenizer.encode("<|im_start|><|endoftext|>", allowed_special={IMSTART})
    assert mixed[0] == 151644 and all(i < SPECIAL_START_ID for i in mixed[1:])


def test_encode_disallowed_special_raises(qwen_tokenizer):
    with pytest.raises(ValueError, match="endoftext"):
        qwen_tokenizer.encode("hi <|endoftext|>", allowed_special=set(), disallowed_special="all")
    with pytest.raises(ValueError, match="im_end"):
        qwen_tokenizer.encode("x<|im_end|>", disallowed_special=[IMEND])
    # "all" means all that are not allowed: an allowed surface passes.
    ids = qwen_tokenizer.encode("a<|im_end|>", allowed_special={IMEND}, disallowed_special="all")
    assert ids[-1] == 151645
    assert qwen_tokenizer.encode("plain text", disallowed_special="all") == [20772, 1467]


def test_encode_applies_nfc(qwen_tokenizer):
    assert qwen_tokenizer.encode("e\u0301") == qwen_tokenizer.encode("\u00e9")
    assert qwen_tokenizer.decode(qwen_tokenizer.encode("caf" + "e\u0301")) == "caf\u00e9"


def test_tokenize_returns_bytes_and_special_str(qwen_tokenizer):
    tokens = qwen_tokenizer.tokenize("你好<|im_end|>\n")
    assert tokens == ["你好".encode(), IMEND, b"\n"]
    plain = qwen_tokenizer.tokenize(IMEND, allowed_special=set())
    assert len(plain) > 1 and all(isinstance(t, bytes) for t in plain) and b"".join(plain) == IMEND.encode()


@PROPERTY_SETTINGS
@given(st.text())
def test_decode_encode_roundtrip_property(qwen_tokenizer, text):
    assert qwen_tokenizer.decode(qwen_tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


@PROPERTY_SETTINGS
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIAL_TOKENS)), max_size=8))
def test_encode_untrusted_special_surfaces_never_special_property(qwen_tokenizer, parts):
    text = "".join(parts)
    ids = qwen_tokenizer.encode(text, allowed_special=set())
    assert all(i < SPECIAL_START_ID for i in ids)
    assert qwen_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


# --------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("bad_id", [151851, 151935, -1, 10**6])
def test_decode_out_of_vocabulary_raises(qwen_tokenizer, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} .*0..151850"):
        qwen_tokenizer.decode([9707, bad_id])
    with pytest.raises(ValueError, match=str(bad_id)):
        qwen_tokenizer.stream_decoder().add(bad_id)


def test_decode_accepts_int_list_numpy_and_tensor(qwen_tokenizer):
    ids = [9707, 11, 1879, 0]
    assert qwen_tokenizer.decode(ids) == "Hello, world!"
    assert qwen_tokenizer.decode(np.array(ids)) == "Hello, world!"
    assert qwen_tokenizer.decode(torch.tensor(ids)) == "Hello, world!"
    assert qwen_tokenizer.decode(9707) == "Hello"
    assert qwen_tokenizer.decode(torch.tensor(9707)) == "Hello"
    assert qwen_tokenizer.decode(np.int64(0)) == "!"
    with pytest.raises(ValueError, match="batch_decode"):
        qwen_tokenizer.decode(torch.tensor([ids]))
    with pytest.raises(TypeError):
        qwen_tokenizer.decode([1.5])
    assert qwen_tokenizer.batch_decode(torch.tensor([ids, ids])) == ["Hello, world!"] * 2


def test_decode_skip_special_tokens_drops_all_special_ids(qwen_tokenizer):
    ids = [151644, 872, 198, 108386, 151645, 151646, 151643]
    assert qwen_tokenizer.decode(ids) == "<|im_start|>user\n你好<|im_end|><|extra_0|><|endoftext|>"
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == "user\n你好"


def test_decode_incomplete_utf8_follows_errors(qwen_tokenizer):
    assert qwen_tokenizer.decode([51461]) == " \ufffd"
    assert qwen_tokenizer.decode([51461], errors="ignore") == " "
    assert qwen_tokenizer.decode([51461, 117]) == " 根"
    with pytest.raises(UnicodeDecodeError):
        qwen_tokenizer.decode([51461], errors="strict")


def test_convert_tokens_to_ids_unknown_is_none(qwen_tokenizer):
    assert qwen_tokenizer.convert_tokens_to_ids(b"Hello") == 9707
    assert qwen_tokenizer.convert_tokens_to_ids(ENDOFTEXT) == 151643
    assert qwen_tokenizer.convert_tokens_to_ids("user") == 872
    assert qwen_tokenizer.convert_tokens_to_ids(b"\xff\xfe definitely not a token") is None
    assert qwen_tokenizer.convert_tokens_to_ids("<|extra_205|>") is None
    assert qwen_tokenizer.convert_tokens_to_ids([b"Hello", IMEND, b"nope nope nope"]) == [9707, 151645, None]


def test_convert_ids_to_tokens_unknown_raises(qwen_tokenizer):
    assert qwen_tokenizer.convert_ids_to_tokens(9707) == b"Hello"
    assert qwen_tokenizer.convert_ids_to_tokens([9707, 151645]) == [b"Hello", IMEND]
    with pytest.raises(ValueError, match="unknown ids"):
        qwen_tokenizer.convert_ids_to_tokens([151851])


def test_convert_tokens_to_string_flushes_at_specials(qwen_tokenizer):
    tokens = [b" \xe6\xa0", b"\xb9", IMEND, b"\xe6"]
    assert qwen_tokenizer.convert_tokens_to_string(tokens) == " 根<|im_end|>\ufffd"
    tokens = qwen_tokenizer.tokenize("a<|im_start|>b")
    assert qwen_tokenizer.convert_tokens_to_string(tokens) == "a<|im_start|>b"


# --------------------------------------------------------------------------------------------------
# Streaming decoder


def test_stream_decoder_holds_back_split_character(qwen_tokenizer):
    decoder = qwen_tokenizer.stream_decoder()
    assert decoder.add(51461) == " "  # b" \xe6\xa0": the CJK lead bytes wait
    assert decoder.add(117) == "根"
    assert decoder.add([151645, 198]) == "<|im_end|>\n"
    assert decoder.finish() == ""
    assert decoder.text == " 根<|im_end|>\n" and decoder.token_ids == [51461, 117, 151645, 198]


def test_stream_decoder_finish_flushes_incomplete_tail(qwen_tokenizer):
    decoder = qwen_tokenizer.stream_decoder()
    assert decoder.add(51461) == " "
    assert decoder.finish() == "\ufffd"
    assert decoder.finish() == ""
    with pytest.raises(RuntimeError):
        decoder.add(9707)


def test_stream_decoder_rejects_invalid_ids_without_consuming(qwen_tokenizer):
    decoder = qwen_tokenizer.stream_decoder()
    with pytest.raises(ValueError, match="151900"):
        decoder.add([9707, 151900])
    assert decoder.token_ids == [] and decoder.add(9707) == "Hello"


@PROPERTY_SETTINGS
@given(
    chunks=st.lists(st.lists(any_valid_id, max_size=4), max_size=16),
    skip_special_tokens=st.booleans(),
    errors=st.sampled_from(["replace", "ignore", "backslashreplace"]),
)
def test_stream_decoder_matches_decode_property(qwen_tokenizer, chunks, skip_special_tokens, errors):
    ids = [i for chunk in chunks for i in chunk]
    pieces = _stream(qwen_tokenizer, chunks, skip_special_tokens=skip_special_tokens, errors=errors)
    expected = qwen_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, errors=errors)
    assert "".join(pieces) == expected
    for piece in pieces:
        assert piece.encode("utf-8").decode("utf-8") == piece  # no lone surrogates, no partial chars


@PROPERTY_SETTINGS
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd")))
def test_stream_decoder_valid_text_never_emits_replacement_property(qwen_tokenizer, text):
    ids = qwen_tokenizer.encode(text, allowed_special=set())
    pieces = _stream(qwen_tokenizer, [[i] for i in ids])
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == unicodedata.normalize("NFC", text)


# --------------------------------------------------------------------------------------------------
# HF-style __call__


def test_call_single_string_returns_flat_lists_or_1xT_tensors(qwen_tokenizer):
    enc = qwen_tokenizer("Hello, world!")
    assert isinstance(enc, BatchEncoding)
    assert enc.input_ids == [9707, 11, 1879, 0]
    assert enc["token_type_ids"] == [0, 0, 0, 0] and enc.attention_mask == [1, 1, 1, 1]
    pt = qwen_tokenizer("Hello, world!", return_tensors="pt")
    assert pt.input_ids.shape == (1, 4) and pt.input_ids.dtype == torch.long
    assert pt.input_ids.tolist() == [[9707, 11, 1879, 0]]
    assert pt.to("cpu") is pt and pt.attention_mask.device.type == "cpu"
    npy = qwen_tokenizer("你好", return_tensors="np", return_token_type_ids=False)
    assert npy["input_ids"].tolist() == [[108386]] and "token_type_ids" not in npy
    with pytest.raises(AttributeError):
        _ = enc.missing_key


def test_call_batch_left_padding(left_padded_tokenizer):
    tok = left_padded_tokenizer
    assert tok.pad_token_id == 151646
    enc = tok(["Hello, world!", "你好"], padding=True, return_tensors="pt")
    assert enc.input_ids.tolist() == [[9707, 11, 1879, 0], [151646, 151646, 151646, 108386]]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
    assert enc.token_type_ids.tolist() == [[0] * 4] * 2


def test_call_max_length_padding_and_truncation(left_padded_tokenizer):
    tok = left_padded_tokenizer
    enc = tok(["12345", "1"], padding="max_length", max_length=3, truncation=True)
    assert enc.input_ids == [[16, 17, 18], [151646, 151646, 16]]  # right truncation: first tokens kept
    assert enc.attention_mask == [[1, 1, 1], [0, 0, 1]]


def test_call_padding_without_pad_token_raises(qwen_tokenizer):
    with pytest.raises(ValueError, match=r"pad_token='<\|extra_0\|>'"):
        qwen_tokenizer(["a", "bb bb"], padding=True)


def test_call_ragged_batch_to_tensor_raises(qwen_tokenizer):
    assert qwen_tokenizer(["a", "12345"]).input_ids == [[64], [16, 17, 18, 19, 20]]
    with pytest.raises(ValueError, match="padding=True"):
        qwen_tokenizer(["a", "12345"], return_tensors="pt")


def test_special_token_setting_only_accepts_known_surfaces(tiktoken_file):
    with pytest.raises(ValueError, match="Adding unknown special tokens is not supported"):
        QwenTokenizer(str(tiktoken_file), pad_token="<pad>")
    tok = QwenTokenizer(str(tiktoken_file), trust_remote_code=True, use_fast=False)  # ignored kwargs
    assert tok.add_special_tokens({"pad_token": ENDOFTEXT}) == 0
    assert tok.pad_token == ENDOFTEXT and tok.pad_token_id == 151643
    tok.eos_token_id = tok.im_end_id
    assert tok.eos_token == IMEND
    with pytest.raises(ValueError, match="Adding unknown special tokens"):
        tok.add_special_tokens({"bos_token": "<s>"})
    with pytest.raises(ValueError, match="Adding regular tokens is not supported"):
        tok.add_tokens(["hello"])
    with pytest.raises(ValueError, match="special token id"):
        tok.pad_token_id = 9707


# --------------------------------------------------------------------------------------------------
# Files: loading, saving, pickling, extra vocabulary


def test_load_tiktoken_bpe_missing_and_malformed(tmp_path):
    missing = tmp_path / "nowhere" / "qwen.tiktoken"
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*qwen\.tiktoken.*git lfs"):
        load_tiktoken_bpe(missing)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\n\nIg== 1\nnot-a-valid-line\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:4"):
        load_tiktoken_bpe(bad)
    bad.write_text("IQ== 0\n\nIg== 1\n")
    assert load_tiktoken_bpe(bad) == {b"!": 0, b'"': 1}


def test_save_vocabulary_is_byte_identical(qwen_tokenizer, tmp_path):
    (path,) = qwen_tokenizer.save_vocabulary(tmp_path)
    assert path == str(tmp_path / "qwen.tiktoken")
    assert hashlib.sha256((tmp_path / "qwen.tiktoken").read_bytes()).hexdigest() == QWEN_TIKTOKEN_SHA256
    (prefixed,) = qwen_tokenizer.save_vocabulary(tmp_path, filename_prefix="v2")
    assert prefixed.endswith("v2-qwen.tiktoken")


def test_from_pretrained_reads_config_and_kwargs_win(qwen_tokenizer, tmp_path):
    qwen_tokenizer.save_vocabulary(tmp_path)
    config = {
        "model_max_length": 2048,
        "padding_side": "left",
        "errors": "ignore",
        "tokenizer_class": "QWenTokenizer",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = QwenTokenizer.from_pretrained(
        tmp_path, pad_token=ENDOFTEXT, padding_side="right", trust_remote_code=True, revision="main"
    )
    assert tok.model_max_length == 2048 and tok.errors == "ignore"
    assert tok.padding_side == "right" and tok.pad_token_id == 151643
    assert tok.decode([51461]) == " "  # errors="ignore" came from the config


def test_from_pretrained_without_vocab_raises(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"(?s)qwen\.tiktoken.*{tmp_path.name}"):
        QwenTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        QwenTokenizer.from_pretrained("Qwen/Qwen-7B-Chat-does-not-exist-here")


def test_save_pretrained_round_trip(left_padded_tokenizer, tmp_path):
    files = left_padded_tokenizer.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["qwen.tiktoken", "tokenizer_config.json"]
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "QWenTokenizer" and config["model_max_length"] == 8192
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_qwen.QWenTokenizer"
    assert config["pad_token"] == "<|extra_0|>" and config["padding_side"] == "left"
    reloaded = QwenTokenizer.from_pretrained(tmp_path / "ckpt")
    assert reloaded.pad_token_id == 151646 and reloaded.padding_side == "left"
    assert reloaded.encode("Hello, world!") == [9707, 11, 1879, 0]


def test_pickle_round_trip(left_padded_tokenizer):
    clone = pickle.loads(pickle.dumps(left_padded_tokenizer))
    assert clone.encode("你好<|im_end|>") == [108386, 151645]
    assert clone.pad_token_id == 151646 and clone.padding_side == "left" and len(clone) == N_VOCAB
    clone.pad_token = None
    assert left_padded_tokenizer.pad_token == "<|extra_0|>"  # the clone owns its settings


def test_extra_vocab_merges_new_entries_and_skips_known(tiktoken_file, tmp_path):
    words = ["一只猫", "只猫", "是一只猫", "我是一只猫", "你是一只猫", "他是一只猫"]  # spec 3.6 example
    entries = [(w.encode(), 151851 + i) for i, w in enumerate(words)]
    entries += [
        (b"Hello", 151857),  # bytes already in the vocabulary: skipped
        ("猫猫猫猫".encode(), 151643),  # id taken by <|endoftext|>: skipped
        ("猫猫猫猫猫".encode(), 100),  # id taken by a regular token: skipped
    ]
    extra_file = tmp_path / "extra.tiktoken"
    extra_file.write_text("".join(f"{base64.b64encode(b).decode()} {rank}\n" for b, rank in entries))

    tok = QwenTokenizer(str(tiktoken_file), extra_vocab_file=str(extra_file))
    assert len(tok) == tok.vocab_size == 151857
    assert tok.encode("我是一只猫") == [151854]
    assert tok.decode([151854, 151851]) == "我是一只猫一只猫"
    assert tok.decode([151854], skip_special_tokens=True) == ""  # QUIRK kept: ids >= 151643 dropped
    assert tok.convert_ids_to_tokens(100) == b"\xa7"  # the regular token keeps its id
    assert tok.convert_tokens_to_ids("猫猫猫猫".encode()) is None
    with pytest.raises(ValueError, match="151857"):
        tok.decode([151857])
    (saved,) = tok.save_vocabulary(tmp_path)
    assert len(load_tiktoken_bpe(saved)) == 151643 + 6
