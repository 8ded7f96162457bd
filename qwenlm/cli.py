"""The `qwenlm` command: subcommand dispatch only; the work lives in the library.

qwenlm generate "Once upon a time"                 # demo checkpoint (random weights)
qwenlm generate --model Qwen-1_8B "Once upon a time" --max-new-tokens 64
qwenlm make-checkpoint /tmp/tiny --preset tiny
"""

from __future__ import annotations

import argparse
import sys
import time

DEMO_NOTICE = (
    "note: no --model given, so this runs the built-in demo checkpoint: a tiny model with RANDOM "
    "weights. Its output is noise; pass --model PATH for a real Qwen checkpoint."
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="checkpoint folder (Hugging Face layout); default: demo")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--cpu-only", action="store_true", help="same as --device cpu")


def _load(args: argparse.Namespace):
    from . import AutoModelForCausalLM, AutoTokenizer
    from .testing import demo_checkpoint

    path = args.model
    if path is None:
        print(DEMO_NOTICE, file=sys.stderr)
        path = demo_checkpoint()
    device = "cpu" if args.cpu_only else args.device
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device, torch_dtype=args.dtype)
    return tokenizer, model


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .generation import greedy_steps

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer, model = _load(args)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    stream = tokenizer.stream_decoder(skip_special_tokens=True)
    sys.stdout.write(prompt)
    start, count = time.perf_counter(), 0
    steps = greedy_steps(model, torch.tensor([ids]), max_new_tokens=args.max_new_tokens, vocab_limit=len(tokenizer))
    for next_ids in steps:
        count += 1
        sys.stdout.write(stream.add(int(next_ids[0])))
        sys.stdout.flush()
    sys.stdout.write(stream.finish() + "\n")
    elapsed = time.perf_counter() - start
    print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s, greedy]", file=sys.stderr)


def cmd_make_checkpoint(args: argparse.Namespace) -> None:
    from .testing import main as testing_main

    testing_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlm", description="Qwen (v1) models in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt (greedy) and stream it to stdout")
    _add_model_args(gen)
    gen.add_argument("prompt", nargs="?", default="Hello, my name is", help="the prompt; '-' reads stdin")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.set_defaults(func=cmd_generate)
    make = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint (python -m qwenlm.testing)",
                          add_help=False)  # fmt: skip
    make.add_argument("rest", nargs=argparse.REMAINDER)
    make.set_defaults(func=cmd_make_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
