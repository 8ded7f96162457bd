"""The int4 scheme's lm_head: int6 (what `quantization="int4"` loads) against an int8 per-channel head, in one model.

    python benchmarks/bench_lm_head.py --model /tmp/q18/ckpt --rounds 20
    python benchmarks/bench_lm_head.py --model /tmp/q18/ckpt --kernel-rounds 30 --quant-kernel vnni

Loads the checkpoint with `quantization="int4"` (blocks and embedding int4, lm_head int6), builds an int8
per-channel head from the checkpoint's own float lm_head (the loader's round-to-nearest), packs it onto huge pages
as the loader packs its own, and times `--steps` greedy tokens (`qwenlm.bench.run_qwenlm`, the fused step) with
each head in turn, swapping only `model.lm_head`, so every block weight is the same memory in both and both heads
run in the same phases of the host. Reports ms per decoded token, the per-round ratio (min-max) and each head's
bytes. With `--kernel-rounds N` it times the two heads' matrix-vector calls alone instead (one bf16 activation
row, cycling through 2 GiB of copies of each head on huge pages so every call streams from DRAM, the two
alternated round by round) under `--quant-kernel`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from safetensors import safe_open

from qwenlm.bench import run_qwenlm
from qwenlm.kernels import QuantizedWeight, linear_quantized
from qwenlm.kernels.cpu import set_quant_kernel
from qwenlm.model import huge_pages, load_model
from qwenlm.model.loading import find_checkpoint_files
from qwenlm.quant.linear import QuantLinear
from qwenlm.quant.onthefly import quantize_packed


def float_lm_head(folder: str) -> torch.Tensor:
    """lm_head.weight as the checkpoint stores it (the loader's own lookup of which file holds it)."""
    with safe_open(str(find_checkpoint_files(folder).tensors["lm_head.weight"]), framework="pt") as f:
        return f.get_tensor("lm_head.weight")


def head_bytes(head: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (head.qdata, head.scales, head.zeros))


def kernel_rounds(heads: dict[str, QuantLinear], rounds: int) -> dict[str, list[float]]:
    """ms per lm_head call of each head, from DRAM (2 GiB of copies each), alternated round by round."""
    copies: dict[str, list[QuantizedWeight]] = {}
    for name, head in heads.items():
        qw = head.qweight()
        count = -(-(2 << 30) // head_bytes(head))
        copies[name] = [QuantizedWeight(*(huge_pages.copy(t) for t in (qw.qdata, qw.scales, qw.zeros)), qw.bits,
                                        qw.group_size, qw.in_features) for _ in range(count)]  # fmt: skip
    x = torch.randn(1, next(iter(heads.values())).in_features).bfloat16()
    ms: dict[str, list[float]] = {name: [] for name in heads}
    order = list(heads)
    with torch.inference_mode():
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                for qw in copies[name]:
                    linear_quantized(x, qw)
                ms[name].append((time.perf_counter() - start) / len(copies[name]) * 1e3)
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a float checkpoint folder")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=32, help="greedy tokens per round")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--kernel-rounds", type=int, default=0, help="time the heads' kernel calls alone, N rounds")
    p.add_argument("--quant-kernel", choices=("dpbf16", "vnni"), help="with --kernel-rounds (default: the CPU's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    model = load_model(args.model, quantization="int4", torch_dtype=dtype)
    heads = {"int6 g128 (int4 scheme)": model.lm_head}
    int8 = QuantLinear(quantize_packed(float_lm_head(args.model), 8, -1, True))
    huge_pages.pack(int8)
    heads["int8 per channel"] = int8
    assert heads["int6 g128 (int4 scheme)"].bits == 6
    if args.kernel_rounds:
        if args.quant_kernel:
            set_quant_kernel(args.quant_kernel)
        report(
            heads, kernel_rounds(heads, args.kernel_rounds), f"lm_head call ({args.quant_kernel or 'default'} kernel)"
        )
        return
    ids = torch.tensor([[1000]])
    ms: dict[str, list[float]] = {name: [] for name in heads}
    tokens: dict[str, list[int]] = {}
    for name, head in heads.items():  # warm-up, and each head's greedy tokens
        model.lm_head = head
        tokens[name] = run_qwenlm(model, ids, 8).token_ids[0]
    order = list(heads)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            model.lm_head = heads[name]
            timing = run_qwenlm(model, ids, args.steps + 1)
            ms[name].append((timing.total_s - timing.ttft_s) / args.steps * 1e3)
    print(f"{args.model}, {args.dtype}, {args.threads} threads, {args.rounds} rounds of {args.steps} tokens")
    report(heads, ms, "ms per token")
    int6_name, int8_name = order
    same = sum(a == b for a, b in zip(tokens[int6_name], tokens[int8_name], strict=True))
    print(f"first 8 greedy tokens equal between the heads: {same}/8 (random weights: near-tied logits)")


def report(heads: dict[str, QuantLinear], ms: dict[str, list[float]], what: str) -> None:
    """A table of each head's bytes and times, and the int8 / int6 ratio per round."""
    int6_name, int8_name = heads
    print(f"| lm_head | MB | {what}, median (min-max) |")
    print("|---|---|---|")
    for name, head in heads.items():
        print(f"| {name} | {head_bytes(head) / 1e6:.0f} | {statistics.median(ms[name]):.2f} "
              f"({min(ms[name]):.2f}-{max(ms[name]):.2f}) |")  # fmt: skip
    ratios = [a / b for a, b in zip(ms[int8_name], ms[int6_name], strict=True)]
    spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
    print(f"int8 head / int6 head time per round: {statistics.median(ratios):.3f} ({spread})")


if __name__ == "__main__":
    main()
