"""`QWenTokenizer` for transformers' AutoTokenizer: qwenlm's tiktoken tokenizer and ChatML behind the
interface vLLM's "hf" tokenizer mode uses, so `vllm serve PATH` needs neither `--trust-remote-code` nor
`--chat-template`.

Every text <-> ids step is delegated to `qwenlm.tokenizer.QwenTokenizer` and every chat prompt to
`qwenlm.chat_format.render_messages` (the ids `model.chat` builds, user text never turned into control
tokens, history cut by the checkpoint's `max_window_size`). The class carries the name the checkpoints'
`tokenizer_config.json` asks for, and ChatML checkpoints get `<|im_end|>` as their eos token, so a chat
reply stops where Qwen's does.

    AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer)   # done by register()
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PythonBackend

from ...chat_format import DEFAULT_SYSTEM, render_messages
from ...model.config import GenerationConfig
from ...tokenizer import IMEND, SPECIAL_TOKEN_IDS, SPECIAL_TOKENS, VOCAB_FILE_NAME, QwenTokenizer

# The same layout as chat_format.make_context for what it renders (system block, turns, open assistant
# turn); used only where vLLM or a caller renders templates itself, and for conversations make_context
# does not cover (a final assistant message to continue).
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n' + " + json.dumps(DEFAULT_SYSTEM) + " + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not loop.first or message['role'] != 'system' -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)  # no namespace attribute assignments: vLLM's template inspector cannot parse them


class QWenTokenizer(PythonBackend):
    """A transformers tokenizer over `qwenlm.tokenizer.QwenTokenizer` (ids, tokens and text all identical)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", extra_vocab_file: str | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        self.qwen = QwenTokenizer(vocab_file, errors=errors, extra_vocab_file=extra_vocab_file)
        folder = Path(vocab_file).parent
        self.generation_config = _generation_config(folder)
        if self.generation_config.chat_format == "chatml":
            kwargs.setdefault("eos_token", IMEND)
        kwargs.setdefault("chat_template", CHATML_TEMPLATE)
        kwargs.pop("auto_map", None)
        super().__init__(errors=errors, **kwargs)

    # ---- vocabulary ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.qwen)

    def __len__(self) -> int:
        return len(self.qwen)

    def get_vocab(self) -> dict[bytes | str, int]:
        """Regular tokens as bytes (as the reference), special ones as their surfaces."""
        return {**self.qwen.get_vocab(), **SPECIAL_TOKEN_IDS}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    @property
    def all_special_ids(self) -> list[int]:
        return self.qwen.all_special_ids

    def _add_tokens(self, new_tokens: list, special_tokens: bool = False) -> int:
        """Qwen's vocabulary is fixed (as in the reference): known special surfaces are fine, anything else is not."""
        unknown = [str(t) for t in new_tokens if str(t) not in SPECIAL_TOKEN_IDS]
        if unknown:
            raise ValueError(f"the Qwen vocabulary is fixed; cannot add tokens {unknown}")
        return 0

    # ---- text <-> ids --------------------------------------------------------------------------
    def tokenize(self, text: str, **kwargs: Any) -> list[bytes | str]:
        return self.qwen.tokenize(text, kwargs.get("allowed_special", "all"), kwargs.get("disallowed_special", ()))

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        return self.qwen.convert_tokens_to_ids(tokens)

    def _convert_token_to_id_with_added_voc(self, token: bytes | str) -> int | None:
        return self.qwen.convert_tokens_to_ids(token)

    def _convert_token_to_id(self, token: bytes | str) -> int | None:
        return self.qwen.convert_tokens_to_ids(token)

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Any:
        return self.qwen.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def _convert_id_to_token(self, index: int) -> bytes | str:
        return self.qwen.convert_ids_to_tokens(index)

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        return self.qwen.convert_tokens_to_string(tokens)

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, errors: str | None = None,
                **kwargs: Any) -> str:  # fmt: skip
        return self.qwen.decode(token_ids, skip_special_tokens=skip_special_tokens, errors=errors)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return self.qwen.save_vocabulary(save_directory, filename_prefix)

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[dict] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: Any = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: Any = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A conversation that ends with a user turn and asks for the reply renders exactly as `model.chat`
        does (qwenlm.chat_format); other shapes go through the ChatML template. Tools need Qwen's ReAct
        prompt and reply parsing, which `qwenlm serve --backend vllm` provides; plain vLLM does not."""
        if tools:
            raise ValueError(
                "Qwen v1 calls functions through its ReAct prompt, which vLLM's chat endpoint does not build; "
                "serve the model with `qwenlm serve --backend vllm` for `tools` / `functions`"
            )
        plain = (
            add_generation_prompt
            and not continue_final_message
            and chat_template in (None, CHATML_TEMPLATE)
            and isinstance(conversation, list)
            and conversation
            and isinstance(conversation[-1], dict)
            and conversation[-1].get("role") == "user"
            and not (padding or truncation or return_tensors or return_assistant_tokens_mask)
        )
        if not plain:
            return super().apply_chat_template(
                conversation, tools=tools, documents=documents, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tokenize=tokenize, padding=padding, truncation=truncation, max_length=max_length,
                return_tensors=return_tensors, return_dict=return_dict,
                return_assistant_tokens_mask=return_assistant_tokens_mask, tokenizer_kwargs=tokenizer_kwargs,
                **kwargs,
            )  # fmt: skip
        messages = [{"role": m["role"], "content": m.get("content") or ""} for m in conversation]
        text, ids = render_messages(self.qwen, messages, max_window_size=self.generation_config.max_window_size)
        if not tokenize:
            return text
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids


def _generation_config(folder: Path) -> GenerationConfig:
    """The checkpoint's generation config (chat format, max_window_size), or the defaults without one."""
    file = folder / "generation_config.json"
    return GenerationConfig.from_pretrained(file) if os.path.isfile(file) else GenerationConfig()
