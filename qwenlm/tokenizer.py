"""The Qwen v1 tokenizer: byte-level BPE over `qwen.tiktoken`, special-token policy, streaming decode.

This module owns text <-> token ids for every other part of qwenlm (chat formatting, generation,
finetuning, eval, serving). It speaks enough of the Hugging Face tokenizer interface
(`tokenizer(texts, padding=True, return_tensors="pt")`, `decode`, `pad_token_id`, `save_pretrained`)
that code written against the reference `QWenTokenizer` keeps working.

    tok = QwenTokenizer.from_pretrained("path/to/Qwen-7B-Chat"); ids = tok.encode("你好")  # [108386]
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import logging
import operator
import os
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import tiktoken

from .files import read_json_object

logger = logging.getLogger(__name__)

# Same as cl100k_base except that `\p{N}` takes one digit at a time (cl100k takes 1-3).
PAT_STR = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions
        r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a word, with at most one leading non-letter (usually a space)
        r"\p{N}",  # a single digit
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation run
        r"\s*[\r\n]+",  # newlines
        r"\s+(?!\S)",  # whitespace not followed by a word (so " word" keeps its space)
        r"\s+",
    ]
)
VOCAB_FILE_NAME = "qwen.tiktoken"
CONFIG_FILE_NAME = "tokenizer_config.json"

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS: tuple[str, ...] = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IMSTART, IMEND, *EXTRAS)
# Fixed ids (not len(ranks)) so an extra vocabulary can never shift the specials.
SPECIAL_START_ID = 151643
SPECIAL_TOKEN_IDS: Mapping[str, int] = MappingProxyType(
    {surface: SPECIAL_START_ID + i for i, surface in enumerate(SPECIAL_TOKENS)}
)

Token: TypeAlias = bytes | str
AllowedSpecial: TypeAlias = Literal["all"] | Collection[str]
_NAMED_ROLES = ("pad", "eos", "bos", "unk")
# Keys of tokenizer_config.json that map onto constructor arguments; everything else is HF metadata.
_CONFIG_KEYS = ("errors", "padding_side", "model_max_length", *(f"{r}_token" for r in _NAMED_ROLES))


def load_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken vocabulary file (`<base64 bytes> <rank>` per line) into `{bytes: rank}`.

    Empty lines are skipped. Dict order is file order, so `save_vocabulary` can reproduce the file.

    Raises:
        FileNotFoundError: the file does not exist (it is a git-lfs object in model repos).
        ValueError: a line is not `<base64> <int>` (the message names the file and line number), or
            the file is an un-fetched git-lfs pointer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer vocabulary not found: {path}. The Qwen tokenizer needs the `{VOCAB_FILE_NAME}` "
            f"file that ships with every Qwen checkpoint (if you cloned a model repo, fetch it with "
            f"`git lfs pull`)."
        )
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1 and line.startswith(b"version https://git-lfs"):
                raise ValueError(f"{path} is a git-lfs pointer, not the vocabulary; run `git lfs pull`")
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as err:
                raise ValueError(
                    f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r} ({err})"
                ) from None
    return ranks


class BatchEncoding(dict):
    """The result of `QwenTokenizer.__call__`: a dict that also allows `enc.input_ids`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor value to `device` (lists and numpy arrays are left alone); returns self."""
        for key, value in self.items():
            if hasattr(value, "to") and callable(value.to):
                self[key] = value.to(device)
        return self


def _surface_of(value: Any) -> str | None:
    """Accept a plain string, an HF `AddedToken`-like object or its JSON dict form."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    if hasattr(value, "content"):
        return str(value.content)
    raise TypeError(f"expected a special-token string, got {type(value).__name__}")


def _named_token(role: str) -> property:
    """A validated `<role>_token` attribute (None or one of the 208 special surfaces)."""

    def fget(self: QwenTokenizer) -> str | None:
        return self._named[role]

    def fset(self: QwenTokenizer, value: Any) -> None:
        self._named[role] = self._check_special_surface(_surface_of(value), role)

    return property(fget, fset, doc=f"The {role} token surface, or None when unset (the default).")


def _named_token_id(role: str) -> property:
    """`<role>_token_id`, settable by id (reference finetune code does `pad_token_id = eod_id`)."""

    def fget(self: QwenTokenizer) -> int | None:
        surface = self._named[role]
        return None if surface is None else SPECIAL_TOKEN_IDS[surface]

    def fset(self: QwenTokenizer, value: int | None) -> None:
        if value is None:
            self._named[role] = None
            return
        token = self._id_to_token.get(operator.index(value))
        if not isinstance(token, str):
            raise ValueError(
                f"{role}_token_id must be a special token id "
                f"({SPECIAL_START_ID}..{SPECIAL_START_ID + len(SPECIAL_TOKENS) - 1}), got {value}"
            )
        self._named[role] = token

    return property(fget, fset, doc=f"The id of the {role} token, or None when unset.")


class QwenTokenizer:
    """Qwen v1 tokenizer over tiktoken, API-compatible with the reference `QWenTokenizer` where it matters.

    Args:
        vocab_file: path to `qwen.tiktoken`.
        errors: how invalid UTF-8 is handled when decoding (`"replace"` like the reference, or
            `"ignore"`, `"strict"`, ...).
        extra_vocab_file: optional extra tiktoken file; entries whose bytes already exist or whose
            id is already taken are skipped.
        pad_token, eos_token, bos_token, unk_token: optional; each must be one of the 208 special
            surfaces (e.g. `"<|endoftext|>"` or `"<|extra_0|>"`). None are set by default.
        padding_side: `"right"` or `"left"` (use left for batched generation).
        model_max_length: default length for `truncation=True` / `padding="max_length"`.
        **kwargs: accepted and ignored, because HF-style callers pass many options we have no use for.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        errors: str = "replace",
        extra_vocab_file: str | os.PathLike | None = None,
        *,
        pad_token: Any = None,
        eos_token: Any = None,
        bos_token: Any = None,
        unk_token: Any = None,
        padding_side: Literal["left", "right"] = "right",
        model_max_length: int = 8192,
        **kwargs: Any,
    ) -> None:
        # Validate the cheap settings before the (slow) vocabulary load.
        self._named: dict[str, str | None] = dict.fromkeys(_NAMED_ROLES)
        for role, value in zip(_NAMED_ROLES, (pad_token, eos_token, bos_token, unk_token), strict=True):
            setattr(self, f"{role}_token", value)
        self.padding_side = padding_side
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int | float) or model_max_length <= 0:
            raise ValueError(f"tokenizer model_max_length must be a positive integer, got {model_max_length!r}")
        self.model_max_length = int(model_max_length)
        self.errors = errors
        self.vocab_file = str(vocab_file)
        self._mergeable_ranks = load_tiktoken_bpe(vocab_file)
        if extra_vocab_file is not None:
            self._merge_extra_vocab(load_tiktoken_bpe(extra_vocab_file))
        self._build()

    def _merge_extra_vocab(self, extra: dict[bytes, int]) -> None:
        """Add extra-vocab entries in file order, skipping known bytes and taken ids (spec 3.6)."""
        taken = set(self._mergeable_ranks.values()) | set(SPECIAL_TOKEN_IDS.values())
        for token, rank in extra.items():
            if token in self._mergeable_ranks:
                logger.info("extra vocab: %r is already in the vocabulary, skipped", token)
            elif rank in taken:
                logger.info("extra vocab: id %d of %r is already taken, skipped", rank, token)
            else:
                self._mergeable_ranks[token] = rank
                taken.add(rank)

    def _build(self) -> None:
        """Derive the tiktoken encoding and the id lookup; called on init and after unpickling."""
        self._encoding = tiktoken.Encoding(
            name="Qwen",
            pat_str=PAT_STR,
            mergeable_ranks=self._mergeable_ranks,
            special_tokens=dict(SPECIAL_TOKEN_IDS),
        )
        self._id_to_token: dict[int, Token] = {rank: tok for tok, rank in self._mergeable_ranks.items()}
        self._id_to_token.update({rank: surface for surface, rank in SPECIAL_TOKEN_IDS.items()})

    # ----------------------------------------------------------------------------------------------
    # Construction from / saving to a checkpoint folder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> QwenTokenizer:
        """Load from a local checkpoint folder holding `qwen.tiktoken` (and maybe `tokenizer_config.json`).

        Settings from `tokenizer_config.json` (`model_max_length`, `errors`, `padding_side`, special
        tokens) are used unless overridden by `kwargs`. HF loader options such as
        `trust_remote_code`, `use_fast`, `revision` or `cache_dir` are accepted and ignored.

        Raises:
            FileNotFoundError: `path` is not a folder, or it has no `qwen.tiktoken`.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a local folder; QwenTokenizer.from_pretrained needs a checkpoint "
                f"folder that contains {VOCAB_FILE_NAME} (hub ids are not downloaded)."
            )
        vocab_file = kwargs.pop("vocab_file", None) or folder / VOCAB_FILE_NAME
        if not Path(vocab_file).is_file():
            raise FileNotFoundError(
                f"no {VOCAB_FILE_NAME} in {folder}: the Qwen tokenizer needs it (if the folder is a "
                f"git clone of a model repo, fetch the file with `git lfs pull`)."
            )
        settings: dict[str, Any] = {}
        config_file = folder / CONFIG_FILE_NAME
        if config_file.is_file():
            config = read_json_object(config_file, "tokenizer config")
            settings = {key: config[key] for key in _CONFIG_KEYS if config.get(key) is not None}
        settings.update(kwargs)
        return cls(vocab_file, **settings)

    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str]:
        """Write every regular token (extra vocab included) as `base64 rank` lines; specials are implicit."""
        name = f"{filename_prefix}-{VOCAB_FILE_NAME}" if filename_prefix else VOCAB_FILE_NAME
        out = Path(save_directory) / name
        with open(out, "wb") as f:
            for token, rank in self._mergeable_ranks.items():
                f.write(base64.b64encode(token) + b" " + str(rank).encode("ascii") + b"\n")
        return (str(out),)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write `qwen.tiktoken` and a `tokenizer_config.json` shaped like the released ones."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            "clean_up_tokenization_spaces": True,
            "model_max_length": self.model_max_length,
            "tokenizer_class": "QWenTokenizer",
        }
        if self.padding_side != "right":
            config["padding_side"] = self.padding_side
        if self.errors != "replace":
            config["errors"] = self.errors
        config.update({f"{role}_token": s for role, s in self._named.items() if s is not None})
        config_file = folder / CONFIG_FILE_NAME
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return (*self.save_vocabulary(folder), str(config_file))

    # ----------------------------------------------------------------------------------------------
    # Pickling: the tiktoken object holds a Rust core, so rebuild it instead of pickling it.

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_encoding"], state["_id_to_token"]
        state["_named"] = dict(self._named)  # copy.copy() must not share pad/eos settings
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build()

    # ----------------------------------------------------------------------------------------------
    # Vocabulary facts

    @property
    def eod_id(self) -> int:
        """`<|endoftext|>` (151643): end of document, and the usual eos/pad id in Qwen configs."""
        return SPECIAL_TOKEN_IDS[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return SPECIAL_TOKEN_IDS[IMSTART]

    @property
    def im_end_id(self) -> int:
        return SPECIAL_TOKEN_IDS[IMEND]

    pad_token = _named_token("pad")
    eos_token = _named_token("eos")
    bos_token = _named_token("bos")
    unk_token = _named_token("unk")
    pad_token_id = _named_token_id("pad")
    eos_token_id = _named_token_id("eos")
    bos_token_id = _named_token_id("bos")
    unk_token_id = _named_token_id("unk")

    @property
    def special_tokens(self) -> dict[str, int]:
        """All 208 special surfaces and their ids (a fresh copy)."""
        return dict(SPECIAL_TOKEN_IDS)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    @property
    def all_special_ids(self) -> list[int]:
        """Every special id (151643..151850): exactly what `skip_special_tokens` removes below 151851."""
        return list(SPECIAL_TOKEN_IDS.values())

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 (151851 for the released vocabulary), like the reference; the model pads further."""
        return self._encoding.n_vocab

    def __len__(self) -> int:
        return self._encoding.n_vocab

    @property
    def padding_side(self) -> Literal["left", "right"]:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        self._padding_side: Literal["left", "right"] = side  # type: ignore[assignment]

    def get_vocab(self) -> dict[bytes, int]:
        """The regular (mergeable) tokens only, `bytes -> id`, as the reference returns."""
        return dict(self._mergeable_ranks)

    def __repr__(self) -> str:
        return (
            f"QwenTokenizer(vocab_size={len(self)}, errors={self.errors!r}, "
            f"padding_side={self.padding_side!r}, pad_token={self.pad_token!r})"
        )

    # ----------------------------------------------------------------------------------------------
    # Special-token bookkeeping (the reference refuses to grow the vocabulary at runtime)

    def _check_special_surface(self, surface: str | None, role: str) -> str | None:
        if surface is not None and surface not in SPECIAL_TOKEN_IDS:
            raise ValueError(
                f"Adding unknown special tokens is not supported: {role}_token={surface!r}. Use one of "
                f"the built-in special tokens, e.g. '{ENDOFTEXT}' or '<|extra_0|>'."
            )
        return surface

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any]) -> int:
        """Set pad/eos/bos/unk to built-in special surfaces; returns 0 because nothing is ever added.

        Raises:
            ValueError: a surface is not one of the 208 built-in specials, or the key is unsupported.
        """
        for key, value in special_tokens_dict.items():
            if key == "additional_special_tokens":
                for surface in value:
                    self._check_special_surface(_surface_of(surface), "additional_special")
            elif key.endswith("_token") and key[: -len("_token")] in _NAMED_ROLES:
                setattr(self, key, value)
            else:
                raise ValueError(f"unsupported special token key {key!r}; use pad/eos/bos/unk_token")
        return 0

    def add_tokens(self, new_tokens: Any, special_tokens: bool = False) -> int:
        """Refuse regular tokens; accept built-in special surfaces as a no-op (returns 0)."""
        if isinstance(new_tokens, str) or not isinstance(new_tokens, Iterable):
            new_tokens = [new_tokens]
        for token in new_tokens:
            if not special_tokens:
                raise ValueError("Adding regular tokens is not supported")
            self._check_special_surface(_surface_of(token), "additional_special")
        return 0

    # ----------------------------------------------------------------------------------------------
    # Encoding

    def _encode_ids(self, text: str, allowed: AllowedSpecial, disallowed: AllowedSpecial) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = unicodedata.normalize("NFC", text)
        if allowed != "all":
            allowed = set(allowed)
        if disallowed != "all":
            disallowed = frozenset(disallowed)
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=disallowed)

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
        **kwargs: Any,
    ) -> list[int]:
        """NFC-normalise `text` and encode it to ids.

        Args:
            allowed_special: `"all"` (default) turns every special surface in the text into its id;
                a set allows only those; `set()` treats surfaces as plain text (use this for
                untrusted text to prevent special-token injection).
            disallowed_special: `()` (default) never raises; `"all"` raises on any surface that is
                not allowed; an explicit collection raises on those surfaces whenever they occur
                (tiktoken semantics, as the reference).
            **kwargs: ignored (HF's `add_special_tokens` etc.; Qwen adds no BOS/EOS).

        Raises:
            ValueError: disallowed special-token text occurs in `text`.
        """
        return self._encode_ids(text, allowed_special, disallowed_special)

    def tokenize(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
        **kwargs: Any,
    ) -> list[Token]:
        """Like `encode`, but return the tokens: regular ones as `bytes`, special ones as `str`."""
        return [self._id_to_token[i] for i in self._encode_ids(text, allowed_special, disallowed_special)]

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        return_tensors: Literal["pt", "np"] | None = None,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        max_length: int | None = None,
        truncation: bool | str = False,
        return_attention_mask: bool | None = True,
        return_token_type_ids: bool | None = True,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch, HF style, into `input_ids`, `token_type_ids` and `attention_mask`.

        A single string gives flat lists (or `[1, T]` tensors). `padding=True`/`"longest"` pads to the
        longest text, `"max_length"` to `max_length` (default `model_max_length`), with
        `pad_token_id` on `padding_side`. `truncation=True` keeps the *first* `max_length` tokens
        (right truncation, whatever the padding side). `add_special_tokens` is a no-op: Qwen adds none.

        Raises:
            ValueError: padding without a pad token, or ragged rows with `return_tensors` and no padding.
            TypeError: `text` is neither a string nor a sequence of strings.
        """
        if not isinstance(text, (str, Sequence)):
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        is_batch = not isinstance(text, str)
        texts = list(text) if is_batch else [text]
        rows = [self._encode_ids(t, allowed_special, disallowed_special) for t in texts]
        limit = max_length if max_length is not None else self.model_max_length
        if truncation not in (False, None, "do_not_truncate"):
            rows = [row[:limit] for row in rows]
        masks = [[1] * len(row) for row in rows]
        target = self._padding_target(padding, limit, rows)
        if target is not None:
            padded = [self._pad(row, mask, target) for row, mask in zip(rows, masks, strict=True)]
            rows, masks = [row for row, _ in padded], [mask for _, mask in padded]
        encoding = {"input_ids": rows}
        if return_token_type_ids is not False:
            encoding["token_type_ids"] = [[0] * len(row) for row in rows]
        if return_attention_mask is not False:
            encoding["attention_mask"] = masks
        if return_tensors is not None:
            return BatchEncoding({k: _to_tensor(v, return_tensors) for k, v in encoding.items()})
        return BatchEncoding({k: (v if is_batch else v[0]) for k, v in encoding.items()})

    def _padding_target(self, padding: Any, limit: int, rows: list[list[int]]) -> int | None:
        """The length to pad to, or None for no padding."""
        if padding in (False, None, "do_not_pad"):
            return None
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if self.pad_token_id is None:
            raise ValueError(
                "padding needs a pad token, and Qwen defines none: pass e.g. pad_token='<|extra_0|>' "
                f"(or pad_token='{ENDOFTEXT}') to QwenTokenizer / from_pretrained, "
                "or set tokenizer.pad_token."
            )
        return limit if padding == "max_length" else max((len(r) for r in rows), default=0)

    def _pad(self, row: list[int], mask: list[int], target: int) -> tuple[list[int], list[int]]:
        n = max(0, target - len(row))
        pads, zeros = [self.pad_token_id] * n, [0] * n
        return (pads + row, zeros + mask) if self.padding_side == "left" else (row + pads, mask + zeros)

    # ----------------------------------------------------------------------------------------------
    # Decoding

    def _ids_from(self, token_ids: Any) -> list[int]:
        """Turn an int / list / numpy array / torch tensor (0-d or 1-d) into validated ids."""
        if hasattr(token_ids, "tolist"):  # numpy arrays and torch tensors, 0-d included
            if getattr(token_ids, "ndim", 1) > 1:
                shape = tuple(token_ids.shape)
                raise ValueError(f"expected 0-d or 1-d token ids, got shape {shape}; use batch_decode")
            token_ids = token_ids.tolist()
        if not isinstance(token_ids, Iterable):
            token_ids = [token_ids]
        ids = [operator.index(i) for i in token_ids]
        for i in ids:
            if i not in self._id_to_token:
                raise ValueError(self._unknown_id_message(i))
        return ids

    def _unknown_id_message(self, bad_id: int) -> str:
        valid = sorted(self._id_to_token)
        ranges, start = [], valid[0]
        for prev, cur in zip(valid, valid[1:], strict=False):
            if cur != prev + 1:
                ranges.append(f"{start}..{prev}")
                start = cur
        ranges.append(f"{start}..{valid[-1]}")
        hint = ""
        if bad_id >= len(self):
            hint = " (models pad their embedding past the tokenizer vocabulary; those ids are not tokens)"
        return f"token id {bad_id} is not in the tokenizer vocabulary; valid ids: {', '.join(ranges)}{hint}"

    def _bytes_of(self, ids: list[int], skip_special_tokens: bool) -> bytes:
        if skip_special_tokens:  # QUIRK (reference): drops every id >= 151643, extra-vocab ids included
            ids = [i for i in ids if i < SPECIAL_START_ID]
        return self._encoding.decode_bytes(ids)

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Decode ids (int, list, 1-d numpy array or torch tensor) to text.

        Args:
            skip_special_tokens: drop every id >= 151643 first (reference behaviour, kept on purpose).
            errors: UTF-8 error handler for incomplete/invalid byte sequences; defaults to `self.errors`.
            **kwargs: ignored (e.g. `clean_up_tokenization_spaces`; no clean-up is ever applied).

        Raises:
            ValueError: an id is not in the vocabulary (negative, in the model's padded range, ...).
        """
        data = self._bytes_of(self._ids_from(token_ids), skip_special_tokens)
        return data.decode("utf-8", errors=errors or self.errors)

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        """`decode` each row of a list of lists or a 2-d array/tensor."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, **kwargs) for seq in sequences]

    def stream_decoder(self, skip_special_tokens: bool = False, errors: str | None = None) -> StreamingDecoder:
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamingDecoder(self, skip_special_tokens=skip_special_tokens, errors=errors)

    # ----------------------------------------------------------------------------------------------
    # Token <-> id conversions

    def convert_tokens_to_ids(self, tokens: Token | Iterable[Token]) -> int | None | list[int | None]:
        """Map tokens to ids; unknown tokens give None (like the reference's public override).

        A `str` that is not a special surface is looked up by its UTF-8 bytes (so `"user"` -> 872).
        """
        if isinstance(tokens, (str, bytes)):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: Token) -> int | None:
        if isinstance(token, str):
            if token in SPECIAL_TOKEN_IDS:
                return SPECIAL_TOKEN_IDS[token]
            token = token.encode("utf-8")
        return self._mergeable_ranks.get(token)

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Token | list[Token]:
        """Map ids to tokens (`bytes` or special `str`).

        Raises:
            ValueError: "unknown ids" for an id outside the vocabulary.
        """
        single = isinstance(ids, int) or getattr(ids, "ndim", 1) == 0
        try:
            id_list = self._ids_from(ids)
        except ValueError as err:
            raise ValueError(f"unknown ids: {err}") from None
        if single:
            return self._id_to_token[id_list[0]]
        return [self._id_to_token[i] for i in id_list if not (skip_special_tokens and i >= SPECIAL_START_ID)]

    def convert_tokens_to_string(self, tokens: Iterable[Token]) -> str:
        """Join tokens: runs of `bytes` are UTF-8 decoded with `self.errors`; `str` tokens are kept as is."""
        text, buffer = [], bytearray()
        for token in tokens:
            if isinstance(token, str):
                text.append(buffer.decode("utf-8", errors=self.errors))
                buffer.clear()
                text.append(token)
            else:
                buffer += token
        text.append(buffer.decode("utf-8", errors=self.errors))
        return "".join(text)


def _to_tensor(rows: list[list[int]], kind: str) -> Any:
    """Stack equal-length rows into a `[B, T]` int64 tensor/array."""
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"cannot make a tensor from texts of different token lengths {sorted(lengths)}; "
            "pass padding=True (with a pad token) or return_tensors=None"
        )
    width = lengths.pop() if lengths else 0
    if kind == "pt":
        import torch

        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), width)
    if kind == "np":
        import numpy as np

        return np.array(rows, dtype=np.int64).reshape(len(rows), width)
    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {kind!r}")


class StreamingDecoder:
    """Incremental detokenizer: feed ids as they are generated, get back only completed text.

    Bytes of every token (special surfaces included, unless skipped) go through one incremental
    UTF-8 decoder, so a character split across tokens is held back until it is complete, and the
    concatenation of all pieces (plus `finish()`) equals `tokenizer.decode(all_ids, ...)` exactly,
    invalid bytes included.

        dec = tok.stream_decoder(); pieces = [dec.add(i) for i in ids] + [dec.finish()]
    """

    def __init__(self, tokenizer: QwenTokenizer, skip_special_tokens: bool = False, errors: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.errors = errors or tokenizer.errors
        self._utf8 = codecs.getincrementaldecoder("utf-8")(self.errors)
        self.token_ids: list[int] = []
        self._pieces: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def add(self, token_ids: Any) -> str:
        """Feed one id or several; return the newly completed text (possibly "").

        Raises:
            ValueError: an id is outside the vocabulary (nothing is consumed in that case).
            RuntimeError: called after `finish()`.
        """
        if self._finished:
            raise RuntimeError("StreamingDecoder already finished; use tokenizer.stream_decoder()")
        ids = self.tokenizer._ids_from(token_ids)
        self.token_ids.extend(ids)
        piece = self._utf8.decode(self.tokenizer._bytes_of(ids, self.skip_special_tokens))
        self._pieces.append(piece)
        return piece

    def finish(self) -> str:
        """Flush held-back bytes (an incomplete trailing character becomes U+FFFD with "replace")."""
        if self._finished:
            return ""
        self._finished = True
        piece = self._utf8.decode(b"", final=True)
        self._pieces.append(piece)
        return piece
