"""The OpenAI wire format: request and response schemas, the error object, and request -> SamplingParams.

Requests are validated here (types, ranges, unsupported options) so the serving code only sees
well-formed values; responses serialise to the exact shape the OpenAI API returns, so any OpenAI
client, SDK or agent framework can parse them.

    params = to_sampling_params(request, prompt_tokens=len(ids), max_model_len=engine.max_model_len)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from ..generation.params import GREEDY_TEMPERATURE, MAX_LOGIT_BIAS, SamplingParams
from ..tokenizer import ENDOFTEXT, IMEND, IMSTART, SPECIAL_TOKEN_IDS, SPECIAL_TOKENS

# Tokens that always end a reply, whatever the client sends: <|endoftext|> is the eos token and
# <|im_end|> / <|im_start|> close the assistant turn of ChatML. A client's `stop` adds to these.
EOS_TOKEN_ID = SPECIAL_TOKEN_IDS[ENDOFTEXT]
ALWAYS_STOP_WORDS_IDS: tuple[tuple[int, ...], ...] = ((SPECIAL_TOKEN_IDS[IMEND],), (SPECIAL_TOKEN_IDS[IMSTART],))

# max_tokens when the client sends none and the checkpoint's generation_config sets no max_new_tokens.
DEFAULT_MAX_TOKENS = 2048
MAX_N = 16  # choices per request: each one is a full engine request
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit for top_logprobs)
MAX_LOGIT_BIAS_TOKENS = 1024
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes (a signed 64-bit int)
QWEN_TOKENIZER_VOCAB = SPECIAL_TOKEN_IDS[ENDOFTEXT] + len(SPECIAL_TOKENS)  # 151851 ids that have text


# --------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered as an OpenAI error object: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --------------------------------------------------------------------------------------------------
# Shared request pieces


class _Request(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI-compatible servers usually do: SDKs add
    # new optional fields often, and rejecting them would break clients for nothing.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False


class FunctionDefinition(_Request):
    name: str | None = None  # None is fine when Qwen's `name_for_model` is given (checked by the prompt builder)
    description: str | None = None
    parameters: dict[str, Any] | list[Any] | None = None


class ToolDefinition(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Request):
    """One part of a multi-part message content; only text parts are supported (no vision)."""

    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _only_text(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported; only 'text' parts are")
        return value


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # developer = system
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        """Empty messages are client bugs: a user turn needs text, an assistant turn text or a call."""
        if isinstance(self.content, list):
            empty = not any(part.text for part in self.content)
        else:
            empty = not self.content
        if self.role == "user" and empty:
            raise ValueError("a user message needs non-empty content")
        if self.role == "assistant" and empty and not (self.tool_calls or self.function_call):
            raise ValueError("an assistant message needs content, tool_calls or function_call")
        if self.role in ("tool", "function") and self.content is None:
            raise ValueError(f"a {self.role} message needs content (the result of the call)")
        return self


def _check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    """OpenAI's shape: token ids (as JSON object keys, so strings) -> bias in [-100, 100]."""
    if not value:
        return value
    if len(value) > MAX_LOGIT_BIAS_TOKENS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens can be biased, got {len(value)}")
    for key, bias in value.items():
        if not key.strip().isdigit():
            raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(f"bias for token {key} must be between -100 and 100, got {bias}")
    return value


def _check_stop(value: str | list[str] | None) -> str | list[str] | None:
    strings = [value] if isinstance(value, str) else value or []
    if any(s == "" for s in strings):
        raise ValueError("stop strings must be non-empty")
    if len(strings) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(strings)}")
    return value


class StructuredOutputsParams(_Request):
    """vLLM's `structured_outputs` (and its older top-level `guided_*` fields): one constraint the output
    must follow, enforced while decoding (`generation.constrained`)."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")  # a schema, or its JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF
    json_object: bool | None = None


# The guided-decoding spellings a request may use -> the kind of constraint.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}  # fmt: skip

# vLLM request extensions this server does not implement, with the value that means "off": a request that
# sets one to anything else is refused (400) instead of being served as if it had not.
UNSUPPORTED_EXTENSIONS: dict[str, Any] = {
    "min_tokens": 0, "include_stop_str_in_output": False, "skip_special_tokens": True,
    "spaces_between_special_tokens": True, "use_beam_search": False, "length_penalty": 1.0,
    "truncate_prompt_tokens": None, "bad_words": None, "allowed_token_ids": None, "prompt_logprobs": None,
    "logits_processors": None, "return_tokens_as_token_ids": False, "add_generation_prompt": True,
    "continue_final_message": False, "chat_template": None, "echo": False, "best_of": 1, "audio": None,
    "prediction": None, "guided_whitespace_pattern": None,
}  # fmt: skip


class _SamplingRequest(_Request):
    """Fields common to chat and text completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions beyond the OpenAI API (as vLLM spells them).
    top_k: int | None = Field(default=None, ge=-1)  # 0 or -1 = off
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_p: float | None = Field(default=None, ge=0, le=1)  # 0 = off
    stop_token_ids: list[int] | None = None  # these tokens end the output too (not shown in its text)
    ignore_eos: bool = False  # go on to max_tokens through the end-of-text and end-of-turn tokens
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop_token_ids")
    @classmethod
    def _valid_stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and any(t < 0 for t in value):
            raise ValueError("token ids are non-negative integers")
        return value

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_stop(value)

    @field_validator("logit_bias")
    @classmethod
    def _valid_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return _check_logit_bias(value)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def guided(self) -> tuple[str, str, Any] | None:
        """The one guided-decoding constraint asked for, as (request field, kind, value), or None.

        Raises:
            APIError: (400) more than one is set.
        """
        asked = [(name, kind, getattr(self, name)) for name, kind in GUIDED_FIELDS.items()
                 if getattr(self, name) is not None]  # fmt: skip
        if self.structured_outputs is not None:
            so = self.structured_outputs
            for kind, value in (("json", so.json_schema), ("regex", so.regex), ("choice", so.choice),
                                ("grammar", so.grammar)):  # fmt: skip
                if value is not None:
                    asked.append((f"structured_outputs.{kind}", kind, value))
            if so.json_object:
                asked.append(("structured_outputs.json_object", "json_object", True))
        if len(asked) > 1:
            names = ", ".join(name for name, _, _ in asked)
            raise APIError(f"Send one guided-decoding constraint at a time, got {names}.", param=asked[1][0])
        return asked[0] if asked else None


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`: the schema the reply must match (`schema` is a reserved name in pydantic)."""

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """`response_format`: free text, any JSON object, or JSON matching a schema (enforced while decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError('type "json_schema" needs json_schema.schema (the JSON schema of the reply)')
        return self

    def schema_of_reply(self) -> dict[str, Any] | None:
        """The schema the reply must match: None for free text, {"type": "object"} for json_object."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.json_schema
        return None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is the newer name; it wins when both are sent.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_logprobs(self) -> int | None:
        """How many alternatives per token to ask the engine for (None = no logprobs)."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None
    # OpenAI's default is 16; we use the context rule. 0 (with echo) scores the prompt and generates nothing.
    max_tokens: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _zero_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing, so it needs echo=true (to score the prompt)")
        return self

    @property
    def echo_only(self) -> bool:
        """max_tokens=0: the answer is the echoed prompt (and its logprobs) alone."""
        return self.max_tokens == 0

    def requested_max_tokens(self) -> int | None:
        # The engine still samples one token from the prefill's last logits (free: no extra forward pass);
        # an echo-only answer drops it.
        return 1 if self.echo_only else self.max_tokens

    def engine_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token the engine must compute: only when the prompt is echoed with logprobs."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each one a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)


class TokenizeRequest(_Request):
    """`/tokenize`: either a raw `prompt` or chat `messages` (rendered as for a chat completion)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None
    functions: list[FunctionDefinition] | None = None
    model: str | None = None


class DetokenizeRequest(_Request):
    tokens: list[int]
    model: str | None = None


# --------------------------------------------------------------------------------------------------
# Responses


class _Wire(BaseModel):
    """A response object; fields named in `_omit_none` are left out when None, as in OpenAI's JSON."""

    _omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_none:
            if key in data and data[key] is None:
                del data[key]
        return data


class PromptTokensDetails(_Wire):
    cached_tokens: int = 0


class UsageInfo(_Wire):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(_Wire):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Wire):
    content: list[TokenLogprobEntry] | None = None
    refusal: list[TokenLogprobEntry] | None = None


class FunctionCallDelta(_Wire):
    _omit_none = frozenset({"name", "arguments"})

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Wire):
    _omit_none = frozenset({"id", "type", "function"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatResponseMessage(_Wire):
    _omit_none = frozenset({"tool_calls", "function_call"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None


class ChatCompletionChoice(_Wire):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


def random_id(prefix: str) -> str:
    """An id like OpenAI's: `chatcmpl-...`, `cmpl-...`, `call_...`."""
    return f"{prefix}{uuid.uuid4().hex}"


class ChatCompletionResponse(_Wire):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(_Wire):
    _omit_none = frozenset({"role", "content", "tool_calls", "function_call", "refusal"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None


class ChatCompletionStreamChoice(_Wire):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Wire):
    _omit_none = frozenset({"usage"})  # present (null or an object) only with include_usage; see `sse`

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(_Wire):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Wire):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Wire):
    id: str = Field(default_factory=lambda: random_id("cmpl-"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(_Wire):
    _omit_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "qwenlm"
    max_model_len: int | None = None  # extension (vLLM has it too): prompt + completion tokens


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse(chunk: BaseModel | str, *, include_usage: bool = False) -> str:
    """One server-sent event: `data: <json>\\n\\n` (or `data: [DONE]\\n\\n` for the string "[DONE]").

    With `include_usage` every chunk carries `"usage": null` except the last one, which carries the
    totals (OpenAI's stream_options behaviour); without it the key is absent.
    """
    if isinstance(chunk, str):
        return f"data: {chunk}\n\n"
    data = chunk.model_dump(mode="json")
    if include_usage and "usage" not in data:
        data = {**data, "usage": None}
    return f"data: {_json(data)}\n\n"


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------------
# Request -> SamplingParams


def _gen_value(generation_config: Any, name: str) -> Any:
    """A field of the checkpoint's generation config (a GenerationConfig, a dict, or None)."""
    if generation_config is None:
        return None
    if isinstance(generation_config, dict):
        return generation_config.get(name)
    return getattr(generation_config, name, None)


def _gen_eos_ids(generation_config: Any) -> list[int]:
    eos = _gen_value(generation_config, "eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _check_penalties(request: _SamplingRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise APIError(
                f"{name} is not supported: Qwen models use a multiplicative repetition penalty instead. "
                f"Send 'repetition_penalty' (e.g. 1.1; 1.0 = off) and leave {name} unset or 0.",
                param=name,
                code="unsupported_parameter",
            )


def _check_extensions(request: _SamplingRequest) -> None:
    """Refuse vLLM extensions this server does not implement (see UNSUPPORTED_EXTENSIONS) and
    non-text output modalities, naming the field."""
    extra = request.model_extra or {}
    for name, off in UNSUPPORTED_EXTENSIONS.items():
        value = extra.get(name)
        if value is not None and value != off and value not in ([], {}):
            raise APIError(f"{name} is not supported by this server.", param=name, code="unsupported_parameter")
    modalities = extra.get("modalities")
    if isinstance(modalities, str):
        modalities = [modalities]
    if modalities and any(m != "text" for m in modalities):
        raise APIError("This server only produces text: modalities must be [\"text\"].", param="modalities",
                       code="unsupported_parameter")  # fmt: skip


def _logit_bias(request: _SamplingRequest, vocab_size: int) -> dict[int, float]:
    """The validated `logit_bias` as {token id: bias}; ids must exist in the tokenizer."""
    bias = {int(key): value for key, value in (request.logit_bias or {}).items()}
    unknown = sorted(token for token in bias if token >= vocab_size)
    if unknown:
        raise APIError(
            f"logit_bias names token id {unknown[0]}, but token ids go from 0 to {vocab_size - 1}.",
            param="logit_bias",
        )
    return bias


def _max_new_tokens(request: _SamplingRequest, prompt_tokens: int, max_model_len: int, generation_config: Any) -> int:
    """The completion budget: the client's max_tokens if it fits, else the rest of the context (capped)."""
    prompt_param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    remaining = max_model_len - prompt_tokens
    if remaining < 1:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_tokens} tokens, which leaves no room for a completion. Please shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    requested = request.requested_max_tokens()
    if requested is not None:
        if requested > remaining:
            name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
            raise APIError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {prompt_param}, {requested} in the "
                f"completion). Please reduce the length of the {prompt_param} or the completion.",
                param=name,
                code="context_length_exceeded",
            )
        return requested
    cap = _gen_value(generation_config, "max_new_tokens") or DEFAULT_MAX_TOKENS
    return min(remaining, cap)


def _sampling_knobs(request: _SamplingRequest, generation_config: Any) -> dict[str, Any]:
    """do_sample / temperature / top_p / top_k / min_p / repetition_penalty with the defaults rule applied.

    A value the client sends wins. A value it omits comes from the checkpoint's generation_config
    when the engine exposes one (so a served Qwen-Chat samples like `model.chat` does: top_p 0.8,
    repetition_penalty 1.1), else from OpenAI's defaults (temperature 1, top_p 1, no top_k, no
    penalty). Sampling is on unless the temperature (or top_p) is 0, or the client sent no sampling
    knob at all and the checkpoint asks for greedy decoding (do_sample false).
    """

    def pick(name: str, openai_default: Any) -> Any:
        value = getattr(request, name)
        if value is not None:
            return value
        value = _gen_value(generation_config, name)
        return openai_default if value is None else value

    temperature = float(pick("temperature", 1.0))
    top_p = float(pick("top_p", 1.0))
    top_k = int(pick("top_k", 0))
    repetition_penalty = float(pick("repetition_penalty", 1.0))
    min_p = float(pick("min_p", 0.0))
    client_samples = any(getattr(request, n) is not None for n in ("temperature", "top_p", "top_k", "min_p"))
    gen_do_sample = _gen_value(generation_config, "do_sample")
    do_sample = client_samples or gen_do_sample is None or bool(gen_do_sample)
    if temperature < GREEDY_TEMPERATURE or top_p == 0:
        do_sample = False
    return {
        "do_sample": do_sample,
        "temperature": temperature,
        "top_p": top_p if top_p > 0 else 1.0,
        "top_k": max(top_k, 0),  # -1 (vLLM's "off") -> 0
        "repetition_penalty": repetition_penalty,
        "min_p": min_p,
    }


def _unique(seqs: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(dict.fromkeys(tuple(s) for s in seqs if len(s) > 0))


def to_sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    *,
    prompt_tokens: int,
    max_model_len: int,
    generation_config: Any = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[Sequence[int]] = (),
    choice_index: int = 0,
    vocab_size: int = QWEN_TOKENIZER_VOCAB,
) -> SamplingParams:
    """Turn an OpenAI request into the engine's SamplingParams for one choice.

    Args:
        request: the validated chat or text completion request.
        prompt_tokens: length of the prompt in tokens (for the context-length checks).
        max_model_len: prompt + completion tokens one request may use.
        generation_config: the checkpoint's generation config (GenerationConfig or dict), or None;
            it supplies the values the client omits (see `_sampling_knobs`) and the default cap on
            max_tokens (`max_new_tokens`, else DEFAULT_MAX_TOKENS).
        stop: extra stop strings from the prompt builder (e.g. "Observation:" for tool use); the
            client's `stop` and these are added to Qwen's own stop tokens, never replacing them.
        stop_token_ids: extra token-level stop sequences from the prompt builder.
        choice_index: which of the `n` choices this is; with a `seed`, choice i uses `seed + i` so
            the choices differ but the whole response is reproducible.
        vocab_size: the tokenizer's size, the bound on `logit_bias` token ids.

    Raises:
        APIError: (400) presence/frequency penalty or an unimplemented vLLM extension sent, a logit_bias
            or stop_token_ids token id that does not exist, or the prompt plus the completion do not fit
            the context.
    """
    _check_penalties(request)
    _check_extensions(request)
    logit_bias = _logit_bias(request, vocab_size)
    max_new_tokens = _max_new_tokens(request, prompt_tokens, max_model_len, generation_config)
    seed = request.seed + choice_index if request.seed is not None else None
    stop_strings = tuple(dict.fromkeys([*request.stop_strings(), *stop]))
    client_stops = [(t,) for t in request.stop_token_ids or []]
    unknown = [t for (t,) in client_stops if t >= vocab_size]
    if unknown:
        raise APIError(f"stop_token_ids names token id {unknown[0]}, but token ids go from 0 to {vocab_size - 1}.",
                       param="stop_token_ids")  # fmt: skip
    # ignore_eos (vLLM's): the end-of-text and end-of-turn tokens no longer end the output; stops the
    # client or the prompt builder asked for still do.
    qwen_stops = [*ALWAYS_STOP_WORDS_IDS, *(_gen_value(generation_config, "stop_words_ids") or [])]
    builder_stops = list(stop_token_ids)
    if request.ignore_eos:
        builder_stops = [s for s in builder_stops if tuple(s) not in qwen_stops]  # keeps "Observation:" etc.
        qwen_stops = []
    stop_words = _unique([*qwen_stops, *builder_stops, *client_stops])
    eos_ids = () if request.ignore_eos else tuple(dict.fromkeys([EOS_TOKEN_ID, *_gen_eos_ids(generation_config)]))
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            seed=seed,
            eos_token_ids=eos_ids,
            stop_words_ids=stop_words,
            stop=stop_strings,
            logit_bias=logit_bias,
            **_sampling_knobs(request, generation_config),
        )
    except ValueError as err:  # a range our schema let through (should not happen); still the client's fault
        raise APIError(f"Invalid sampling parameters: {err}") from err
