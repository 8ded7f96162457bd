"""How small can lm_head get? Logits of int6 and int4 heads against an int8 per-channel head.

    python benchmarks/lm_head_precision.py --model /tmp/q18/ckpt

The `quantization="int4"` scheme quantizes every block linear and the embedding to int4 but keeps lm_head at
higher precision (`quant.onthefly.recipe_for`), because the head's error goes straight into the logits. Issue
19's rule: a smaller head is offered only if its logits keep a cosine >= 0.999 against an int8 head's. This
script runs the float model once over random prompts, takes the final hidden states, and compares the logits of
each head (round-to-nearest, the loader's own `quantize_weight`): cosine per position (min and mean), and how
often the greedy token agrees with the int8 head's and with the float head's.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from qwenlm.model.loading import load_model
from qwenlm.quant.onthefly import quantize_weight

HEADS = (
    ("int8 per channel, sym", 8, -1, True),
    ("int6 g128, asym (the int4 scheme's)", 6, 128, False),
    ("int6 g128, sym", 6, 128, True),
    ("int6 per channel, sym", 6, -1, True),
    ("int4 g128, asym", 4, 128, False),
    ("int4 g64, asym", 4, 64, False),
    ("int4 g32, asym", 4, 32, False),
    ("int4 g128, sym", 4, 128, True),
)  # (name, bits, group size, symmetric); the first is the int8 head the others are held to


def dequantized(weight: Tensor, bits: int, group_size: int, sym: bool) -> Tensor:
    """The float weight a quantized head computes with: (q - zero) * scale per row and group."""
    q, scales, zeros = quantize_weight(weight, bits, group_size, sym)
    n, k = weight.shape
    groups = scales.shape[1]
    codes = q.float().view(n, groups, k // groups)
    return ((codes - zeros.float()[..., None]) * scales[..., None]).view(n, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a float checkpoint folder")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="positions per prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = load_model(args.model, torch_dtype=torch.float32)
    weight = model.lm_head.weight.detach().float()
    ids = torch.randint(0, model.config.vocab_size - 1000, (args.prompts, args.tokens))  # ordinary tokens
    with torch.no_grad():
        hidden = model(ids).hidden_states.reshape(-1, weight.shape[1])
        exact = hidden @ weight.T
        logits = {name: hidden @ dequantized(weight, bits, g, sym).T for name, bits, g, sym in HEADS}
    int8 = logits[HEADS[0][0]]
    print(f"{args.model}: {hidden.shape[0]} positions, vocabulary {weight.shape[0]}, hidden {weight.shape[1]}")
    print("| lm_head | cosine vs int8 head, min | mean | cosine vs float, mean | greedy = int8 head's "
          "| greedy = float's |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, value in logits.items():
        cos = torch.nn.functional.cosine_similarity(value, int8, dim=-1)
        to_float = torch.nn.functional.cosine_similarity(value, exact, dim=-1).mean()
        agree = (value.argmax(-1) == int8.argmax(-1)).float().mean()
        agree_float = (value.argmax(-1) == exact.argmax(-1)).float().mean()
        print(f"| {name} | {cos.min():.5f} | {cos.mean():.5f} | {to_float:.5f} | {agree:.1%} | {agree_float:.1%} |")


if __name__ == "__main__":
    main()
