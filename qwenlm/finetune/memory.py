"""Memory estimate of a finetuning run from config.json alone (`qwenlm finetune --dry-run`), before loading.

Counted: weights as each method holds them (full: fp32 master weights, or bf16 ones with bf16-pure), gradients
and AdamW moments of what is trained (16 bytes per trained parameter, 8 with bf16-pure), saved
activations (one hidden state per block with gradient checkpointing, else every block's), one block's
working set, one chunk of fp32 logits, and ~1 GiB for the runtime. Sharding (FSDP, ZeRO) divides what it
shards. An estimate, not a measurement: `benchmarks/bench_finetune.py` measures.

    estimate = estimate_memory(TrainArgs(model="Qwen-1_8B-Chat", data="d.json", output="o", method="lora"))
    print(estimate.report())
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..model.config import QwenConfig
from ..quant.config import QuantizationConfig
from .args import TrainArgs

GiB = 1 << 30
RUNTIME_BYTES = GiB  # torch, tokenizer, data, allocator slack


@dataclass
class MemoryEstimate:
    """Bytes per part, the total, and what the device has."""

    parts: dict[str, float] = field(default_factory=dict)
    available: float | None = None
    where: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def report(self) -> str:
        lines = [f"  {name:<28} {value / GiB:8.2f} GiB" for name, value in self.parts.items()]
        lines.append(f"  {'total (estimate)':<28} {self.total / GiB:8.2f} GiB")
        if self.available is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {'available on ' + self.where:<28} {self.available / GiB:8.2f} GiB: {verdict}")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def _param_counts(config: QwenConfig, lora_r: int, targets: tuple[str, ...]) -> dict[str, int]:
    h, f, v, layers = config.hidden_size, config.mlp_width, config.vocab_size, config.num_hidden_layers
    proj = config.kv_channels * config.num_attention_heads
    linears = {"attn.c_attn": (h, 3 * proj), "attn.c_proj": (proj, h), "mlp.w1": (h, f), "mlp.w2": (h, f),
               "mlp.c_proj": (f, h)}  # fmt: skip
    block_linear = sum(i * o for i, o in linears.values())
    adapted = [io for name, io in linears.items() if any(name.endswith(t) for t in targets)]
    return {
        "embedding": v * h, "lm_head": v * h, "block_linear": layers * block_linear,
        "small": layers * (3 * proj + 2 * h) + h, "lora": layers * sum(lora_r * (i + o) for i, o in adapted),
    }  # fmt: skip


def parameter_count(config: QwenConfig) -> int:
    """Parameters of the model (whatever it is stored as)."""
    counts = _param_counts(config, 0, ())
    return counts["embedding"] + counts["lm_head"] + counts["block_linear"] + counts["small"]


def available_memory(device: str) -> tuple[float | None, str]:
    """Free bytes where training runs: the GPU's, or the system's available memory."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        index = torch.device(device if device.startswith("cuda") else "cuda").index or 0
        return float(torch.cuda.mem_get_info(index)[0]), f"cuda:{index}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, "cpu"
    except OSError:
        pass
    return None, "cpu"


def _activations(config: QwenConfig, tokens: int, act: int, checkpointing: bool, lora: bool) -> tuple[float, float]:
    """(saved between forward and backward, one block's working set) in bytes for `tokens` tokens."""
    h, f = config.hidden_size, config.mlp_width
    # per token in a block: norms, qkv, fp32 rope copies of q/k, attention out, residuals, 4 MLP tensors
    per_token = act * (12 * h + 4 * f) + 4 * 2 * h + (act * (3 * h + f) if lora else 0)  # + LoRA dropout inputs
    block = tokens * per_token
    saved = config.num_hidden_layers * (tokens * h * act if checkpointing else block)
    return saved, block


def estimate_memory(args: TrainArgs, world: int | None = None, device: str | None = None) -> MemoryEstimate:
    """Estimate the peak memory of `args`'s run per process (reads only config.json); compared with what
    `device` (default `args.device`) has free."""
    config = QwenConfig.from_pretrained(args.model)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    counts = _param_counts(config, args.lora.r, args.lora.target_modules)
    base = parameter_count(config)
    precision = args.precision if args.precision != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
    act = 4 if precision == "fp32" else 2
    estimate = MemoryEstimate()
    shard = world if (args.fsdp or args.deepspeed) else 1
    if args.method == "full" and args.pure_bf16:  # no master copy: weights, gradients, moments all bf16
        estimate.parts["weights (bf16)"] = 2 * base / shard
        estimate.parts["gradients (bf16)"] = 2 * base / shard
        estimate.parts["AdamW moments (bf16)"] = 4 * base / shard
        trained = base
    elif args.method == "full":
        estimate.parts["weights (fp32 master)"] = 4 * base / shard
        estimate.parts["gradients (fp32)"] = 4 * base / shard
        estimate.parts["AdamW moments (fp32)"] = 8 * base / shard
        if act == 2:
            estimate.parts["bf16/fp16 weight copies"] = 2 * base / shard
        trained = base
    else:
        if args.method == "lora":
            weights = act * base
        else:  # int4 blocks (~0.56 B/param with group-128 scales); wte/lm_head float (GPTQ) or quantized
            gptq = QuantizationConfig.from_pretrained(args.model) is not None  # (on the fly: lm_head int6, ~0.8 B)
            head = (
                act * (counts["embedding"] + counts["lm_head"])
                if gptq
                else 0.56 * counts["embedding"] + 0.8 * counts["lm_head"]
            )
            weights = 0.56 * counts["block_linear"] + head + act * counts["small"]
        rows = 2 * 3 * config.hidden_size
        trained = counts["lora"] + rows
        estimate.parts[f"base weights ({args.method})"] = weights / (world if args.fsdp else 1)
        estimate.parts["adapter + grads + AdamW"] = (8 if args.pure_bf16 else 16) * trained / shard
    tokens = args.batch_size * args.model_max_length
    saved, block = _activations(config, tokens, act, args.gradient_checkpointing, args.method != "full")
    estimate.parts["activations (saved)"] = saved
    estimate.parts["activations (one block)"] = block
    chunk = min(args.loss_chunk_size, tokens)
    estimate.parts["logits chunk (fp32 + grad)"] = 3 * chunk * config.vocab_size * 4
    estimate.parts["runtime"] = RUNTIME_BYTES
    estimate.available, estimate.where = available_memory(device or args.device)
    estimate.notes.append(
        f"{trained / 1e6:.1f} M trained parameters of {base / 1e6:.0f} M; {tokens} tokens per micro-batch "
        f"({args.batch_size} x {args.model_max_length}); precision {precision}"
    )
    if args.pure_bf16:
        estimate.notes.append(
            "bf16-pure: no fp32 master copy (8 bytes per trained parameter, not 16), for full finetuning on one GPU "
            "or a small machine; weight updates are rounded to bf16 stochastically (small ones are kept on "
            "average), but gradients and AdamW moments in bf16 are coarser than fp32 (--precision bf16)"
        )
    if args.method == "full" and estimate.fits is False:
        if args.pure_bf16:
            advice = "full finetuning in bf16-pure keeps 8 bytes per parameter: try"
        else:
            pure = estimate_memory(replace(args, precision="bf16-pure"), world, device)
            advice = (f"full finetuning keeps 16 bytes per parameter: try --precision bf16-pure (8 bytes, "
                      f"{pure.total / GiB:.1f} GiB),")  # fmt: skip
        estimate.notes.append(
            f"{advice} --method lora or qlora, or shard it over several processes (torchrun ... --fsdp / "
            "--deepspeed ds_zero3.json)"
        )
    return estimate
