"""The serving engine: continuous batching over a paged KV cache, with prefix caching and preemption.

K/V live in blocks of `block_size` tokens in one pool per layer (`model.paged_kv_cache`), as many as the
memory budget `kv_cache_memory` holds; a request holds the blocks its tokens fill, and full blocks are
shared read-only by later requests with the same prefix (a system prompt, a chat's earlier turns). Every
`step()`:

    the scheduler (scheduler.py) plans: one token for every running request, admission of waiting ones by
    free blocks (when blocks run out mid-decode, the newest request is preempted and later recomputed),
    and the next prompt chunk of each newcomer
      -> one forward over the newcomers' chunks (right-padded), one over the decoding rows (paged attention)
      -> sample per request (its own params, RNG, logit bias and grammar), check stops, emit RequestOutputs

    engine = LLMEngine(model, tokenizer, EngineArgs(max_num_seqs=4, kv_cache_memory=1.0))
    engine.add_request("r1", prompt_ids, SamplingParams(max_new_tokens=32))
    while engine.has_work(): outputs = engine.step()
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generation.fused import FusedStep, fused_step
from ..generation.generate import QWEN_VOCAB_SIZE, TextStream
from ..generation.params import SamplingParams
from ..generation.sampling import make_generator, sample_next, token_logprobs
from ..generation.stopping import StopWordTail
from ..model.blocks import ntk_alpha
from ..model.paged_kv_cache import PagedKVCache
from ..model.qwen import _device_of
from .block_manager import BlockAllocator
from .kv_budget import GIB, plan_kv_blocks
from .protocol import EngineBusyError, EngineStats, RequestOutput, TokenConstraint, TokenLogprob, check_request_fits
from .scheduler import Chunk, Scheduler, Sequence


@dataclass
class EngineArgs:
    """Runtime knobs of the engine (not part of the model config)."""

    max_num_seqs: int = 8
    """The most requests running at once: a cap on concurrency, not a memory reservation."""
    max_model_len: int | None = None
    """Prompt + completion tokens per request; default min(model context, 8192)."""
    max_queue: int = 256
    """Waiting requests beyond this are refused with EngineBusyError (backpressure)."""
    prefill_chunk: int = 256
    """Prompt tokens per newcomer computed per step, between decode steps of the others."""
    prefill_budget: int = 1024
    """Padded tokens (rows x longest chunk) of all newcomers prefilled together in one step."""
    enable_prefix_caching: bool = True
    """Share the KV blocks of a prompt's prefix with earlier requests that computed it."""
    kv_cache_memory: float | None = None
    """GiB of KV blocks (int8 KV takes about half per token). Default: 90% of GPU memory after the weights;
    on CPU a quarter of the available RAM, at most 4 GiB; and no more than max_num_seqs full-length
    requests can use (see kv_budget.py)."""
    block_size: int = 16
    """Tokens per KV block (a power of two)."""


@dataclass(eq=False)
class Request:
    request_id: str
    seq: Sequence  # the scheduler's view: tokens (prompt, then output), blocks, NTK alpha
    params: SamplingParams
    logprobs: int | None
    generator: torch.Generator
    text: TextStream
    stop_words: StopWordTail
    arrival: float = field(default_factory=time.perf_counter)
    finish_reason: str | None = None
    first_token_at: float | None = None
    prompt_logprobs: int | None = None  # alternatives per prompt token (None = no prompt logprobs)
    prompt_logprob_entries: list[TokenLogprob | None] = field(default_factory=list)  # [None, lp(t1 | t0), ...]
    constraint: TokenConstraint | None = None  # grammar the output must follow (structured output)

    @property
    def prompt_ids(self) -> list[int]:
        return self.seq.token_ids[: self.seq.num_prompt_tokens]

    @property
    def num_output(self) -> int:
        return len(self.seq.token_ids) - self.seq.num_prompt_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache when it was first admitted."""
        return self.seq.num_cached_tokens or 0


class LLMEngine:
    """Synchronous engine; `AsyncEngine` runs it on a background thread for the server."""

    def __init__(self, model, tokenizer, args: EngineArgs | None = None, model_name: str = "qwen") -> None:
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.args = args = args or EngineArgs()
        limit = model.config.max_context_length
        given = args.max_model_len is not None
        if given and not 1 <= args.max_model_len <= limit:
            raise ValueError(f"--max-model-len must be between 1 and the model's context of {limit} tokens, "
                             f"got {args.max_model_len}")  # fmt: skip
        max_model_len = args.max_model_len if given else min(limit, 8192)
        num_blocks, self.max_model_len = plan_kv_blocks(
            model, args.block_size, args.kv_cache_memory, args.max_num_seqs, max_model_len, given
        )
        self.cache = PagedKVCache.for_model(model, num_blocks, args.block_size)
        self.scheduler = Scheduler(BlockAllocator(num_blocks, args.enable_prefix_caching), args.block_size,
                                   args.max_num_seqs, args.prefill_chunk, args.prefill_budget)  # fmt: skip
        self.requests: dict[str, Request] = {}
        self.vocab_limit = min(len(tokenizer), model.config.vocab_size, QWEN_VOCAB_SIZE)
        self.totals = EngineStats()
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._fused: FusedStep | None | bool = False  # one running sequence's decode step; built on first use

    @property
    def waiting(self) -> collections.deque[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def kv_cache_gib(self) -> float:
        return self.cache.nbytes() / GIB

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    logprobs: int | None = None, *, prompt_logprobs: int | None = None,
                    constraint: TokenConstraint | None = None) -> None:  # fmt: skip
        """Queue a request. `logprobs`: alternatives per generated token (None = no logprobs);
        `prompt_logprobs`: the same for every prompt token after the first, computed by the prefill
        itself (such a prompt is prefilled whole, never read from the prefix cache); `constraint`: a
        grammar the output must follow (see `generation.constrained`)."""
        if isinstance(prompt_ids, str) or not all(isinstance(t, int) for t in prompt_ids):
            raise TypeError("add_request takes the prompt as a list of token ids (tokenizer.encode(text); "
                            "generate_batch also takes text)")  # fmt: skip
        self.check_request(prompt_ids, params, queued=len(self.waiting))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        config = self.model.config
        alpha = float(ntk_alpha(len(prompt_ids), config.seq_length)) if config.use_dynamic_ntk else 1.0
        seq = Sequence(
            request_id,
            list(prompt_ids),
            len(prompt_ids) + params.max_new_tokens,
            alpha,
            use_prefix_cache=prompt_logprobs is None,
        )  # cached positions have no logits to score
        request = Request(request_id, seq, params, logprobs, make_generator(params.seed, self.model.device),
                          TextStream(self.tokenizer, params), StopWordTail(params.stop_words_ids, prompt_ids),
                          prompt_logprobs=prompt_logprobs, constraint=constraint)  # fmt: skip
        self.scheduler.add(seq)
        self.requests[request_id] = request
        self.totals.requests_total += 1
        self.totals.prompt_tokens_total += len(prompt_ids)

    def check_request(self, prompt_ids: list[int], params: SamplingParams, queued: int) -> None:
        """Refuse a request that can never run or must wait for room; reads no mutable state, so the
        async front end can call it from the event loop without taking the engine's lock."""
        pool = self.scheduler.allocator.num_blocks * self.args.block_size
        why = f", all its KV cache holds ({self.kv_cache_gib:.3g} GiB: --kv-cache-memory)"
        check_request_fits(
            prompt_ids, params.max_new_tokens, self.max_model_len, why if pool <= self.max_model_len else ""
        )
        if queued >= self.args.max_queue:
            raise EngineBusyError(f"the queue is full ({self.args.max_queue} waiting requests); retry later")

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now (its client left); its KV blocks are free for the next step."""
        request = self.requests.get(request_id)
        if request is None or request.finish_reason is not None:
            return None
        return self._finish(request, "abort", [], "")

    def generate_batch(self, prompts: list[str | list[int]], params: SamplingParams) -> list[RequestOutput]:
        """Offline use: run every prompt to completion (continuously batched); one summary per prompt,
        whose token_ids and text are the whole completion. A prompt is raw text (encoded as it is: no chat
        template, special-token text means the special token) or a list of token ids."""
        ids = [f"batch-{id(self)}-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt, params)
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
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        s, scheduler = self.totals, self.scheduler
        allocator = scheduler.allocator
        s.requests_running, s.requests_waiting = len(self.running), len(self.waiting)
        s.kv_blocks_total, s.kv_blocks_used = allocator.num_blocks, allocator.num_used
        s.kv_blocks_cached = len(allocator.evictable)
        s.preemptions_total = scheduler.num_preemptions
        s.prefix_cache_queries_total = scheduler.prefix_query_tokens
        s.prefix_cache_hits_total = s.cached_prompt_tokens_total = scheduler.prefix_hit_tokens
        if len(self._recent) >= 2:
            span = self._recent[-1][0] - self._recent[0][0]
            s.tokens_per_second = sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0
        return s

    # ---- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """One scheduling step: plan, prefill the planned chunks, decode every running request once, sample."""
        plan = self.scheduler.schedule()
        prefill_logits = self._prefill(plan.prefills) if plan.prefills else None
        decode_logits = self._decode(plan.decodes) if plan.decodes else None
        self.scheduler.commit(plan)  # the K/V are written: their full blocks become shareable
        outputs: list[RequestOutput] = []
        if prefill_logits is not None:  # rows whose chunk reached their last token sample the next one
            done = [row for row, chunk in enumerate(plan.prefills) if chunk.completes]
            if done:
                requests = [self.requests[plan.prefills[row].seq.seq_id] for row in done]
                outputs += self._sample(requests, prefill_logits[done])
        if decode_logits is not None:
            outputs += self._sample([self.requests[seq.seq_id] for seq in plan.decodes], decode_logits)
        return outputs

    # ---- model work ----------------------------------------------------------------------------
    def _prefill(self, chunks: list[Chunk]) -> Tensor:
        """One forward over every planned chunk, right-padded to the longest (padding is never written to
        the cache nor attended to by real tokens); the logits [B, V] of each chunk's last token."""
        seqs = [c.seq for c in chunks]
        tokens = [c.seq.token_ids[c.start : c.start + c.length] for c in chunks]
        width = max(c.length for c in chunks)
        ids = torch.tensor([t + [t[-1]] * (width - len(t)) for t in tokens], device=self.model.device)
        starts = [c.start for c in chunks]
        view = self.cache.batch([s.block_ids for s in seqs], starts, [c.length for c in chunks],
                                torch.tensor([s.alpha for s in seqs]))  # fmt: skip
        out = self.model(ids, past_key_values=view, cache_positions=starts,
                         logits_positions=[c.length - 1 for c in chunks])  # fmt: skip
        for row, chunk in enumerate(chunks):
            request = self.requests[chunk.seq.seq_id]
            if request.prompt_logprobs is not None:
                self._score_prompt_chunk(request, chunk.start, out.hidden_states[row, : chunk.length])
        return out.logits[:, -1]

    def _score_prompt_chunk(self, request: Request, start: int, hidden: Tensor, block: int = 256) -> None:
        """Logprobs of the prompt tokens this chunk predicts, from the prefill's own final hidden states
        (no second pass): position p's logits score token p + 1. Only this row's positions go through
        lm_head, `block` at a time (a few hundred rows: one matrix product, not the few-row decode kernel;
        at most block x vocab logits in memory), so the other rows keep the one-position fast path. A request preempted
        and recomputed is not scored twice."""
        entries = request.prompt_logprob_entries
        if not entries:
            entries.append(None)  # the first token has no context to be scored on
        first = max(start + 1, len(entries))  # the first prompt token not scored yet
        end = min(start + 1 + hidden.shape[0], request.seq.num_prompt_tokens)  # the last one predicts no prompt token
        targets = request.seq.token_ids[first:end]
        hidden = hidden[first - start - 1 :]
        head = self.model.lm_head
        for i in range(0, len(targets), block):
            ids = targets[i : i + block]
            logits = head(hidden[i : i + len(ids)].to(_device_of(head)))
            chosen, top = token_logprobs(logits, torch.tensor(ids), request.prompt_logprobs, self.vocab_limit)
            for j, token in enumerate(ids):
                pairs = list(zip(top[0][j].tolist(), top[1][j].tolist(), strict=True)) if top is not None else []
                entries.append(TokenLogprob(token, float(chosen[j]), pairs))

    def _decode(self, seqs: list[Sequence]) -> Tensor | list[int]:
        """One token per sequence (its last sampled one), each at its own position: logits [B, V]; or, for a
        lone sequence that the fused step decodes greedily with nothing to process, its next token as [id]."""
        positions = [s.num_computed for s in seqs]
        if len(seqs) == 1 and self._fused is False:
            self._fused = fused_step(self.model, self.cache)  # None: the model or cache is not covered
        if len(seqs) == 1 and self._fused:  # as generate() decodes one sequence: one native call per token
            seq, request = seqs[0], self.requests[seqs[0].seq_id]
            args = (seq.token_ids[-1], self.cache, seq.block_ids, positions[0], seq.alpha)
            if request.params.is_plain_argmax and request.logprobs is None and request.constraint is None:
                return [self._fused.paged_argmax(*args, limit=self.vocab_limit)]
            return self._fused.paged(*args)[:, -1]
        ids = torch.tensor([[s.token_ids[-1]] for s in seqs], device=self.model.device)
        view = self.cache.batch([s.block_ids for s in seqs], positions, [1] * len(seqs),
                                torch.tensor([s.alpha for s in seqs]))  # fmt: skip
        return self.model(ids, past_key_values=view, cache_positions=positions, logits_to_keep=1).logits[:, -1]

    def _sample(self, requests: list[Request], logits: Tensor | list[int]) -> list[RequestOutput]:
        """The next token of each request from its row of logits, or as _decode already chose it (a list)."""
        picked = logits if isinstance(logits, list) else None
        if picked is None:
            full = logits.float()  # logprobs are normalised over the model's whole output vocabulary
            logits = full[:, : self.vocab_limit]  # sampling sees only tokens that have text
        outputs = []
        now = time.perf_counter()
        for row, request in enumerate(requests):
            if picked is not None:
                token = picked[row]
            else:
                history = None  # only the repetition penalty looks at every id so far
                if request.params.repetition_penalty != 1.0:
                    history = torch.tensor([request.seq.token_ids], device=logits.device)
                scores = logits[row : row + 1]
                if request.constraint is not None:  # the per-row hook: tokens the grammar forbids become -inf
                    scores = request.constraint.mask_logits(scores)
                token = int(sample_next(scores, request.params, history, request.generator)[0])
            if request.constraint is not None:
                request.constraint.advance(token)
            logprob = None
            if request.logprobs is not None:
                chosen, top = token_logprobs(full[row : row + 1], torch.tensor([token]), request.logprobs,
                                             self.vocab_limit)  # fmt: skip
                pairs = list(zip(top[0][0].tolist(), top[1][0].tolist(), strict=True)) if top is not None else []
                logprob = [TokenLogprob(token, float(chosen[0]), pairs)]
            if request.first_token_at is None:
                request.first_token_at = now
                self.totals.record_first_token(now - request.arrival)
            request.seq.token_ids.append(token)
            self.totals.generation_tokens_total += 1
            outputs.append(self._after_token(request, token, logprob))
        self._recent.append((now, len(requests)))
        return outputs

    def _after_token(self, request: Request, token: int, logprob: list[TokenLogprob] | None) -> RequestOutput:
        params = request.params
        text, hit_stop = request.text.push(token)
        stop_word = request.stop_words.push(token)
        reason = None
        if hit_stop or token in params.eos_token_ids or stop_word:
            reason = "stop"
        elif request.num_output >= params.max_new_tokens:
            reason = "length"
        if reason is None:
            return self._output(request, [token], text, None, logprob)
        if not hit_stop:
            text += request.text.finish()
            reason = "stop" if request.text.stopped else reason
        return self._finish(request, reason, [token], text, logprob)

    def _finish(self, request: Request, reason: str, tokens: list[int], text: str,
                logprob: list[TokenLogprob] | None = None) -> RequestOutput:  # fmt: skip
        """The request is done: its blocks go back to the pool (its full blocks stay in the prefix cache
        for the next request that shares them, until the space is needed)."""
        request.finish_reason = reason
        self.scheduler.finish(request.seq)
        self.requests.pop(request.request_id, None)
        return self._output(request, tokens, text, reason, logprob)

    @staticmethod
    def _output(request: Request, tokens: list[int], text: str, reason: str | None,
                logprob: list[TokenLogprob] | None) -> RequestOutput:  # fmt: skip
        first = request.num_output == 1 and bool(tokens)  # prompt logprobs ride on the first token's output
        return RequestOutput(
            request_id=request.request_id, token_ids=tokens, text=text, finish_reason=reason, logprobs=logprob,
            prompt_tokens=request.seq.num_prompt_tokens, completion_tokens=request.num_output,
            cached_tokens=request.cached_tokens,
            prompt_logprobs=request.prompt_logprob_entries if first and request.prompt_logprobs is not None else None,
        )  # fmt: skip
