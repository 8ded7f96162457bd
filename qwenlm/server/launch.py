"""`qwenlm serve` (and the servers built on it): flags, engine start-up and the uvicorn loop.

qwenlm serve --model Qwen-1_8B-Chat --port 8000 --api-key sk-local
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP and engine flags of `qwenlm serve` (model flags are added by the caller)."""
    parser.add_argument("--host", default="127.0.0.1", help="use 0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (what OpenAI clients send)")
    parser.add_argument("--served-model-name", help="the model id clients use (default: the folder name)")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-model-len", type=int, help="prompt + completion tokens per request")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503s")
    parser.add_argument("--cors-origin", action="append", help="allowed CORS origin (repeatable; '*' for any)")
    parser.add_argument("--graceful-timeout", type=int, default=10, help="seconds in-flight requests get at shutdown")


def served_name(args: argparse.Namespace) -> str:
    """The model id clients use: --served-model-name, else the checkpoint folder's name."""
    return args.served_model_name or (args.model.rstrip("/").split("/")[-1] if args.model else "qwen-demo")


def serve(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> None:
    """Load the model with `load(args)`, start the engine thread and serve until Ctrl-C / SIGTERM."""
    import uvicorn

    from ..engine import AsyncEngine, EngineArgs, LLMEngine
    from .app import create_app

    tokenizer, model = load(args)
    name = served_name(args)
    engine_args = EngineArgs(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, max_queue=args.max_queue)
    engine = AsyncEngine(LLMEngine(model, tokenizer, engine_args, model_name=name))
    app = create_app(engine, api_key=args.api_key, served_model_name=name, cors_origins=args.cors_origin)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (max_num_seqs={args.max_num_seqs}, "
          f"max_model_len={engine.max_model_len})", file=sys.stderr)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                                           timeout_graceful_shutdown=args.graceful_timeout))  # fmt: skip
    try:
        server.run()  # Ctrl-C / SIGTERM: stop accepting, let in-flight requests finish (bounded)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the signal once its graceful shutdown is done: a normal exit here
    finally:
        engine.shutdown()  # whatever is still running ends with finish_reason "abort"
        print("server stopped", file=sys.stderr)
