"""Decode speed with the weights on 4 KiB pages against the same weights on 2 MiB huge pages, in one process.

    python benchmarks/bench_huge_pages.py --model /tmp/q18/ckpt --quantization int8 --rounds 4

Loads the checkpoint twice with QWENLM_HUGE_PAGES=0 (4 KiB pages), moves the second copy onto huge pages
(`qwenlm.model.huge_pages.move_weights`, what the loader does by default), then times `--steps` greedy tokens
of each (`generate_steps`, the fused step) alternately, so both run on the same host phase. Also reports the
read probe (`measure_bandwidth_gbps`) on both page sizes. Needs memory for two copies of the weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["QWENLM_HUGE_PAGES"] = "0"  # both copies load on 4 KiB pages; one is moved below

import torch  # noqa: E402

from qwenlm.bench import measure_bandwidth_gbps  # noqa: E402
from qwenlm.generation.generate import generate_steps  # noqa: E402
from qwenlm.generation.params import SamplingParams  # noqa: E402
from qwenlm.model import huge_pages, load_model  # noqa: E402


def use_huge_pages(on: bool) -> None:
    os.environ["QWENLM_HUGE_PAGES"] = "1" if on else "0"
    huge_pages._madvise.cache_clear()


def ms_per_token(model, steps: int) -> float:
    params = SamplingParams(max_new_tokens=steps + 1, do_sample=False, eos_token_ids=(), stop_words_ids=())
    with torch.inference_mode():
        stamps = [time.perf_counter() for _ in generate_steps(model, torch.tensor([[1, 2, 3]]), params, compile=False)]
    return (stamps[-1] - stamps[0]) / steps * 1e3


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
    small = load_model(args.model, **kwargs)
    huge = load_model(args.model, **kwargs)
    use_huge_pages(True)
    if not huge_pages.available():
        raise SystemExit("no transparent huge pages here (Linux with THP 'madvise' or 'always' needed)")
    moved = huge_pages.move_weights(huge)
    probe = {}
    for on in (False, True):
        use_huge_pages(on)
        probe[on] = measure_bandwidth_gbps(size_mb=2048)
    times: dict[str, list[float]] = {"4 KiB": [], "2 MiB": []}
    ms_per_token(small, 4), ms_per_token(huge, 4)  # warm-up: plans built, caches bound
    for r in range(args.rounds):
        order = [("4 KiB", small), ("2 MiB", huge)]
        for name, model in order if r % 2 == 0 else order[::-1]:
            times[name].append(ms_per_token(model, args.steps))
    print(f"{args.quantization}: {moved / 2**30:.2f} GiB of weights moved; read probe 4 KiB {probe[False]:.1f} GB/s, "
          f"2 MiB {probe[True]:.1f} GB/s")  # fmt: skip
    for name, values in times.items():
        print(f"  {name} pages: {statistics.median(values):.2f} ms/token ({min(values):.2f}-{max(values):.2f})")
    ratios = [a / b for a, b in zip(times["4 KiB"], times["2 MiB"], strict=True)]
    print(f"  speed-up on huge pages: {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) per round")


if __name__ == "__main__":
    main()
