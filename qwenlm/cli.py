"""The `qwenlm` command: subcommand dispatch only; the work lives in the library.

qwenlm chat                                        # demo checkpoint (random weights)
qwenlm chat --model Qwen-1_8B-Chat --seed 7 --system "You are a pirate."
qwenlm generate --model Qwen-1_8B "Once upon a time" --max-new-tokens 64 --temperature 0.7
qwenlm make-checkpoint /tmp/tiny --preset tiny
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .eval.cli import add_parsers as add_eval_parsers
from .finetune.cli import add_parsers as add_finetune_parsers
from .server.launch import add_serve_args
from .web.cli import add_parsers as add_web_parsers

DEMO_NOTICE = (
    "note: no --model given, so this runs the built-in demo checkpoint: a tiny model with RANDOM "
    "weights. Its replies are noise; pass --model PATH for a real Qwen checkpoint."
)
_SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
DEMO_MAX_NEW_TOKENS = 48  # the demo's replies are noise: keep them short unless asked otherwise


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", "-c", "--checkpoint-path", dest="model",
                        help="checkpoint folder (Hugging Face layout); default: the demo checkpoint")  # fmt: skip
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--cpu-only", action="store_true", help="same as --device cpu")
    parser.add_argument("--quantization", choices=["int8", "int4"],
                        help="quantize a float checkpoint while loading (GPTQ checkpoints need no flag)")  # fmt: skip
    parser.add_argument("--quantization-group-size", type=int,
                        help="int4's group size (default 128; it must divide the layers' widths)")  # fmt: skip
    parser.add_argument("--kv-cache-int8", action="store_true", help="int8 KV cache (use_cache_quantization)")


def _add_sampling_args(parser: argparse.ArgumentParser, seed_default: int | None) -> None:
    group = parser.add_argument_group("sampling (default: the checkpoint's generation_config.json)")
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int, help="0 = off")
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--greedy", action="store_true", help="argmax decoding (do_sample=False)")
    group.add_argument("--seed", "-s", type=int, default=seed_default, help="seed for reproducible sampling")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="static torch.compile'd decode loop (default: CUDA only; sets QWENLM_COMPILE)")  # fmt: skip


def _sampling_overrides(args: argparse.Namespace) -> dict:
    overrides = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k) is not None}
    if args.greedy:
        overrides["do_sample"] = False
    return overrides


def _load(args: argparse.Namespace):
    from . import AutoModelForCausalLM, AutoTokenizer
    from .testing import demo_checkpoint

    path = args.model
    if path is None:
        print(DEMO_NOTICE, file=sys.stderr)
        path = demo_checkpoint()
        if args.max_new_tokens is None:
            args.max_new_tokens = DEMO_MAX_NEW_TOKENS
    device = "cpu" if args.cpu_only else args.device
    if getattr(args, "compile", None) is not None:  # the decode loop's switch, for every generation in this run
        os.environ["QWENLM_COMPILE"] = "1" if args.compile else "0"
    tokenizer = AutoTokenizer.from_pretrained(path)
    extra = {"use_cache_quantization": True} if args.kv_cache_int8 else {}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        device_map=device,
        torch_dtype=args.dtype,
        quantization=args.quantization,
        quantization_group_size=args.quantization_group_size,
        **extra,
    )
    return tokenizer, model


def cmd_generate(args: argparse.Namespace) -> None:
    from .generation import stream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer, model = _load(args)
    overrides = {**_sampling_overrides(args), "seed": args.seed, "stop": args.stop or None}
    chunks = stream(model, tokenizer, prompt, **overrides)  # options are checked here, before any compute
    sys.stdout.write(prompt)
    start, count, reason = time.perf_counter(), 0, "length"
    for chunk in chunks:
        count += 1
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        reason = chunk.finish_reason or reason
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s, finish: {reason}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from .chat_format import DEFAULT_SYSTEM
    from .demos.cli_chat import ChatApp
    from .generation.params import SamplingParams

    tokenizer, model = _load(args)
    config = model.generation_config.updated(**_sampling_overrides(args))
    SamplingParams.from_generation_config(config)  # a bad flag is a start-up error, not one per reply
    app = ChatApp(model, tokenizer, seed=args.seed, system=args.system or DEFAULT_SYSTEM, generation_config=config)
    if args.query:
        app.say(f"[{len(args.query)} scripted messages]")
        for query in args.query:
            app.say(app.style.user("User> ") + query)
            app.reply(query)
        return
    app.run()


def cmd_serve(args: argparse.Namespace) -> None:
    from .server.launch import serve

    serve(args, _load)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchSettings, resolve_lengths, run_bench, write_report

    if args.model is None:
        print("note: no --model given, so this benchmarks the built-in demo checkpoint (tiny, random weights); "
              "pass --model PATH for a real one.", file=sys.stderr)  # fmt: skip
    if args.output is not None and (Path(args.output).is_dir() or not Path(args.output).parent.is_dir()):
        raise ValueError(f"--output {args.output}: give a file name in an existing folder")  # before the run
    prompt_len, gen_len = resolve_lengths(args.prompt_len, args.gen_len, args.preset)
    settings = BenchSettings(
        model=args.model, dtype=args.dtype, quantization=args.quantization, prompt_len=prompt_len, gen_len=gen_len,
        batch=args.batch, threads=args.threads, device=args.device, repeats=args.repeats, warmup=args.warmup,
        compare=args.compare, preset=args.preset, bandwidth_gbps=args.bandwidth, seed=args.seed, compile=args.compile,
    )  # fmt: skip
    report = run_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(write_report(report, as_json=args.json, output=args.output))


def cmd_quantize(args: argparse.Namespace) -> None:
    from .quant.quantize import quantize_checkpoint

    if args.method == "rtn" and (args.calibration is not None or args.desc_act):
        raise ValueError("--calibration and --desc-act are for --method gptq; rtn rounds each weight alone")
    if args.method == "gptq" and args.calibration is None:
        print("note: no --calibration given, so GPTQ calibrates on a small built-in set of English and Chinese "
              "text, code and chats; real data close to the model's use (e.g. its chat data as .jsonl) is better.",
              file=sys.stderr)  # fmt: skip
    report = quantize_checkpoint(
        args.model, args.output, args.bits, args.group_size, args.method, args.calibration, args.num_samples,
        args.seq_len, args.desc_act, damp_percent=args.damp_percent, device=args.device,
    )  # fmt: skip
    data = f", {report.num_samples} samples / {report.num_tokens} tokens" if args.method == "gptq" else ""
    print(f"wrote a {args.bits}-bit {args.method.upper()} checkpoint to {report.output_dir} "
          f"({report.seconds:.1f} s{data})")  # fmt: skip


def _num_samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def cmd_make_checkpoint(args: argparse.Namespace) -> None:
    from .testing import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlm", description="Qwen (v1) models in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat in the terminal (streaming; :h for commands)")
    _add_model_args(chat)
    _add_sampling_args(chat, seed_default=1234)
    chat.add_argument("--system", help='system prompt (default "You are a helpful assistant.")')
    chat.add_argument("--query", "-q", action="append", help="send this message and exit (repeat for turns)")
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="continue a prompt and stream it to stdout")
    _add_model_args(gen)
    _add_sampling_args(gen, seed_default=None)
    gen.add_argument("prompt", nargs="?", default="Hello, my name is", help="the prompt; '-' reads stdin")
    gen.add_argument("--stop", action="append", help="stop string (repeatable); never printed")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP API (continuous batching)")
    _add_model_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve, max_new_tokens=None)

    bench = sub.add_parser("bench", help="prefill/decode speed, memory and bandwidth bound (vs transformers)")
    bench.add_argument("--model", "-m", "-c", "--checkpoint-path", dest="model",
                       help="checkpoint folder (Hugging Face layout); default: the demo checkpoint")  # fmt: skip
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    bench.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    bench.add_argument("--prompt-len", type=int, help="prompt tokens (default 512, or the preset's)")
    bench.add_argument("--gen-len", type=int, help="generated tokens, eos ignored (default 128, or the preset's)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--repeats", type=int, default=3, help="measured rounds (median and best reported)")
    bench.add_argument("--warmup", type=int, default=1, help="short unmeasured rounds first")
    bench.add_argument("--compare", choices=["transformers"], help="also run transformers' Qwen2 (interleaved)")
    bench.add_argument("--preset", choices=["profile-2048", "profile-8192", "encode-2048"],
                       help="Qwen README profiling lengths: 1 -> 2048, 1 -> 8192, or 2048 -> 1 tokens")  # fmt: skip
    bench.add_argument("--bandwidth", type=float, metavar="GBPS", help="memory GB/s for the bound (default: measured)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    bench.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="qwenlm's static torch.compile'd decode loop (default: on CUDA only; QWENLM_COMPILE=1/0 "
                            "also sets it)")  # fmt: skip
    bench.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    bench.add_argument("--output", metavar="FILE.json", help="also write the JSON report here")
    bench.set_defaults(func=cmd_bench)

    quant = sub.add_parser("quantize", help="write a GPTQ (AutoGPTQ-layout) 4/8-bit checkpoint of a float one")
    quant.add_argument("--model", "-m", required=True, help="the float checkpoint folder to quantize")
    quant.add_argument("--output", "-o", required=True, help="new folder for the quantized checkpoint")
    quant.add_argument("--bits", type=int, required=True, choices=[4, 8])
    quant.add_argument("--group-size", type=int, default=128, help="inputs per scale group; -1: one per row")
    quant.add_argument("--method", default="gptq", choices=["gptq", "rtn"], help="rtn: round-to-nearest, no data")
    quant.add_argument("--calibration", help=".jsonl/.json ({'text'} or chat records) or .txt (paragraphs)")
    quant.add_argument("--num-samples", type=_num_samples, default=128, help="samples to use, or 'all'")
    quant.add_argument("--seq-len", type=int, default=512, help="tokens per sample (longer ones are cut)")
    quant.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by importance")
    quant.add_argument("--damp-percent", type=float, default=0.01, help="Hessian dampening, fraction of its mean")
    quant.add_argument("--device", default="cpu", help="where each block is calibrated (cpu, cuda, cuda:N)")
    quant.set_defaults(func=cmd_quantize)

    from .testing import add_arguments as add_checkpoint_arguments

    make = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint (python -m qwenlm.testing)")
    add_checkpoint_arguments(make)
    make.set_defaults(func=cmd_make_checkpoint)

    add_finetune_parsers(sub)  # finetune, merge-lora
    add_eval_parsers(sub)  # eval
    add_web_parsers(sub, add_model_args=_add_model_args, load=_load)  # web
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (schedulers, containers, `kill`) ends a command as Ctrl-C does: temporary outputs are removed,
        # finished ones kept. `serve` and `finetune` install their own handling on top of this.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        args.func(args)
    except BrokenPipeError:  # `qwenlm generate ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        raise SystemExit(0) from None
    except (OSError, ValueError, RuntimeError) as err:  # bad input, a path that cannot be written: one clear line
        raise SystemExit(f"error: {err}") from err
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: outputs are written atomically, so nothing is half there
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
