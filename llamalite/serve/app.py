"""The app: the API families' routes wired onto one FastAPI app over one `Server`, with the chat page,
health, metrics, the OpenAPI spec and the error handlers that give every failure OpenAI's shape."""

from __future__ import annotations

import base64
import hashlib
import re
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import anthropic_api, embeddings_api, openai_api, responses_api
from ..generation.tools import ToolError, tool_format
from .core import Server
from .protocol import APIError, error_response
from .hub import Hub
from .guard import Guard, clip


def _version() -> str:
    """llamalite's version as installed (the package metadata), without importing the package face."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llamalite")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def create_app(target: Server | Hub, start_engine: bool = True) -> FastAPI:
    """The FastAPI app over one model (a Server) or several (a Hub). With start_engine, the app runs the
    engines in a thread while it is up; `serve` instead runs them on the main thread (see engine.Runner)
    and the app beside it."""
    hub = target if isinstance(target, Hub) else Hub.of(target)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            hub.start()
        try:
            yield
        finally:
            if start_engine:
                hub.stop()

    app = FastAPI(title="llamalite", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for local LLaMA-family models")
    app.state.hub = hub
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # The model ids this server accepts, so the spec (and tools generating requests from it) know them;
        # with one model, also what that model can take.
        if app.openapi_schema is None:
            schema = default_openapi()
            components = schema["components"]["schemas"]
            contexts = [hub.contexts.get(n) for n in hub.names]
            for name in ("CompletionRequest", "ChatRequest", "EmbeddingRequest", "MessagesRequest", "CountTokensRequest",
                         "ResponsesRequest", "InputTokensRequest"):
                fields = components[name]["properties"]
                fields["model"]["enum"] = hub.names
                for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                    if key in fields and None not in contexts:  # a number or null: bound the number by the context
                        for option in fields[key].get("anyOf", [fields[key]]):
                            if option.get("type") == "integer":
                                option["maximum"] = max(contexts)
            for parameter in schema["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
                parameter["schema"]["enum"] = hub.names
            if len(hub.names) == 1 and hub.first is not None:
                _one_model(components, hub.first)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(http: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers, http.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(http: Request, e: RequestValidationError):
        errors, path = e.errors(), http.url.path
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}); "
                               "send a JSON object with Content-Type: application/json", path=path)
        if first.get("type") == "extra_forbidden":
            name = clip(_field(first), 40)
            return error_response(400, f"the field '{name}' is not supported by this server; remove it", param=name, path=path)
        param = _field(first) or None
        detail = "; ".join(f"{_field(err) or 'body'}: {err.get('msg')}" for err in errors[:5])
        return error_response(400, f"invalid request: {detail}", param=param, path=path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else
                      "invalid_request_error", path=http.url.path)

    @app.exception_handler(Exception)
    async def crash(http: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type="server_error", path=http.url.path)

    app.add_middleware(Guard, limits=hub.limits, api_key=lambda: hub.api_key,
                       count=lambda path, status: hub.metrics.requests.labels(path, str(status)).inc())
    html = resources.files(__package__).joinpath("web/chat.html").read_text(encoding="utf-8")
    page_headers = _page_headers(html)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=page_headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        loaded = list(hub.servers.values())
        return {"status": "ok", "model": hub.names[0], "models": hub.cards(),
                "active": sum(s.engine.active for s in loaded), "queued": sum(s.engine.queue_depth for s in loaded)}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(hub.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_api.router(hub))
    app.include_router(embeddings_api.router(hub))
    app.include_router(anthropic_api.router(hub))
    app.include_router(responses_api.router(hub))
    return app


def _one_model(components: dict[str, Any], server: Server) -> None:
    """The spec narrowed to what the one model served takes: token ids below its vocabulary size, its
    embeddings' one width, and tools only where it has a format for them."""
    vocab = server.tokenizer.vocab_size - 1

    def bound_ids(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer" and node.get("minimum") == 0 and "maximum" not in node:
                node["maximum"] = vocab
            for v in node.values():
                bound_ids(v)
        elif isinstance(node, list):
            for v in node:
                bound_ids(v)

    for name, field in (("CompletionRequest", "prompt"), ("DetokenizeRequest", "tokens"), ("EmbeddingRequest", "input")):
        bound_ids(components[name]["properties"][field])
    components["EmbeddingRequest"]["properties"]["dimensions"] = {
        "anyOf": [{"type": "integer", "enum": [server.lm.config.dim]}, {"type": "null"}],
        "description": "only the model's own width"}
    try:
        tool_format(server.lm.chat_template, server.tokenizer)
    except ToolError:
        for name in ("ChatRequest", "MessagesRequest", "CountTokensRequest", "ResponsesRequest", "InputTokensRequest"):
            fields = components[name]["properties"]
            fields["tools"] = {"type": "null", "description": "this model has no known tool-call format"}
            fields.pop("tool_choice", None)
        message = components["ChatMessage"]["properties"]  # nor tool turns in the conversation
        message["role"]["enum"] = [r for r in message["role"]["enum"] if r != "tool"]
        message["tool_calls"] = {"type": "null"}


def _field(error: dict[str, Any]) -> str:
    """A validation error's field as a client wrote it: messages.0.content, without pydantic's union tags."""
    return ".".join(str(p) for p in error.get("loc", ())[1:] if not any(c in str(p) for c in "[("))


def _page_headers(html: str) -> dict[str, str]:
    """The chat page's security headers: only its own inline script runs (by hash), it talks only to
    this server, and no other site may frame it."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
