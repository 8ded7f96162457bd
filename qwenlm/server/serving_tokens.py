"""The tokenizer over HTTP: `/tokenize`, `/detokenize` and `/tokenizer_info`, as remote clients expect them.

lm-evaluation-harness' remote tokenizer (`tokenizer_backend=remote`, also what it probes for by default)
reads `GET /tokenizer_info` (`eos_token` is required; `bos_token`, `pad_token`, `chat_template` are
used when present), encodes with `POST /tokenize {"prompt", "add_special_tokens": false}` -> `{"tokens"}`
and decodes with `POST /detokenize {"tokens"}` -> `{"prompt"}` (vLLM's shapes). With these it needs no
Hugging Face tokenizer, so nothing is downloaded and Qwen's `trust_remote_code` tokenizer is not needed.

    serving = ServingTokens(engine, ServedModel("qwen")); serving.tokenize(TokenizeRequest(prompt="hi"))
"""

from __future__ import annotations

from typing import Any

from ..chat_format import DEFAULT_SYSTEM
from ..engine.protocol import EngineClient
from ..tokenizer import ENDOFTEXT
from .protocol import APIError, DetokenizeRequest, TokenizeRequest
from .serving_chat import build_prompt
from .serving_engine import ServedModel

# Qwen's ChatML as a Jinja chat template (the shape Hugging Face tokenizers carry), for clients that render
# chats themselves (lm-eval's --apply_chat_template). It renders what `make_context` builds: the default
# system prompt when none is given, "developer" read as "system", and "<|im_start|>assistant\n" to answer.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] not in ('system', 'developer') -%}"
    "{{- '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + ('system' if message['role'] == 'developer' else message['role']) + '\n'"
    " + message['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


class ServingTokens:
    """Tokenizer routes over an EngineClient's tokenizer."""

    def __init__(self, engine: EngineClient, model: ServedModel) -> None:
        self.engine = engine
        self.model = model
        self.tokenizer: Any = engine.tokenizer

    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a raw prompt (special-token text is the special token, as in a completion prompt),
        or of chat messages rendered exactly as a chat request would be. Qwen adds no BOS, so
        `add_special_tokens` changes nothing."""
        self.model.check(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("Invalid request: send exactly one of 'prompt' or 'messages'.")
        if request.prompt is not None:
            ids = self.tokenizer.encode(request.prompt)
        else:
            ids = build_prompt(self.engine, request).token_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        self.model.check(request.model)
        try:
            return {"prompt": self.tokenizer.decode(request.tokens)}
        except ValueError as err:
            raise APIError(f"Invalid request: {err}", param="tokens") from None

    def tokenizer_info(self) -> dict[str, Any]:
        """What a remote-tokenizer client needs to know. Qwen v1 names no special tokens of its own; its
        documents end with <|endoftext|>, which is also the generation eos, so that is the eos token."""
        tok = self.tokenizer
        return {
            "tokenizer_class": "QWenTokenizer",
            "eos_token": getattr(tok, "eos_token", None) or ENDOFTEXT,
            "bos_token": getattr(tok, "bos_token", None),
            "pad_token": getattr(tok, "pad_token", None),
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": self.engine.max_model_len,
            "vocab_size": len(tok),
        }
