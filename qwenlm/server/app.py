"""The FastAPI application: OpenAI-compatible routes as thin shims over `serving_*`, plus auth and logs.

Every error a client can cause comes back as an OpenAI error object with the matching status (400
validation, 401 auth, 404 model/route, 503 busy), never as a stack trace, and the server keeps
serving. One log line per request (logger "qwenlm.server"): method, path, status, milliseconds, tokens,
and for an error the message the client got.

    app = create_app(engine, api_key="sk-local"); uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.protocol import EngineClient
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from .responses_protocol import ResponsesRequest
from .serving_chat import ServingChat
from .serving_completion import ServingCompletion
from .serving_engine import USAGE_SCOPE_KEY, ClientDisconnected, EventStream, ServedModel
from .serving_responses import ServingResponses
from .serving_tokens import ServingTokens
from .structured import StructuredOutput

logger = logging.getLogger("qwenlm.server")

OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/redoc", "/openapi.json"})  # no API key needed
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away"; only ever seen in logs
ERROR_SCOPE_KEY = "qwenlm.error"  # where an error handler leaves the client's message for the access log


def error_response(err: APIError, scope: Scope | None = None) -> JSONResponse:
    if scope is not None:
        scope[ERROR_SCOPE_KEY] = err.message
    return JSONResponse(err.to_response().model_dump(), status_code=err.status_code, headers=err.headers)


# --------------------------------------------------------------------------------------------------
# Middleware (plain ASGI, so streaming and disconnect detection pass through untouched)


class AccessMiddleware:
    """Bearer-token auth, one log line per request, and HTTP metrics."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return True
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._authorized(scope):
                await self.app(scope, receive, send_and_watch)
            else:
                await _unauthorized(scope, receive, send_and_watch)
        finally:
            self._log(scope, status, time.perf_counter() - started)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        prompt, completion = scope.get(USAGE_SCOPE_KEY, (0, 0))
        route = getattr(scope.get("route"), "path", "other")
        self.metrics.observe_request(scope["method"], route, status, seconds, prompt, completion)
        tokens = f" prompt_tokens={prompt} completion_tokens={completion}" if prompt or completion else ""
        error = scope.get(ERROR_SCOPE_KEY)
        reason = f" error={json.dumps(error, ensure_ascii=False)}" if error and status >= 400 else ""
        logger.info("%s %s %d %.1fms%s%s", scope["method"], scope["path"], status, seconds * 1000, tokens, reason)


async def _unauthorized(scope: Scope, receive: Receive, send: Send) -> None:
    headers = dict(scope["headers"])
    message = (
        "Incorrect API key provided."
        if b"authorization" in headers
        else "Missing API key: send it in the Authorization header as 'Bearer YOUR_KEY'."
    )
    err = APIError(message, status_code=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    await error_response(err, scope)(scope, receive, send)


# --------------------------------------------------------------------------------------------------
# Error handlers


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts the union member tried into `loc` ("str", "list[str]", "ContentPart"): not a field."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part[:1].isupper())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The most telling validation error as (client message, param), e.g. "messages.0.role: Input should ..."."""
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    # Our own checks (value_error) explain best; otherwise the deepest error is the most specific.
    first = min(errors, key=lambda e: (e.get("type") != "value_error", -len(e.get("loc", ()))))
    if first.get("type") == "json_invalid":
        return f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}.", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid request: {where}{message}.", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.scope)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in content_type:  # e.g. curl -d without -H
            message = (f"The request body must be JSON, sent with Content-Type: application/json "
                       f"(got {content_type or 'no Content-Type'}).")  # fmt: skip
            param = None
        return error_response(APIError(message, param=param), request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(detail, status_code=exc.status_code, code=code, headers=exc.headers)
        return error_response(err, request.scope)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(APIError("Internal server error.", status_code=500, type="server_error"))


# --------------------------------------------------------------------------------------------------
# The app


class EventStreamResponse(StreamingResponse):
    """Server-sent events; the event stream is closed however the response ends (which aborts its engine
    requests if the client left early)."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def _reply(result: BaseModel | EventStream) -> Response:
    """A serving result as a response: a schema object as JSON, an event stream as SSE."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return EventStreamResponse(result, headers=SSE_HEADERS)


def _ensure_log_output() -> None:
    """Make the per-request lines visible when the process configured no logging at all (plain `qwenlm serve`)."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def create_app(
    engine: EngineClient,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    cors_origins: list[str] | None = None,
    strict_model_name: bool = False,
) -> FastAPI:
    """The OpenAI-compatible server over `engine`.

    Args:
        engine: anything implementing `qwenlm.engine.protocol.EngineClient`.
        api_key: when set, every route except /health, /metrics and the docs needs
            `Authorization: Bearer <api_key>` (401 otherwise).
        served_model_name: the model id listed by /v1/models and named in responses (default:
            `engine.model_name`).
        cors_origins: origins allowed by CORS (["*"] for any); None = no CORS headers.
        strict_model_name: requests must name `served_model_name` (404 otherwise); by default any
            name is accepted, as the reference server did (one model is served anyway).
    """
    _ensure_log_output()
    model_name = served_model_name or engine.model_name
    model = ServedModel(model_name, strict=strict_model_name)
    metrics = ServerMetrics()
    structured = StructuredOutput(engine.tokenizer)  # one grammar compiler (vocabulary index) for both routes
    chat = ServingChat(engine, model, metrics, structured)
    completion = ServingCompletion(engine, model, metrics, structured)
    responses = ServingResponses(chat)
    tokens = ServingTokens(engine, model)
    app = FastAPI(title="qwenlm", summary="OpenAI-compatible API for Qwen (v1) models")
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, model_name
    _install_error_handlers(app)
    app.add_middleware(AccessMiddleware, api_key=api_key, metrics=metrics)
    if cors_origins:  # added last = outermost, so preflight requests never meet the auth check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials="*" not in cors_origins,
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus() -> Response:  # sync: FastAPI runs it in a thread, so stats() may take the engine's lock
        return Response(metrics.render(engine.stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _reply(ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_model_len)]))

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        model.check(model_id)
        return _reply(ModelCard(id=model_name, max_model_len=engine.max_model_len))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return _reply(await chat.create(request, raw_request))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return _reply(await completion.create(request, raw_request))

    @app.post("/v1/responses")
    async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
        return _reply(await responses.create(request, raw_request))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        return tokens.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, Any]:
        return tokens.detokenize(request)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokens.tokenizer_info()

    return app
