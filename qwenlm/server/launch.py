"""`qwenlm serve` (and the servers built on it): flags, engine start-up and the uvicorn loop.

qwenlm serve --model Qwen-1_8B-Chat --port 8000 --api-key sk-local
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..integrations.vllm.launch import add_vllm_args


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP and engine flags of `qwenlm serve` (model flags are added by the caller)."""
    parser.add_argument("--host", default="127.0.0.1", help="use 0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (what OpenAI clients send)")
    parser.add_argument("--served-model-name", help="the model id clients use (default: the folder name)")
    parser.add_argument("--strict-model-name", action="store_true", help="404 for requests naming another model")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together (a cap, not memory)")
    parser.add_argument("--max-model-len", type=int, help="prompt + completion tokens per request")
    parser.add_argument("--kv-cache-memory", type=float, metavar="GIB",
                        help="memory for the paged KV cache (default: 90%% of GPU memory after the weights; on CPU "
                             "a quarter of the available RAM, at most 4 GiB)")  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503s (clients retry them)")
    parser.add_argument("--cors-origin", action="append", help="allowed CORS origin (repeatable; '*' for any)")
    parser.add_argument("--graceful-timeout", type=int, default=10, help="seconds in-flight requests get at shutdown")
    parser.add_argument("--web", action="store_true", help="also serve the chat page at / (what `qwenlm web` runs)")
    parser.add_argument("--backend", choices=["qwenlm", "vllm"], default="qwenlm",
                        help="qwenlm's own engine, or vLLM (multi-GPU, multi-node; README 'Scaling out')")  # fmt: skip
    add_vllm_args(parser)  # the flags only --backend vllm reads


def abort_before_graceful_timeout(server: Any, engine: Any) -> None:
    """Make uvicorn's graceful shutdown abort the engine's requests a moment before its timeout runs out.

    uvicorn cancels the request tasks still running when `timeout_graceful_shutdown` ends: a stream would stop
    mid-body and a waiting request get a plain-text 500. Aborted first (`engine.shutdown`), each request ends
    as the API says: a stream with an error event and [DONE], a plain request with a 503.
    """
    graceful = server.shutdown
    timeout = server.config.timeout_graceful_shutdown

    async def shutdown(sockets: list | None = None) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, timeout - min(1.0, timeout / 2))
        abort = loop.call_later(delay, lambda: loop.run_in_executor(None, engine.shutdown))
        try:
            await graceful(sockets)
        finally:
            abort.cancel()

    if timeout is not None:
        server.shutdown = shutdown


def served_name(args: argparse.Namespace) -> str:
    """The model id clients use: --served-model-name, else the checkpoint folder's name."""
    return args.served_model_name or (args.model.rstrip("/").split("/")[-1] if args.model else "qwen-demo")


def serve(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> None:
    """Load the model with `load(args)`, start the engine thread and serve until Ctrl-C / SIGTERM."""
    import uvicorn

    from ..engine import AsyncEngine, EngineArgs, LLMEngine
    from .app import create_app

    name = served_name(args)
    if args.backend == "vllm":  # vLLM runs the model; the front end below is the same
        from ..integrations.vllm.launch import start_client

        engine = start_client(args, name)
    else:
        tokenizer, model = load(args)
        engine_args = EngineArgs(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                 max_queue=args.max_queue, kv_cache_memory=args.kv_cache_memory)  # fmt: skip
        engine = AsyncEngine(LLMEngine(model, tokenizer, engine_args, model_name=name))
    app = create_app(engine, api_key=args.api_key, served_model_name=name, cors_origins=args.cors_origin,
                     strict_model_name=args.strict_model_name)  # fmt: skip
    if args.web:  # the chat page at / in front of the API (qwenlm.web)
        from ..web.page import with_page

        app = with_page(app, demo=args.model is None)
    kv = f", kv_cache={engine.engine.kv_cache_gib:.2f} GiB" if isinstance(engine, AsyncEngine) else ""
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (max_num_seqs={args.max_num_seqs}, "
          f"max_model_len={engine.max_model_len}{kv})", file=sys.stderr)  # fmt: skip
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=args.graceful_timeout)  # fmt: skip
    server = uvicorn.Server(config)
    if isinstance(engine, AsyncEngine):  # (vLLM's engines end their requests on their own shutdown)
        abort_before_graceful_timeout(server, engine)
    if args.web:
        from ..web.page import announce

        announce(server, args.host, args.port, open_browser=getattr(args, "inbrowser", False))
    # SIGTERM ends like Ctrl-C (uvicorn re-raises it after its graceful shutdown): the finally below runs, so
    # engines living in other processes (--backend vllm) are shut down rather than orphaned.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run()  # Ctrl-C / SIGTERM: stop accepting, let in-flight requests finish (bounded)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the signal once its graceful shutdown is done: a normal exit here
    finally:
        engine.shutdown()  # whatever is still running ends with finish_reason "abort"
        print("server stopped", file=sys.stderr)
