"""The serving engine's step planner: which requests run this step and on which KV blocks. Pure Python, no
model: sequences and a `BlockAllocator` in, a `StepPlan` out (vLLM's schedule()/update_from_output()).

A sequence's tokens are its prompt followed by what it generated; `num_computed` of them have K/V in its
blocks. One step:

1. Decode: each running sequence with one token left to compute (the last one sampled) decodes it. If it
   needs a new block and none is free, the newest running request is preempted: its blocks are freed and it
   goes back to the head of the queue, to recompute its tokens (prompt and output so far) when readmitted —
   usually from the prefix cache, which still holds its full blocks. Never an error, never a lost request.
2. Admit waiting requests, oldest first, while fewer than `max_num_seqs` run and the pool has blocks for all
   their uncomputed tokens (a prompt's cached prefix blocks are shared, not allocated; a small watermark of
   blocks stays free for running requests to grow into).
3. Prefill: requests with more than one token left get their next chunk (`prefill_chunk` tokens each,
   `prefill_budget` padded tokens in all), oldest first, in one batch beside the decodes.

    scheduler = Scheduler(BlockAllocator(1024), block_size=16, max_num_seqs=8)
    scheduler.add(Sequence("r1", prompt_ids, max_tokens=len(prompt_ids) + 64))
    plan = scheduler.schedule()        # run plan.prefills and plan.decodes through the model, then
    scheduler.commit(plan)             # ... their K/V are in place; sample, append tokens, finish()
"""

from __future__ import annotations

import bisect
import collections
import itertools
from dataclasses import dataclass, field

from .block_manager import BlockAllocator, block_hashes


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it."""

    seq_id: str
    token_ids: list[int]  # the prompt, then each generated token as the engine appends it
    max_tokens: int  # prompt + max_new_tokens: the most it will ever hold
    alpha: float = 1.0  # dynamic-NTK alpha of its keys (part of its blocks' identity in the prefix cache)
    use_prefix_cache: bool = True  # False: compute every token (e.g. when each prompt position's logits are wanted)
    num_prompt_tokens: int = field(init=False)
    arrival: int = -1  # order of arrival: admitted oldest first, preempted newest first
    num_computed: int = 0  # leading tokens whose K/V are in block_ids
    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of full blocks of token_ids, made as needed
    num_registered: int = 0  # leading blocks offered to the prefix cache
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    status: str = "waiting"  # waiting | running | finished

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class Chunk:
    """Tokens [start, start + length) of a sequence, computed in this step's prefill batch."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes(self) -> bool:
        """Whether it reaches the sequence's last token (whose logits give the next token)."""
        return self.start + self.length == len(self.seq.token_ids)


@dataclass
class StepPlan:
    prefills: list[Chunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)  # one token each, at position num_computed
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int = 8, prefill_chunk: int = 256,
                 prefill_budget: int = 1024, watermark: float = 0.01) -> None:  # fmt: skip
        if max_num_seqs < 1 or prefill_chunk < 1 or prefill_budget < 1:
            raise ValueError("max_num_seqs, prefill_chunk and prefill_budget must be >= 1")
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.prefill_chunk, self.prefill_budget = max_num_seqs, prefill_chunk, prefill_budget
        self.watermark_blocks = max(1, int(watermark * allocator.num_blocks)) if allocator.num_blocks > 1 else 0
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in arrival order
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache (first admissions)
        self.prefix_hit_tokens = 0  # of those, found there

    # ---- sizes ---------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_blocks(self, max_tokens: int) -> int:
        """Blocks a request of `max_tokens` (prompt + max_new_tokens) holds at most: its last token is never
        fed back, so its K/V are never stored."""
        return self.blocks_for(max(max_tokens - 1, 1))

    def fits_alone(self, max_tokens: int) -> bool:
        return self.max_blocks(max_tokens) <= self.allocator.num_blocks

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- requests ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not self.fits_alone(seq.max_tokens):
            raise ValueError(f"{seq.max_tokens} tokens need {self.max_blocks(seq.max_tokens)} KV blocks; the pool "
                             f"has {self.allocator.num_blocks}")  # fmt: skip
        seq.arrival, seq.status = next(self._arrivals), "waiting"
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """The request ended (stopped, aborted, client gone): its blocks go back at once."""
        if seq.status == "running":
            self.running.remove(seq)
        elif seq.status == "waiting":
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = "finished"

    # ---- the plan ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        for seq in list(self.running):  # oldest first; preemption takes the newest
            if seq.status == "running" and seq.num_uncomputed == 1 and self._make_room(seq, plan):
                plan.decodes.append(seq)
        if not plan.preempted:  # memory is short: let the running ones finish first
            self._admit(plan)
        # a newcomer with one token to compute decodes it (its block is allocated)
        plan.decodes += [seq for seq in plan.admitted if seq.num_uncomputed == 1]
        longest = 0
        for seq in self.running:
            if seq.num_uncomputed == 1:
                continue
            length = min(self.prefill_chunk, seq.num_uncomputed)
            width = max(longest, length)
            if plan.prefills and width * (len(plan.prefills) + 1) > self.prefill_budget:
                break
            plan.prefills.append(Chunk(seq, seq.num_computed, length))
            longest = width
        return plan

    def commit(self, plan: StepPlan) -> None:
        """The model has written the planned tokens' K/V: count them computed, and offer the blocks they
        filled to the prefix cache."""
        for chunk in plan.prefills:
            chunk.seq.num_computed += chunk.length
            self._register(chunk.seq)
        for seq in plan.decodes:
            seq.num_computed += 1
            self._register(seq)

    # ---- internals -----------------------------------------------------------------------------
    def _make_room(self, seq: Sequence, plan: StepPlan) -> bool:
        """Give `seq` a block for its next token, preempting the newest running requests while the pool is
        empty; False if `seq` itself was the newest, and is preempted."""
        while seq.num_computed >= len(seq.block_ids) * self.block_size:
            if self.allocator.num_free:
                seq.block_ids += self.allocator.allocate(1)
                return True
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = "waiting"
        seq.num_preemptions += 1
        self.num_preemptions += 1
        position = bisect.bisect_left([s.arrival for s in self.waiting], seq.arrival)
        self.waiting.insert(position, seq)  # ahead of everyone who arrived later
        plan.preempted.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_ids)
        seq.block_ids, seq.num_computed, seq.num_registered = [], 0, 0

    def _admit(self, plan: StepPlan) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self._cached_prefix(seq)
            new = self.blocks_for(len(seq.token_ids)) - len(hits)
            reserve = self.watermark_blocks if self.running else 0
            if new + self.allocator.num_reclaimable(hits) + reserve > self.allocator.num_free:
                return  # the oldest waits for room; nobody overtakes it
            self.waiting.popleft()
            self.allocator.share(hits)
            seq.block_ids = hits + self.allocator.allocate(new)
            seq.num_computed, seq.num_registered = len(hits) * self.block_size, len(hits)
            if seq.num_cached_tokens is None:  # first admission: what the client's prompt found cached
                seq.num_cached_tokens = seq.num_computed
                self.prefix_query_tokens += seq.num_prompt_tokens
                self.prefix_hit_tokens += seq.num_computed
            seq.status = "running"
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            plan.admitted.append(seq)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of the sequence's longest cached prefix, leaving at least its last token to compute
        (its logits are needed), so the block that token lands in is never a shared one."""
        if not self.allocator.enable_prefix_caching or not seq.use_prefix_cache:
            return []
        usable = (len(seq.token_ids) - 1) // self.block_size
        seq.hashes = block_hashes(seq.token_ids[: usable * self.block_size], self.block_size, seq.alpha, seq.hashes)
        return self.allocator.lookup(seq.hashes[:usable])

    def _register(self, seq: Sequence) -> None:
        full = seq.num_computed // self.block_size
        if not self.allocator.enable_prefix_caching or full <= seq.num_registered:
            return
        seq.hashes = block_hashes(seq.token_ids[: full * self.block_size], self.block_size, seq.alpha, seq.hashes)
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.block_ids[i], seq.hashes[i])
        seq.num_registered = full
