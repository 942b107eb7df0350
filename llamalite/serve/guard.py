"""What every request passes before the app sees it, as one pure ASGI middleware, and the HTTP
connection's own deadlines as a uvicorn protocol.

The middleware, in order: the Host header against an allow-list (DNS rebinding), the API key (before
a byte of the body is read), the body read whole under a size cap and a deadline, then the app, with
a watcher on the connection that cancels the app's work the moment the client goes away, whatever
kind of request it was (a plain ASGI middleware, because Starlette's BaseHTTPMiddleware hides that
disconnect from the app). It also counts requests by route and status for /metrics.

The protocol closes connections whose request headers do not arrive in time (slow or silent sockets
would otherwise hold file descriptors forever) and answers what uvicorn rejects itself (a malformed
request line, over-long headers) in the API's error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

access_log = logging.getLogger("uvicorn.access")  # the 499s of clients that left sit beside uvicorn's own lines

PUBLIC_PATHS = ("/health", "/")  # open without the API key: liveness, and the chat page (which asks for the key)


@dataclass
class Limits:
    """What one request may ask of the server; each has a flag of `llamalite serve`."""
    max_body: int = 1 << 20  # bytes of request body (413 above)
    read_timeout: float = 10.0  # seconds for a request's headers, and again for its body (408 after)
    max_queue: int = 64  # choices waiting for a slot, all requests together (429 above)
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides localhost and IP literals; "*" for any
    max_stop_chars: int = 1000  # characters of one stop string
    max_scored_entries: int = 1 << 17  # echo scoring: prompt tokens x choices x (1 + top logprobs)
    max_stored_responses: int = 1000  # Responses API: stored responses kept in memory (0: store none)
    max_stored_chars: int = 1 << 26  # ... and at most this many characters of their conversations

    @staticmethod
    def for_context(ctx: int, **overrides: Any) -> "Limits":
        """Defaults sized from the context: a body of 64 bytes a context token (at least 1 MiB) holds a
        full context of text even when every character is a JSON escape."""
        return Limits(**{"max_body": max(1 << 20, 64 * ctx), **{k: v for k, v in overrides.items() if v is not None}})


ANTHROPIC_PATHS = ("/v1/messages",)  # routes whose clients expect Anthropic's error shape
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 408: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error"}


def error_body(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, path: str = "") -> bytes:
    """An error in the shape the route's API family uses: OpenAI's {"error": {message, type, param,
    code}}, or on Anthropic's routes {"type": "error", "error": {type, message}}."""
    if path.startswith(ANTHROPIC_PATHS):
        where = f" ({param})" if param and param not in message else ""
        return json.dumps({"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"),
                                                      "message": message + where}}).encode()
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


def clip(text: str, limit: int = 80) -> str:
    """User input quoted in an error message, never more than `limit` characters of it."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def host_allowed(host_header: str, allowed: tuple[str, ...]) -> bool:
    """DNS rebinding makes a browser send the attacker's own name as Host to 127.0.0.1: only names
    can be rebound, so IP literals and localhost pass, and other names only when listed."""
    if "*" in allowed:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host in ("localhost",) or host.endswith(".localhost") or host in allowed:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class TooLarge(Exception):
    pass


@dataclass
class Guard:
    """The pure ASGI middleware (see the module's docstring)."""
    app: Any
    limits: Limits
    api_key: Callable[[], str | None]  # read per request: the key may be set after the app is built
    count: Callable[[str, int], None] = lambda path, status: None  # (route, status): metrics
    _watchers: set = field(default_factory=set)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status = {"code": 0, "done": False}

        async def respond(code: int, message: str, type: str, code_name: str | None, extra=()) -> None:
            body = error_body(code, message, type, None, code_name, scope["path"])
            # The connection closes after it: a body left unread must not be taken for the next request.
            await send({"type": "http.response.start", "status": code,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close"), *extra]})
            await send({"type": "http.response.body", "body": body})
            self.count("other", code)

        host = headers.get("host", "")
        if not host_allowed(host, self.limits.allowed_hosts):
            return await respond(403, f"the Host '{clip(host)}' is not served here (a guard against DNS rebinding); "
                                      f"start the server with --allowed-hosts NAME to serve it",
                                 "permission_error", "host_not_allowed")
        key = self.api_key()
        if key is not None and scope["path"] not in PUBLIC_PATHS and not _key_matches(headers, key):
            return await respond(401, "a valid API key is required: send the header 'Authorization: Bearer <key>' "
                                      "(or 'x-api-key: <key>')",
                                 "authentication_error", "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body:
            return await respond(413, f"the request body is {int(declared)} bytes; this server takes at most "
                                      f"{self.limits.max_body} (start it with --max-body to change that)",
                                 "invalid_request_error", "request_too_large")
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.limits.read_timeout)
        except TooLarge:
            return await respond(413, f"the request body is over {self.limits.max_body} bytes, the most this server "
                                      f"takes (start it with --max-body to change that)",
                                 "invalid_request_error", "request_too_large")
        except asyncio.TimeoutError:
            return await respond(408, f"the request body did not arrive within {self.limits.read_timeout:g} s",
                                 "invalid_request_error", "request_timeout")
        if body is None:  # the client left while sending
            return

        gone = asyncio.Event()
        replayed = False

        async def app_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def app_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["done"] = True
            await send(message)

        app = asyncio.current_task()

        async def watch():
            # The only reader of the connection after the body: a disconnect before the response is done
            # cancels the app's work (and so the engine requests behind it) at once.
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not status["done"]:
                        app.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, app_receive, app_send)
        except asyncio.CancelledError:
            if not gone.is_set():
                raise  # the server is stopping, not the client leaving
            status["code"] = 499
            access_log.info('%s - "%s %s HTTP/%s" %d', _client(scope), scope["method"], scope["path"],
                            scope.get("http_version", "1.1"), 499)
            asyncio.current_task().uncancel()
        finally:
            watcher.cancel()
            route = scope.get("route")
            self.count(route.path if route is not None else "other", status["code"])

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body:
                raise TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _key_matches(headers: dict[str, str], key: str) -> bool:
    """`Authorization: Bearer KEY` (OpenAI's clients; the scheme is case-insensitive, RFC 7235) or
    `x-api-key: KEY` (Anthropic's), compared in constant time."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    bearer = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return bearer or hmac.compare_digest(headers.get("x-api-key", "").strip().encode(), key.encode())


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers and JSON bodies on its own errors.

    A connection gets `header_timeout` seconds from being opened (or from the first bytes of its next
    request) to send a whole request head; uvicorn itself closes idle keep-alive connections (`timeout_keep_alive`) but
    waits forever on a head that never completes."""
    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # No Nagle: asyncio turns it off only on sockets whose listener says IPPROTO_TCP, which a listener
        # bound before uvicorn (BackgroundServer, a socket handed down) may not; with it on, each response
        # on a kept-alive connection waited ~40 ms for the client's delayed ACK.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        # The first bytes of the next request on a kept-alive connection start its head's deadline
        # (an idle kept-alive connection is uvicorn's keep-alive timer's to close).
        if self._head_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._head_deadline is not None:  # a request's head arrived
            self._head_deadline.cancel()
            self._head_deadline = None

    def connection_lost(self, exc) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self._write_error(408, f"the request's headers did not arrive within {self.header_timeout:g} s",
                              "request_timeout")

    def send_400_response(self, msg: str) -> None:  # uvicorn's plain-text answer to what h11 rejects
        self._write_error(400, f"invalid HTTP request ({msg.rstrip('.')}): a malformed request line, or headers "
                               f"over {self.conn._max_incomplete_event_size} bytes", "invalid_http_request")

    def _write_error(self, status: int, message: str, code: str) -> None:
        # Written raw: the connection's h11 state may be anywhere (no request yet, or a protocol error).
        body = error_body(status, message, "invalid_request_error", None, code)
        reason = {400: "Bad Request", 408: "Request Timeout"}[status]
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                             f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()
