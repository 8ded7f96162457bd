"""What each optimizer step trains on, and its learning rate: pure functions of the settings and the seed.

Every process can compute every step's batches (the data order is a function of the seed and the epoch),
so resuming needs only the step number, and the loss of a step is normalised by the trained tokens of
all its micro-batches on all processes without any communication:

    plan = make_plan(num_examples=1000, batch_size=2, grad_accum=8, world=1, epochs=3, max_steps=-1, ...)
    for indices in plan.micro_batches(step, rank): ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Plan:
    """Data order and step count of a run.

    A step is `grad_accum` micro-batches of `batch_size` samples on each of `world` processes, drawn from one
    stream that runs over the epochs (a step may straddle two epochs). Each epoch is a permutation seeded by
    (seed, epoch), padded by wrapping around to a multiple of batch_size x world.
    """

    num_examples: int
    batch_size: int
    grad_accum: int
    world: int
    total_steps: int
    warmup_steps: int
    seed: int
    _orders: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per process per epoch."""
        return math.ceil(self.num_examples / (self.batch_size * self.world))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_examples, generator=generator)
            need = self.batches_per_epoch * self.batch_size * self.world
            self._orders = {epoch: order.repeat(math.ceil(need / self.num_examples))[:need]}  # keep one epoch
        return self._orders[epoch]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The sample indices of each micro-batch process `rank` runs in optimizer step `step`."""
        out = []
        for k in range(step * self.grad_accum, (step + 1) * self.grad_accum):
            epoch, position = divmod(k, self.batches_per_epoch)
            chunk = position * self.world + rank
            order = self.epoch_order(epoch)
            out.append(order[chunk * self.batch_size : (chunk + 1) * self.batch_size].tolist())
        return out

    def epoch_at(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps (fractional)."""
        return step * self.grad_accum / self.batches_per_epoch


def make_plan(
    num_examples: int, batch_size: int, grad_accum: int, world: int, epochs: float, max_steps: int,
    warmup_ratio: float, warmup_steps: int, seed: int,
) -> Plan:  # fmt: skip
    """Steps: `max_steps` if > 0, else the full accumulation groups in `epochs` passes (at least one)."""
    if num_examples < 1:
        raise ValueError("no training samples")
    plan = Plan(num_examples, batch_size, grad_accum, world, 0, 0, seed)
    total = max_steps if max_steps > 0 else max(1, int(epochs * plan.batches_per_epoch) // grad_accum)
    plan.total_steps = total
    plan.warmup_steps = warmup_steps if warmup_steps > 0 else math.ceil(total * warmup_ratio)
    return plan


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based), as transformers' schedules:
    linear warm-up from 0 over `warmup` steps, then cosine/linear decay to 0 at `total`, or constant."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
