"""AdamW for pure-bf16 training (`--precision bf16-pure`): weights, gradients and both moments in bf16
(8 bytes per parameter instead of the 16 of fp32 master weights), the arithmetic in fp32 a chunk at a time,
and the new weights rounded to bf16 *stochastically*.

Why stochastic: bf16 keeps 8 significant bits, so a weight of 0.02 can only move in steps of 1.2e-4, while
AdamW's update at lr 1e-5 is about 1e-5: rounded to nearest, every such update is lost and training stalls
without a sign. Rounded up or down at random, with the probability of each set by the distance, the weight
moves by the update on average (the rounding is unbiased). The random bits come from the optimizer's own
seeded generator: the same on every process (DDP replicas stay identical), saved with each checkpoint by the
trainer (resume is bit-exact). The moments are rounded to nearest (they change by 5-10% a step, far above
bf16's resolution; as torchao and torchtune store them).

    optimizer = BF16AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, seed=42)
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

# Elements per fp32 piece: small enough to stay in cache on a CPU, large enough for few kernel launches on a GPU.
_CHUNK = {"cpu": 1 << 17}
_GPU_CHUNK = 1 << 24


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the CPU update on one thread: a dozen memory-bound ops per chunk gain little from a second thread,
    and on shared cores every parallel op can stall on a descheduled OpenMP thread (measured here: 90 ms on one
    thread against 2-12 s on two for 10 M parameters, the machine loaded)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stochastic_round_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """fp32 `x` rounded to bf16, away from zero with probability (distance to the value below) / (gap), so
    E[result] = x. 16 random bits are added below bf16's last bit and the sum truncated to bf16."""
    noise = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_(generator=generator)
    bits = x.contiguous().view(torch.int32) + noise.bitwise_and_(0xFFFF)
    return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def _local(tensor: Tensor) -> Tensor:
    """The shard this process holds (FSDP's DTensor) or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _pieces(tensors: tuple[Tensor, ...], size: int) -> list[tuple[Tensor, ...]]:
    if not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [tuple(t[start : start + size] for t in flat) for start in range(0, flat[0].numel(), size)]


class BF16AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction, same hyper-parameters) for
    bfloat16 parameters, with bfloat16 moments; `stochastic_rounding=False` rounds the weights to nearest
    (what plain AdamW on bf16 parameters does)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        seed: int = 0,
        stochastic_rounding: bool = True,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        params = [p for group in self.param_groups for p in group["params"]]
        wrong = sorted({str(p.dtype) for p in params if p.dtype != torch.bfloat16})
        if wrong:
            raise ValueError(f"BF16AdamW trains bfloat16 parameters only, got {', '.join(wrong)}")
        self.stochastic_rounding = stochastic_rounding
        self.generator = torch.Generator(device=_local(params[0]).device if params else "cpu").manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _one_cpu_thread(self.generator.device):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] += 1
                    tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                    self._update(tuple(_local(t) for t in tensors), group, float(state["step"]))
        return loss

    def _update(self, tensors: tuple[Tensor, ...], group: dict, step: int | float) -> None:
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step_size, root2 = lr / (1 - beta1**step), math.sqrt(1 - beta2**step)
        size = _CHUNK.get(tensors[0].device.type, _GPU_CHUNK)
        for weight, grad, exp_avg, exp_avg_sq in _pieces(tensors, size):
            g = grad.float()
            m = exp_avg.float().lerp_(g, 1 - beta1)
            v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)
            new = weight.float().mul_(1 - lr * decay).addcdiv_(m, v.sqrt_().div_(root2).add_(eps), value=-step_size)
            weight.copy_(stochastic_round_bf16(new, self.generator) if self.stochastic_rounding else new)
