"""The chat page's HTTP side: its static files in front of the OpenAI API app, and `--inbrowser`.

The page is plain files (`static/`: HTML, JS modules, CSS; no build step, nothing fetched from the
internet) that talk to `/v1/chat/completions` like any other client, so one process serves both:

    app = with_page(create_app(engine))     # GET / -> the page, /static/* -> its files, the rest -> the API
"""

from __future__ import annotations

import html
import sys
import threading
import time
import webbrowser
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).with_name("static")
NOTICE_SLOT = "<!-- qwenlm:notice -->"  # in index.html: where a start-up notice for the page goes
DEMO_NOTICE = "Demo checkpoint: a tiny model with random weights, so replies are noise. Start with --model PATH."

# Model output is only ever inserted as text; the policy is the second line of defence: no inline
# script or handler runs, nothing loads from elsewhere, and the page talks only to its own server.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),  # revalidate (ETag), so an upgraded qwenlm never runs yesterday's script
]


def index_html(notice: str | None = None) -> str:
    """The page, with `notice` (plain text) shown in a banner when given."""
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if notice:
        page = page.replace(NOTICE_SLOT, f'<meta name="qwenlm-notice" content="{html.escape(notice, quote=True)}">')
    return page


class WithPage:
    """ASGI app: the page at `/` and its files at `/static/`, every other request to the API app.

    The page's files hold no data, so they are served without the API key (the page asks the user
    for it when the API answers 401). Lifespan and every other path go to the API app untouched.
    """

    def __init__(self, api: ASGIApp, notice: str | None = None) -> None:
        self.api = api
        page = index_html(notice)

        async def index(_: Request) -> HTMLResponse:
            return HTMLResponse(page)

        self.page = Starlette(
            routes=[Route("/", index, methods=["GET"]), Mount("/static", StaticFiles(directory=STATIC_DIR))]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/" or path.startswith("/static/")):
            await self.api(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *PAGE_HEADERS]}
            await send(message)

        await self.page(scope, receive, send_with_headers)


def with_page(api: ASGIApp, *, demo: bool = False) -> WithPage:
    """`api` with the chat page in front; `demo` shows the random-weights notice on the page."""
    return WithPage(api, notice=DEMO_NOTICE if demo else None)


def page_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the page (a wildcard listen address is reached via loopback)."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def announce(server: Any, host: str, port: int, *, open_browser: bool = False) -> threading.Thread:
    """Print the page's address once `server` (a uvicorn.Server) is up, and open it in a browser if asked."""
    url = page_url(host, port)

    def wait_then_announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.1)
        print(f"chat page: {url}", file=sys.stderr, flush=True)
        if open_browser and not webbrowser.open(url):
            print(f"no browser found to open; visit {url}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=wait_then_announce, name="qwenlm-web-announce", daemon=True)
    thread.start()
    return thread
