"""The serving engine: continuous batching over a slot-based KV cache, with prefix reuse.

One preallocated KV cache holds `max_num_seqs` slots of `max_model_len` tokens. Every `step()`:

    admit waiting requests into free slots (reusing the slot whose cached tokens share the longest
    prefix with the prompt: a chat's second turn skips re-reading the first)
      -> prefill one chunk of one newcomer's prompt (chunked, so running requests are not stalled)
      -> decode one token for every running request in one batched forward
      -> sample per request (its own params and RNG), check stops, emit RequestOutputs

    engine = LLMEngine(model, tokenizer, EngineArgs(max_num_seqs=4))
    engine.add_request("r1", prompt_ids, SamplingParams(max_new_tokens=32))
    while engine.has_work(): outputs = engine.step()
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generation.generate import QWEN_VOCAB_SIZE, TextStream
from ..generation.params import SamplingParams
from ..generation.sampling import make_generator, sample_next, token_logprobs
from ..generation.stopping import ends_with_stop_words
from ..model.kv_cache import KVCache
from ..model.qwen import ntk_alpha
from .protocol import EngineBusyError, EngineStats, RequestOutput, TokenLogprob


@dataclass
class EngineArgs:
    """Runtime knobs of the engine (not part of the model config)."""

    max_num_seqs: int = 8
    """Slots: how many requests run at once (and how many cached prefixes are kept)."""
    max_model_len: int | None = None
    """Prompt + completion tokens per request; default min(model context, 8192)."""
    max_queue: int = 256
    """Waiting requests beyond this are refused with EngineBusyError (backpressure)."""
    prefill_chunk: int = 256
    """Prompt tokens per newcomer computed per step, between decode steps of the others."""
    prefill_budget: int = 1024
    """Padded tokens (rows x longest chunk) of all newcomers prefilled together in one step."""
    enable_prefix_caching: bool = True
    """Reuse a free slot's cached tokens when a new prompt starts with them."""


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None
    generator: torch.Generator
    text: TextStream
    alpha: float  # dynamic-NTK alpha, fixed by the prompt length as in a single-sequence prefill
    arrival: float = field(default_factory=time.perf_counter)
    slot: int | None = None
    computed: int = 0  # prompt tokens already in the slot's cache
    cached_tokens: int = 0  # of those, reused from an earlier request
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_at: float | None = None

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt_ids)


@dataclass
class Slot:
    tokens: list[int] = field(default_factory=list)  # what its cache rows hold, valid from 0
    alpha: float = 1.0
    last_used: float = 0.0
    request: Request | None = None


class SlotCache:
    """A KVCache view over some slots of the engine cache, in the row order of a batch.

    Writes go straight into the slots; reads gather the rows (a view when they are contiguous and the
    cache is not quantized). Works with float and int8 caches alike through `KVCache.write/read`.
    """

    def __init__(self, cache: KVCache, slots: list[int], alphas: Tensor) -> None:
        self.cache, self.slots, self.ntk_alpha = cache, slots, alphas
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self.rows = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    @property
    def quantized(self) -> bool:
        return self.cache.quantized

    def reserve(self, total_length: int) -> None:
        if total_length > self.cache.capacity:
            raise ValueError(f"{total_length} tokens do not fit the engine's {self.cache.capacity}-token slots")

    def update(self, layer: int, k: Tensor, v: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        starts = [start] * len(self.slots) if isinstance(start, int) else start.tolist()
        self.cache.write(layer, k, v, starts, self.slots)
        return self.cache.read(layer, max(starts) + k.shape[2], self.rows)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LLMEngine:
    """Synchronous engine; `AsyncEngine` runs it on a background thread for the server."""

    def __init__(self, model, tokenizer, args: EngineArgs | None = None, model_name: str = "qwen") -> None:
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.args = args = args or EngineArgs()
        limit = model.config.max_context_length
        self.max_model_len = min(args.max_model_len or min(limit, 8192), limit)
        self.cache = KVCache.for_model(model, batch_size=args.max_num_seqs, capacity=self.max_model_len)
        self.slots = [Slot() for _ in range(args.max_num_seqs)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.vocab_limit = min(len(tokenizer), model.config.vocab_size, QWEN_VOCAB_SIZE)
        self.totals = EngineStats()
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    logprobs: int | None = None) -> None:  # fmt: skip
        self.check_request(prompt_ids, params, queued=len(self.waiting))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        config = self.model.config
        alpha = float(ntk_alpha(len(prompt_ids), config.seq_length)) if config.use_dynamic_ntk else 1.0
        generator = make_generator(params.seed, self.model.device)
        request = Request(request_id, list(prompt_ids), params, logprobs, generator, TextStream(self.tokenizer, params),
                          alpha)  # fmt: skip
        self.requests[request_id] = request
        self.waiting.append(request)
        self.totals.requests_total += 1
        self.totals.prompt_tokens_total += len(prompt_ids)

    def check_request(self, prompt_ids: list[int], params: SamplingParams, queued: int) -> None:
        """Refuse a request that can never run or must wait for room; reads no mutable state, so the
        async front end can call it from the event loop without taking the engine's lock."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds this "
                f"server's max_model_len of {self.max_model_len} tokens"
            )
        if queued >= self.args.max_queue:
            raise EngineBusyError(f"the queue is full ({self.args.max_queue} waiting requests); retry later")

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None or request.finish_reason is not None:
            return None
        if request in self.waiting:
            self.waiting.remove(request)
        return self._finish(request, "abort", [], "")

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        """Offline use: run every prompt to completion (continuously batched); one summary per prompt,
        whose token_ids and text are the whole completion."""
        ids = [f"batch-{id(self)}-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, params)
        done: dict[str, RequestOutput] = {}
        parts: dict[str, tuple[list[int], list[str]]] = {i: ([], []) for i in ids}
        while self.has_work():
            for out in self.step():
                parts[out.request_id][0].extend(out.token_ids)
                parts[out.request_id][1].append(out.text)
                if out.finished:
                    done[out.request_id] = out
        return [
            RequestOutput(
                i,
                parts[i][0],
                "".join(parts[i][1]),
                done[i].finish_reason,
                None,
                done[i].prompt_tokens,
                done[i].completion_tokens,
                done[i].cached_tokens,
            )  # fmt: skip
            for i in ids
        ]

    @classmethod
    def from_pretrained(cls, path: str, args: EngineArgs | None = None, **load_kwargs) -> LLMEngine:
        from ..auto import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        return cls(model, AutoTokenizer.from_pretrained(path), args, model_name=str(path).rstrip("/").split("/")[-1])

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        s = self.totals
        s.requests_running, s.requests_waiting = len(self.running), len(self.waiting)
        if len(self._recent) >= 2:
            span = self._recent[-1][0] - self._recent[0][0]
            s.tokens_per_second = sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0
        return s

    # ---- scheduling ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests into free slots, each into the free slot with the longest reusable prefix."""
        while self.waiting:
            free = [i for i, slot in enumerate(self.slots) if slot.request is None]
            if not free:
                return
            request = self.waiting.popleft()

            def reuse(i: int, request: Request = request) -> int:
                slot = self.slots[i]
                if not self.args.enable_prefix_caching or slot.alpha != request.alpha:
                    return 0  # cached under another NTK base: not the same keys
                return min(_common_prefix(slot.tokens, request.prompt_ids), len(request.prompt_ids) - 1)

            best = max(free, key=lambda i: (reuse(i), -self.slots[i].last_used))
            slot = self.slots[best]
            request.slot, request.computed = best, reuse(best)
            request.cached_tokens = request.computed
            self.totals.cached_prompt_tokens_total += request.computed
            slot.tokens, slot.alpha, slot.request = slot.tokens[: request.computed], request.alpha, request
            self.running.append(request)

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """One scheduling step: admit, prefill one chunk, decode every prefilled request once."""
        self._admit()
        outputs: list[RequestOutput] = []
        decoding = [r for r in self.running if r.prefilled and r.output_ids]
        prefilling = self._prefill_group()
        if prefilling:
            outputs += self._prefill_chunks(prefilling)
        if decoding:
            outputs += self._decode(decoding)
        return outputs

    # ---- model work ----------------------------------------------------------------------------
    def _prefill_group(self) -> list[Request]:
        """Newcomers to prefill together this step, oldest first, within the padded-token budget."""
        group: list[Request] = []
        longest = 0
        for request in (r for r in self.running if not r.prefilled):
            chunk = min(self.args.prefill_chunk, len(request.prompt_ids) - request.computed)
            width = max(longest, chunk)
            fits = all(r.computed + width <= self.cache.capacity for r in (*group, request))  # padding stays in-slot
            if group and (width * (len(group) + 1) > self.args.prefill_budget or not fits):
                break
            group.append(request)
            longest = width
        return group

    def _prefill_chunks(self, requests: list[Request]) -> list[RequestOutput]:
        """One forward over every newcomer's next chunk, right-padded to the longest; a row's padding
        lands past its real tokens in its own slot, is never attended to, and is overwritten later."""
        chunks = [r.prompt_ids[r.computed : r.computed + self.args.prefill_chunk] for r in requests]
        width = max(len(c) for c in chunks)
        ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in chunks], device=self.model.device)
        view = SlotCache(self.cache, [r.slot for r in requests], torch.tensor([r.alpha for r in requests]))
        logits = self.model(ids, past_key_values=view, cache_positions=[r.computed for r in requests],
                            logits_positions=[len(c) - 1 for c in chunks]).logits[:, -1]  # fmt: skip
        for request, chunk in zip(requests, chunks, strict=True):
            request.computed += len(chunk)
            self.slots[request.slot].tokens.extend(chunk)
        done = [row for row, r in enumerate(requests) if r.prefilled]
        if not done:
            return []
        return self._sample([requests[row] for row in done], logits[done])

    def _decode(self, requests: list[Request]) -> list[RequestOutput]:
        requests = sorted(requests, key=lambda r: r.slot)  # contiguous slots read as a view, with no copy
        slots = [r.slot for r in requests]
        positions = [len(r.prompt_ids) + len(r.output_ids) - 1 for r in requests]
        ids = torch.tensor([[r.output_ids[-1]] for r in requests], device=self.model.device)
        view = SlotCache(self.cache, slots, torch.tensor([r.alpha for r in requests]))
        for r in requests:
            self.slots[r.slot].tokens.append(r.output_ids[-1])
        logits = self.model(ids, past_key_values=view, cache_positions=positions, logits_to_keep=1).logits[:, -1]
        return self._sample(requests, logits)

    def _sample(self, requests: list[Request], logits: Tensor) -> list[RequestOutput]:
        logits = logits[:, : self.vocab_limit].float()
        outputs = []
        now = time.perf_counter()
        for row, request in enumerate(requests):
            history = None  # only the repetition penalty looks at every id so far
            if request.params.repetition_penalty != 1.0:
                history = torch.tensor([request.prompt_ids + request.output_ids], device=logits.device)
            token = int(sample_next(logits[row : row + 1], request.params, history, request.generator)[0])
            logprob = None
            if request.logprobs is not None:
                chosen, top = token_logprobs(logits[row : row + 1], torch.tensor([token]), request.logprobs)
                pairs = list(zip(top[0][0].tolist(), top[1][0].tolist(), strict=True)) if top is not None else []
                logprob = [TokenLogprob(token, float(chosen[0]), pairs)]
            if request.first_token_at is None:
                request.first_token_at = now
                self.totals.time_to_first_token_seconds = [
                    *self.totals.time_to_first_token_seconds[-255:],
                    now - request.arrival,
                ]
            request.output_ids.append(token)
            self.totals.generation_tokens_total += 1
            outputs.append(self._after_token(request, token, logprob))
        self._recent.append((now, len(requests)))
        return outputs

    def _after_token(self, request: Request, token: int, logprob: list[TokenLogprob] | None) -> RequestOutput:
        params = request.params
        text, hit_stop = request.text.push(token)
        reason = None
        if hit_stop or token in params.eos_token_ids:
            reason = "stop"
        elif params.stop_words_ids and self._ends_with_stop_words(request):
            reason = "stop"
        elif len(request.output_ids) >= params.max_new_tokens:
            reason = "length"
        if reason is None:
            return self._output(request, [token], text, None, logprob)
        if not hit_stop:
            text += request.text.finish()
            reason = "stop" if request.text.stopped else reason
        return self._finish(request, reason, [token], text, logprob)

    @staticmethod
    def _ends_with_stop_words(request: Request) -> bool:
        longest = max(len(seq) for seq in request.params.stop_words_ids)
        tail = request.prompt_ids[-longest:] + request.output_ids[-longest:]  # a match can straddle the two
        return ends_with_stop_words(tail, request.params.stop_words_ids, min(len(request.output_ids), len(tail)))

    def _finish(self, request: Request, reason: str, tokens: list[int], text: str,
                logprob: list[TokenLogprob] | None = None) -> RequestOutput:  # fmt: skip
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        if request.slot is not None:
            slot = self.slots[request.slot]
            # the slot keeps what its cache holds (prompt + all but the last token) for the next request
            # that shares the prefix
            slot.request, slot.last_used = None, time.perf_counter()
        self.requests.pop(request.request_id, None)
        return self._output(request, tokens, text, reason, logprob)

    @staticmethod
    def _output(request: Request, tokens: list[int], text: str, reason: str | None,
                logprob: list[TokenLogprob] | None) -> RequestOutput:  # fmt: skip
        return RequestOutput(
            request_id=request.request_id, token_ids=tokens, text=text, finish_reason=reason, logprobs=logprob,
            prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.output_ids),
            cached_tokens=request.cached_tokens,
        )  # fmt: skip
