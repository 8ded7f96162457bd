"""Decode speed with the weights on 4 KiB pages, on huge pages one tensor at a time, and in one huge-page arena.

    python benchmarks/bench_huge_pages.py --model /tmp/q18/ckpt --quantization int8 --rounds 4

Loads the checkpoint three times with QWENLM_HUGE_PAGES=0 (4 KiB pages), then places the second copy's tensors
on huge pages one allocation each (`huge_pages.copy`, as the loader places float weights: each tensor's first
and last partial 2 MiB ranges stay on 4 KiB pages, and what glibc serves from its heap never becomes huge) and
packs the third into one advised mapping (`huge_pages.pack`, as the loader places what quantization made).
Times `--steps` greedy tokens of each (`qwenlm.bench.run_qwenlm`, the fused step) in rotation, so all run on the same
host phase, and reports per-round ratios. Also reports the read probe (`measure_bandwidth_gbps`) on both page
sizes. Needs memory for three copies of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ["QWENLM_HUGE_PAGES"] = "0"  # every copy loads on 4 KiB pages; two are placed on huge pages below

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qwenlm.bench import measure_bandwidth_gbps, run_qwenlm  # noqa: E402
from qwenlm.model import huge_pages, load_model  # noqa: E402


def use_huge_pages(on: bool) -> None:
    os.environ["QWENLM_HUGE_PAGES"] = "1" if on else "0"
    huge_pages._madvise.cache_clear()


def per_tensor(model: nn.Module) -> None:
    """Each CPU parameter and buffer copied into an allocation of its own, advised for huge pages."""
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for name, tensor in slots.items():
                if tensor is not None and tensor.numel():
                    new = huge_pages.copy(tensor)
                    slots[name] = nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new


def ms_per_token(model, steps: int) -> float:
    timing = run_qwenlm(model, torch.tensor([[1, 2, 3]]), steps + 1, compile=False)
    return (timing.total_s - timing.ttft_s) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = dict(torch_dtype=torch.bfloat16, quantization=None if args.quantization == "none" else args.quantization)
    models = {name: load_model(args.model, progress=False, **kwargs) for name in ("4 KiB", "per tensor", "arena")}
    use_huge_pages(True)
    if not huge_pages.available():
        raise SystemExit("no transparent huge pages here (Linux with THP 'madvise' or 'always' needed)")
    per_tensor(models["per tensor"])
    packed = huge_pages.pack(models["arena"])
    probe = {}
    for on in (False, True):
        use_huge_pages(on)
        probe[on] = measure_bandwidth_gbps(size_mb=2048)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        ms_per_token(model, 4)  # warm-up: plans built, caches bound
    names = list(models)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # each placement first in turn
            times[name].append(ms_per_token(models[name], args.steps))
    print(f"{args.quantization}: {packed / 2**30:.2f} GiB of weights; read probe 4 KiB {probe[False]:.1f} GB/s, "
          f"2 MiB {probe[True]:.1f} GB/s")  # fmt: skip
    for name, values in times.items():
        print(f"  {name:10s}: {statistics.median(values):.2f} ms/token ({min(values):.2f}-{max(values):.2f})")
    for base in ("4 KiB", "per tensor"):
        ratios = [a / b for a, b in zip(times[base], times["arena"], strict=True)]
        print(f"  arena over {base}: {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) per round")
    print(json.dumps({"quantization": args.quantization, "probe_gbps": probe, "ms_per_token": times}))


if __name__ == "__main__":
    main()
