"""`qwenlm web`: the chat page and the OpenAI API in one server (registered by qwenlm.cli).

qwenlm web                                          # demo checkpoint (random weights)
qwenlm web --model Qwen-1_8B-Chat --port 8000 --inbrowser
qwenlm web -c Qwen-7B-Chat --server-name 0.0.0.0 --server-port 7860 --api-key sk-local   # web_demo.py's flags
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from ..server.launch import add_serve_args, serve

SHARE_MESSAGE = (
    "--share (a public gradio.live tunnel) is not offered: qwenlm runs offline and sends nothing to outside "
    "services. To reach the page from another machine, listen on every interface with --host 0.0.0.0 and set "
    "--api-key KEY, or forward the port over SSH: ssh -L 8000:127.0.0.1:8000 THIS_HOST"
)


class _NotOffered(argparse.Action):
    """A flag of the seeds' demo that qwenlm refuses with an explanation (exit 2, as for any bad flag)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        parser.exit(2, f"{parser.prog}: error: {self.const}\n")  # the message alone: the usage would bury it


def add_parsers(
    sub: argparse._SubParsersAction,
    *,
    add_model_args: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace], tuple[Any, Any]],
) -> None:
    """Add `web` to the `qwenlm` parser; the caller passes its model flags and loader (no import cycle)."""
    web = sub.add_parser(
        "web",
        help="chat in the browser: the chat page at / and the OpenAI API at /v1 in one server",
        description="Serve the chat page at http://HOST:PORT/ beside the OpenAI-compatible API "
        "(the same server as `qwenlm serve --web`). Conversations stay in the browser.",
    )
    add_model_args(web)
    add_serve_args(web)
    seeds = web.add_argument_group("flags of Qwen's web_demo.py, accepted as they are")
    seeds.add_argument("--server-name", dest="host", default=argparse.SUPPRESS, help="same as --host")
    seeds.add_argument("--server-port", dest="port", type=int, default=argparse.SUPPRESS, help="same as --port")
    seeds.add_argument("--inbrowser", action="store_true", help="open the page in the default browser once it is up")
    seeds.add_argument("--share", nargs=0, action=_NotOffered, const=SHARE_MESSAGE,
                       help="not offered (qwenlm runs offline); the message says what to use instead")  # fmt: skip
    web.set_defaults(func=functools.partial(serve, load=load), web=True, max_new_tokens=None)
