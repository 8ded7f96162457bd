"""The step planner, with no model: a fake runner stands in for the forward pass and checks, at every step,
that each sequence's blocks really hold its own prefix (so sharing, reclaiming and preemption never hand a
request someone else's keys). Admission by free blocks, preemption of the newest with recompute, prefix
sharing, the NTK alpha in the prefix identity, aborts, and no leaked block after 10k requests."""

from __future__ import annotations

import random

import pytest

from qwenlm.engine.block_manager import BlockAllocator
from qwenlm.engine.scheduler import Scheduler, Sequence, StepPlan

BS = 4  # small blocks: many block boundaries in short sequences


class FakeRunner:
    """The model's part of a step: writes each computed token's "K/V" (the identity of its prefix) into the
    block that holds it, reads every earlier position through the block table and checks it, then samples a
    token that depends on the whole sequence (as a model's would)."""

    def __init__(self, scheduler: Scheduler, max_new: dict[str, int]) -> None:
        self.scheduler, self.max_new = scheduler, max_new
        self.pool: dict[tuple[int, int], tuple] = {}
        self.outputs: dict[str, list[int]] = {}

    def _kv(self, seq: Sequence, position: int) -> tuple:
        return (seq.alpha, tuple(seq.token_ids[: position + 1]))

    def _compute(self, seq: Sequence, start: int, length: int) -> None:
        for p in range(start):  # what attention reads: every earlier position, through the table
            assert self.pool.get((seq.block_ids[p // BS], p % BS)) == self._kv(seq, p), (seq.seq_id, p)
        for p in range(start, start + length):
            self.pool[(seq.block_ids[p // BS], p % BS)] = self._kv(seq, p)

    def step(self) -> StepPlan:
        plan = self.scheduler.schedule()
        sampled = []
        for chunk in plan.prefills:
            self._compute(chunk.seq, chunk.start, chunk.length)
            if chunk.completes:
                sampled.append(chunk.seq)
        for seq in plan.decodes:
            self._compute(seq, seq.num_computed, 1)
            sampled.append(seq)
        self.scheduler.commit(plan)
        for seq in sampled:
            token = hash((seq.alpha, tuple(seq.token_ids))) % 50  # few distinct tokens: prefixes repeat
            seq.token_ids.append(token)
            if len(seq.token_ids) - seq.num_prompt_tokens >= self.max_new[seq.seq_id]:
                self.outputs[seq.seq_id] = seq.token_ids[seq.num_prompt_tokens :]
                self.scheduler.finish(seq)
        return plan


def _scheduler(num_blocks: int, **kwargs) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), block_size=BS, **kwargs)


def _add(scheduler: Scheduler, runner: FakeRunner, name: str, prompt: list[int], new: int, alpha: float = 1.0):
    seq = Sequence(name, list(prompt), max_tokens=len(prompt) + new, alpha=alpha)
    runner.max_new[name] = new
    scheduler.add(seq)
    return seq


def _run(scheduler: Scheduler, runner: FakeRunner) -> list[StepPlan]:
    plans = []
    while scheduler.has_work():
        plans.append(runner.step())
        assert len(scheduler.running) <= scheduler.max_num_seqs
    return plans


def test_admission_waits_for_free_blocks_and_max_num_seqs_only_caps_concurrency():
    scheduler = _scheduler(7, max_num_seqs=2)
    runner = FakeRunner(scheduler, {})
    a = _add(scheduler, runner, "a", list(range(10)), 2)  # 3 blocks
    b = _add(scheduler, runner, "b", list(range(20, 30)), 2)  # 3 more, leaving the 1-block watermark
    c = _add(scheduler, runner, "c", [1, 2], 2)
    plan = runner.step()
    assert plan.admitted == [a, b] and c.status == "waiting"  # capped by max_num_seqs=2 (and the watermark)
    assert scheduler.allocator.num_used == 6
    d = _scheduler(7, max_num_seqs=8)
    _add(d, runner, "x", list(range(10)), 2)
    _add(d, runner, "y", list(range(10, 22)), 2)  # 3 + 3 blocks + the watermark of 1 = all 7: admitted
    _add(d, runner, "z", list(range(30, 35)), 2)  # 2 blocks: must wait, whatever max_num_seqs allows
    assert [s.seq_id for s in d.schedule().admitted] == ["x", "y"] and d.allocator.num_free == 1
    _run(scheduler, runner)
    assert sorted(runner.outputs) == ["a", "b", "c"] and scheduler.allocator.num_used == 0


def test_a_request_larger_than_the_pool_is_refused_up_front():
    scheduler = _scheduler(4)
    scheduler.add(Sequence("ok", [1] * 10, max_tokens=17))  # 16 tokens are ever stored: 4 blocks
    with pytest.raises(ValueError, match="18 tokens need 5 KV blocks; the pool has 4"):
        scheduler.add(Sequence("big", [1] * 10, max_tokens=18))


def test_running_out_of_blocks_preempts_the_newest_and_its_output_is_unchanged():
    prompts = {f"r{i}": [i] * (3 + 2 * i) for i in range(4)}
    roomy = _scheduler(100, max_num_seqs=4)
    free_run = FakeRunner(roomy, {})
    for name, prompt in prompts.items():
        _add(roomy, free_run, name, prompt, 12)
    _run(roomy, free_run)
    assert roomy.num_preemptions == 0

    tight = _scheduler(12, max_num_seqs=4, prefill_chunk=3)
    runner = FakeRunner(tight, {})
    seqs = [_add(tight, runner, name, prompt, 12) for name, prompt in prompts.items()]
    plans = _run(tight, runner)
    assert tight.num_preemptions > 0 and seqs[0].num_preemptions == 0  # the oldest is never the victim
    first_victim = next(p.preempted[0] for p in plans if p.preempted)
    assert first_victim is max((s for s in seqs if s.num_preemptions), key=lambda s: s.arrival)
    assert runner.outputs == free_run.outputs  # recomputed from scratch, the same tokens
    tight.allocator.check()
    assert tight.allocator.num_used == 0


def test_a_shared_prefix_is_computed_once_and_read_by_both():
    scheduler = _scheduler(20)
    runner = FakeRunner(scheduler, {})
    system = list(range(100, 113))  # 13 tokens: 3 full blocks
    first = _add(scheduler, runner, "first", system + [1, 2], 3)
    _run(scheduler, runner)
    second = _add(scheduler, runner, "second", system + [7, 8, 9], 3)
    exact = _add(scheduler, runner, "exact", system[:12], 3)  # the whole prompt is cached blocks
    plan = runner.step()
    assert second.num_cached_tokens == 12 and plan.prefills[0].start == 12
    assert exact.num_cached_tokens == 8  # its last token is recomputed, outside any shared block
    assert second.block_ids[:2] == exact.block_ids[:2] and scheduler.allocator.refs[second.block_ids[0]] == 2
    assert first.status == "finished"
    _run(scheduler, runner)
    assert scheduler.prefix_hit_tokens == 20 and scheduler.prefix_query_tokens == 15 + 16 + 12


def test_prefixes_cached_under_another_ntk_alpha_are_not_reused():
    scheduler = _scheduler(20)
    runner = FakeRunner(scheduler, {})
    _add(scheduler, runner, "alpha1", list(range(12)), 2, alpha=1.0)
    _run(scheduler, runner)
    other = _add(scheduler, runner, "alpha7", list(range(12)) + [5], 2, alpha=7.0)
    same = _add(scheduler, runner, "alpha1-again", list(range(12)) + [5], 2, alpha=1.0)
    runner.step()
    assert other.num_cached_tokens == 0 and same.num_cached_tokens == 12


def test_abort_returns_blocks_at_once_running_or_waiting():
    scheduler = _scheduler(8, max_num_seqs=1)
    runner = FakeRunner(scheduler, {})
    a = _add(scheduler, runner, "a", list(range(9)), 20)
    b = _add(scheduler, runner, "b", [3] * 5, 5)
    runner.step()
    assert a.status == "running" and scheduler.allocator.num_used == 3
    scheduler.finish(a)  # the client hung up
    scheduler.finish(b)  # still queued
    assert scheduler.allocator.num_used == 0 and not scheduler.has_work()


def test_no_block_leaks_after_10k_requests():
    """Random prompts (many sharing prefixes), lengths, aborts and a pool small enough to preempt; every
    request ends exactly once, nothing is lost, and the pool is whole again."""
    rng = random.Random(0)
    scheduler = _scheduler(20, max_num_seqs=6, prefill_chunk=8, prefill_budget=24)
    runner = FakeRunner(scheduler, {})
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 12))] for _ in range(8)]
    live: list[Sequence] = []
    aborted = 0
    for i in range(10_000):
        prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
        live.append(_add(scheduler, runner, str(i), prompt, rng.randrange(1, 8), alpha=rng.choice((1.0, 3.0))))
        if rng.random() < 0.05:
            victim = rng.choice(live)
            if victim.status != "finished":
                scheduler.finish(victim)
                aborted += 1
        if i % 3 == 0:
            runner.step()
            live = [s for s in live if s.status != "finished"]
    _run(scheduler, runner)
    assert len(runner.outputs) + aborted == 10_000 and scheduler.num_preemptions > 0
    assert scheduler.prefix_hit_tokens > 0
    scheduler.allocator.check()
    assert scheduler.allocator.num_used == 0
    assert all(ref == 0 for ref in scheduler.allocator.refs)
