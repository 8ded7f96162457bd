"""The decode loop, layered iterator -> stream -> result (as mlx-lm does):

    for step in generate_steps(model, prompts, params): ...        # token ids per step, batched
    for chunk in stream(model, tokenizer, "Once upon", max_new_tokens=32): print(chunk.text, end="")
    result = generate(model, tokenizer, "Once upon", temperature=0.7, seed=1)   # .text, .finish_reason

Prompts of different lengths are left-padded into one batch; every row stops on its own (eos, Qwen
stop words, stop strings, length) and a finished row costs nothing more once all rows are done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..model.config import ContextLengthError, GenerationConfig
from ..model.kv_cache import KVCache
from . import static
from .fused import FusedDecoder, fused_decoder
from .params import SamplingParams
from .sampling import make_generator, sample_next, with_torch_seed
from .stopping import StopStringMatcher, StopWordTail

logger = logging.getLogger(__name__)

PAD_ID = 151643  # <|endoftext|>: what Qwen's generation configs pad with
QWEN_VOCAB_SIZE = 151851  # 151643 BPE tokens + 208 specials; the embedding is padded past this


@dataclass
class Step:
    """One decode step of a batch: the new token of every row and which rows just finished."""

    token_ids: list[int]  # one per row (a finished row repeats its pad id)
    finished: list[bool]  # row is done after this token
    finish_reasons: list[str | None]  # "stop" / "length" for rows that finished at this step


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor | None]:
    """Batch prompts as [B, T] ids + attention mask (None when no row needs padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, (None if bool(mask.all()) else mask)


def check_fits(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.config.max_context_length
    if prompt_len + max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the model's context of "
            f"{limit} tokens; shorten the prompt or lower max_new_tokens"
        )


@torch.no_grad()
def generate_steps(
    model,
    prompts: Sequence[Sequence[int]] | Tensor,
    params: SamplingParams,
    attention_mask: Tensor | None = None,
    vocab_limit: int | None = None,
    generator: torch.Generator | None = None,
    *,
    compile: bool | None = None,
    sync_every: int | None = None,
) -> Iterator[Step]:
    """Decode a batch token by token, yielding a `Step` each time, until every row has finished.

    Two loops compute the same thing: the eager one (the model's forward on a growing KVCache, one host
    round trip per token) and the static one (`generation.static`: a fixed-shape step, compiled with
    torch.compile, CUDA graphs on CUDA, sampling on the device, tokens read in chunks). In fp32 they give
    the same tokens; in 16 bits a different rounding order can make greedy ties go another way.

    Args:
        prompts: token id lists (left-padded here), or an already padded [B, T] tensor + attention_mask.
        vocab_limit: never produce ids >= this (the tokenizer's size; the embedding is padded beyond
            it, and such an id could not be decoded).
        generator: RNG for sampling; default: one seeded from `params.seed`.
        compile: True: the static, compiled loop; False: the eager loop; None (default): the environment
            variable QWENLM_COMPILE (1/0) if set, else compiled on CUDA and eager on the CPU. A model the
            static loop cannot run (int8 KV cache, layers on several devices...) decodes eagerly, with a
            logged reason.
        sync_every: static loop only: read the tokens to the host every this many steps (default 4 on
            CUDA, 1 on the CPU, where there is no asynchrony to gain). Stop checks happen at these reads,
            so up to sync_every steps may be computed for nothing after the last row finishes.
    """
    if isinstance(prompts, Tensor):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
    else:
        ids, mask = left_pad(prompts)
    if sync_every is not None and sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    device = model.device
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    B, T = ids.shape
    check_fits(model, T, params.max_new_tokens)
    generator = generator or make_generator(params.seed, device)
    tracker = StopTracker(params, torch.where(mask.bool(), ids, -1) if mask is not None else ids)
    decoder = _static_decoder(model, B, T + params.max_new_tokens, compile)
    if decoder is None:
        yield from _eager_steps(model, ids, mask, params, vocab_limit, generator, tracker)
        return
    try:
        sync_every = sync_every or (4 if device.type == "cuda" else 1)
        for tokens in decoder.token_steps(ids, mask, params, vocab_limit, generator, sync_every):
            step = tracker.push(tokens)
            yield step
            if all(step.finished):
                return
    finally:
        decoder.release()


def _eager_steps(model, ids: Tensor, mask: Tensor | None, params: SamplingParams, vocab_limit: int | None,
                 generator: torch.Generator, tracker: StopTracker) -> Iterator[Step]:  # fmt: skip
    """The eager loop: the model's forward per token on a KVCache, finished rows fed their pad id."""
    B, T = ids.shape
    cache = KVCache.for_model(model, batch_size=B, capacity=T + params.max_new_tokens)
    # [B, T + generated]: what repetition penalty looks at; pads are -1 so they are never penalised
    # (a padded row then decodes exactly as it would alone)
    history = torch.where(mask.bool(), ids, -1) if mask is not None else ids
    penalized = params.repetition_penalty != 1.0  # the only reader of history after the prompt
    step_ids = ids
    fused: FusedDecoder | None = None  # one sequence on the CPU: each step is one native call after the prefill
    last = 0  # that sequence's latest token, which the fused step takes as an int
    for i in range(params.max_new_tokens):
        if fused is not None and params.is_plain_argmax:  # the step takes the argmax itself: no logits tensor
            step = tracker.push([fused.argmax(last, vocab_limit)])
        else:
            if fused is not None:
                logits = fused(last)[:, -1]
            else:
                logits = model(step_ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
                if i == 0 and B == 1 and mask is None and params.max_new_tokens > 1:
                    fused = fused_decoder(model, cache)
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]
            step = tracker.push(sample_next(logits, params, history, generator).tolist())
        last = step.token_ids[0]
        yield step
        if all(step.finished):
            return
        if fused is None or penalized:
            step_ids = torch.tensor(step.token_ids, device=ids.device)[:, None]
        if penalized:
            history = torch.cat([history, step_ids], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)


def compile_requested(compile: bool | None, device: torch.device) -> bool:
    """`compile` if given, else QWENLM_COMPILE (1/0), else True on CUDA only."""
    if compile is not None:
        return compile
    env = os.environ.get("QWENLM_COMPILE", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env:
        raise ValueError(f"QWENLM_COMPILE must be 1 or 0, got {env!r}")
    return device.type == "cuda"


def _static_decoder(model, batch_size: int, length: int, compile: bool | None) -> static.StaticDecoder | None:
    """The static decoder to use, or None for the eager loop (logging why, when the static one was wanted)."""
    if not compile_requested(compile, model.device):
        return None
    reason = static.unsupported_reason(model)
    decoder = static.acquire_decoder(model, batch_size, length, compiled=True) if reason is None else None
    if decoder is None:
        reason = reason or "the model's static decoder is in use by another generation"
        explicit = compile is not None or "QWENLM_COMPILE" in os.environ
        _log_once(logging.WARNING if explicit else logging.INFO, f"decoding with the eager loop: {reason}")
    return decoder


_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


class StopTracker:
    """Host-side stop bookkeeping of a batch: each step's tokens in, a `Step` out. A finished row's later
    tokens become its pad id (eos, or <|endoftext|>) whatever was sampled for it."""

    def __init__(self, params: SamplingParams, history: Tensor) -> None:
        """history: the prompts [B, T] with padding as -1 (only its last few ids are kept, for stop words)."""
        self.params = params
        self.pad = params.eos_token_ids[0] if params.eos_token_ids else PAD_ID
        longest = max((len(seq) for seq in params.stop_words_ids), default=0)
        # only each row's last few ids can start a stop word (pads are -1: never part of one)
        tails = history[:, -longest:].tolist() if longest else []
        self.tails = [StopWordTail(params.stop_words_ids, row) for row in tails] or None
        self.done = [False] * history.shape[0]
        self.generated = 0

    def push(self, sampled: list[int]) -> Step:
        params, n = self.params, self.generated + 1
        self.generated = n
        tokens = [self.pad if done else int(t) for done, t in zip(self.done, sampled, strict=True)]
        reasons: list[str | None] = [None] * len(tokens)
        for row, token in enumerate(tokens):
            if self.done[row]:
                continue
            if token in params.eos_token_ids or (self.tails is not None and self.tails[row].push(token)):
                reasons[row] = "stop"
            elif n == params.max_new_tokens:
                reasons[row] = "length"
        self.done = [done or reason is not None for done, reason in zip(self.done, reasons, strict=True)]
        return Step(token_ids=tokens, finished=list(self.done), finish_reasons=reasons)


# --------------------------------------------------------------------------------------------------
# Text: streaming detokenization with stop strings held back
# --------------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """What one row gained at one step: its token, the text that is now safe to show, and why it ended."""

    token_id: int
    text: str
    finish_reason: str | None = None


@dataclass
class TextStream:
    """Per-row text stage: token ids in, text deltas out, never a broken character or a stop string.

    Multi-token stop words made of ordinary text (raw format's "Human:") become stop strings too,
    so their text is held back like any other stop string and never shown.
    """

    tokenizer: object
    params: SamplingParams
    special_ids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        stops = list(self.params.stop)
        for seq in self.params.stop_words_ids:
            if any(t < self.tokenizer.eod_id for t in seq):
                stops.append(self.tokenizer.decode(list(seq), skip_special_tokens=True))
        self.matcher = StopStringMatcher([s for s in stops if s])
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; return (text to show now, hit a stop string)."""
        if self.stopped:
            return "", True
        text, self.stopped = self.matcher.feed(self.decoder.add(token_id))
        return text, self.stopped

    def finish(self) -> str:
        """The rest of the text once generation ended for another reason (eos, stop word, length)."""
        if self.stopped:
            return ""
        text, self.stopped = self.matcher.feed(self.decoder.finish())
        return text if self.stopped else text + self.matcher.flush()


def stream_batch(
    model, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams, *, compile: bool | None = None
) -> Iterator[list[Chunk | None]]:
    """Per step, one `Chunk` per row (None for rows that already finished).

    A row whose text hits a stop string finishes with reason "stop" at once, even if the model
    would have gone on; its remaining steps are not decoded. `compile`: as `generate_steps` takes it.
    """
    streams = [TextStream(tokenizer, params) for _ in prompts]
    active = [True] * len(prompts)
    for step in generate_steps(model, prompts, params, vocab_limit=len(tokenizer), compile=compile):
        chunks: list[Chunk | None] = []
        for row, token in enumerate(step.token_ids):
            if not active[row]:
                chunks.append(None)
                continue
            text, hit_stop = streams[row].push(token)
            reason = "stop" if hit_stop else step.finish_reasons[row]
            if reason is not None and not hit_stop:
                text += streams[row].finish()
                reason = "stop" if streams[row].stopped else reason
            if reason is not None:
                active[row] = False
            chunks.append(Chunk(token_id=token, text=text, finish_reason=reason))
        yield chunks
        if not any(active):
            return


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, stop tokens included
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


def _prompt_ids(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def stream(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
           compile: bool | None = None, **overrides) -> Iterator[Chunk]:  # fmt: skip
    """Stream one continuation: a `Chunk` per generated token (text may be "" while held back).

    Options are `SamplingParams` fields or generation_config keys, over `model.generation_config`;
    they and the prompt are checked when this is called, before the first token is computed.
    `compile`: the decode loop, as `generate_steps` takes it.
    """
    params = params or SamplingParams.from_generation_config(model.generation_config, **overrides)
    ids = _prompt_ids(tokenizer, prompt)
    check_fits(model, len(ids), params.max_new_tokens)
    return (chunks[0] for chunks in stream_batch(model, tokenizer, [ids], params, compile=compile))


def generate(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
             compile: bool | None = None, **overrides) -> GenerationResult:  # fmt: skip
    """Generate one continuation and return its text (stop text excluded) and finish reason.
    `compile`: the decode loop, as `generate_steps` takes it (True: static and torch.compile'd)."""
    params = params or SamplingParams.from_generation_config(model.generation_config, **overrides)
    ids = _prompt_ids(tokenizer, prompt)
    return generate_batch(model, tokenizer, [ids], params, compile=compile)[0]


def generate_batch(model, tokenizer, prompts: Sequence[str | Sequence[int]], params: SamplingParams, *,
                   compile: bool | None = None) -> list[GenerationResult]:  # fmt: skip
    """Generate for several prompts at once (left-padded into one batch)."""
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    texts = [[] for _ in ids]
    tokens: list[list[int]] = [[] for _ in ids]
    reasons = ["length"] * len(ids)
    for chunks in stream_batch(model, tokenizer, ids, params, compile=compile):
        for row, chunk in enumerate(chunks):
            if chunk is None:
                continue
            texts[row].append(chunk.text)
            tokens[row].append(chunk.token_id)
            if chunk.finish_reason:
                reasons[row] = chunk.finish_reason
    return [
        GenerationResult(text="".join(t), token_ids=tok, finish_reason=r, prompt_tokens=len(p))
        for t, tok, r, p in zip(texts, tokens, reasons, ids, strict=True)
    ]


# --------------------------------------------------------------------------------------------------
# transformers-style `model.generate`
# --------------------------------------------------------------------------------------------------
# Arguments that change nothing here (the KV cache is always used; there is one process).
_HF_IGNORED = {"token_type_ids", "use_cache", "synced_gpus"}
# Outputs transformers can add to a dict result; qwenlm's decode loops never materialise them.
_HF_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@dataclass
class GenerateOutput:
    """`model.generate(..., return_dict_in_generate=True)`: transformers' result object, sequences only."""

    sequences: Tensor

    def __getitem__(self, key: int | str) -> Tensor:  # out[0] and out["sequences"], as with a ModelOutput
        if key in (0, "sequences"):
            return self.sequences
        raise KeyError(key)


def _criteria_stop(criteria: Sequence, ids: Tensor) -> list[bool]:
    """Which rows the transformers-style stopping criteria end: each is called as criterion(ids, scores)
    and returns a bool (every row) or a bool tensor [B]; scores are None (the fused decode step never
    materialises them)."""
    B = ids.shape[0]
    stop = [False] * B
    for criterion in criteria:
        verdict = criterion(ids, None)
        rows = verdict.tolist() if isinstance(verdict, Tensor) and verdict.dim() > 0 else [bool(verdict)] * B
        stop = [a or bool(b) for a, b in zip(stop, rows, strict=True)]
    return stop


def hf_generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, generation_config=None,
                vocab_limit: int | None = QWEN_VOCAB_SIZE, **overrides) -> Tensor | GenerateOutput:  # fmt: skip
    """`model.generate` as the reference does it: prompt + new ids; after a Qwen stop word the
    reference forces `<|endoftext|>`, and so do we; finished rows are filled with pad_token_id.

    From transformers' other arguments it takes `stopping_criteria` (see `_criteria_stop`), `streamer`
    (a TextStreamer / TextIteratorStreamer: put(prompt ids), put(each new id), end(); batch size 1) and
    `return_dict_in_generate` (a `GenerateOutput`); it refuses custom logits processors and the
    per-step scores, logits, attentions and hidden states.

    One deliberate difference: ids >= `vocab_limit` (the embedding's padding rows, which no tokenizer
    can decode) are never produced. Pass `vocab_limit=None` for a model finetuned with extra vocabulary.
    """
    for key in _HF_IGNORED & overrides.keys():
        overrides.pop(key)
    if overrides.pop("logits_processor", None):
        raise ValueError("custom transformers logits_processor objects are not supported")
    for key in _HF_UNSUPPORTED_OUTPUTS:
        if overrides.pop(key, False):
            raise ValueError(f"{key}=True is not supported: the decode loop keeps no per-step tensors "
                             "(qwenlm.generation.sampling.token_logprobs scores chosen tokens)")  # fmt: skip
    as_dict = bool(overrides.pop("return_dict_in_generate", False))
    criteria = list(overrides.pop("stopping_criteria", None) or [])
    streamer = overrides.pop("streamer", None)
    gen = GenerationConfig.coerce(generation_config or model.generation_config)
    pad_id = overrides.pop("pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (gen.pad_token_id if gen is not None else None)
    params = with_torch_seed(SamplingParams.from_generation_config(gen, **overrides))
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    run_ids, run_mask = input_ids, attention_mask
    if attention_mask is not None and bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        # Right padding (the tokenizer's default side): decode the rows left-padded, as transformers asks users
        # to do (it warns and generates after the pads); the result keeps the caller's layout, new tokens after it.
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
        run_ids, run_mask = left_pad(prompts, pad_id if pad_id is not None else PAD_ID)
        run_ids = run_ids.to(input_ids.device)
        run_mask = run_mask.to(input_ids.device) if run_mask is not None else None
    eos = params.eos_token_ids[0] if params.eos_token_ids else None
    fill = pad_id if pad_id is not None else (eos if eos is not None else PAD_ID)
    B = input_ids.shape[0]
    if streamer is not None and B != 1:
        raise ValueError(f"a streamer takes one sequence, got a batch of {B}")
    if streamer is not None:
        streamer.put(input_ids.cpu())
    rows: list[list[int]] = [[] for _ in range(B)]
    ended = [False] * B

    def _so_far() -> Tensor:
        width = max(len(r) for r in rows)
        new = torch.full((B, width), fill, dtype=input_ids.dtype)
        for row, tokens in enumerate(rows):
            new[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    steps = generate_steps(model, run_ids, params, attention_mask=run_mask, vocab_limit=vocab_limit)
    for step in steps:
        for row, token in enumerate(step.token_ids):
            if ended[row]:
                continue
            rows[row].append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if step.finished[row]:
                ended[row] = True
                forced = step.finish_reasons[row] == "stop" and token not in params.eos_token_ids
                if forced and eos is not None and len(rows[row]) < params.max_new_tokens:
                    rows[row].append(eos)  # the reference's StopWordsLogitsProcessor forces eos next
        if criteria and not all(ended):
            ended = [e or s for e, s in zip(ended, _criteria_stop(criteria, _so_far()), strict=True)]
        if all(ended):
            steps.close()  # rows a criterion ended early: stop decoding now
            break
    if streamer is not None:
        streamer.end()
    sequences = _so_far()
    return GenerateOutput(sequences) if as_dict else sequences
