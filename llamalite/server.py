"""An OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn + pydantic), with a
chat page at `/`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events ending in `data: [DONE]`), POST /tokenize, POST /detokenize, GET /health, GET /metrics
(Prometheus text). Errors come back in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
with the status a client expects; a request never takes the server down.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_template import TemplateError, render_chat
from .engine import Engine, PromptEvent, Request as EngineRequest, TokenEvent
from .generation import ContextLengthError, TextStream
from .loading import LoadedModel
from .sampling import SamplingParams

MAX_STOP = 4  # as OpenAI: up to 4 stop sequences


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----- request bodies ------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both generation endpoints; unknown fields are accepted and ignored, as OpenAI's
    clients send some (user, metadata) that change nothing here."""
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000, description="llamalite extension: 0 turns it off")
    min_p: float = Field(0.0, ge=0, le=1, description="llamalite extension: 0 turns it off")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, description="llamalite extension: 1 turns it off")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


TokenId = Annotated[int, Field(ge=0)]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    """llama.cpp's fields (content, add_special) or vLLM's (prompt, add_special_tokens): lm-eval's remote
    tokenizer speaks the latter."""
    model_config = ConfigDict(extra="allow")

    content: str | None = Field(None, description="text to tokenize")
    prompt: str | None = Field(None, description="the same, under vLLM's name")
    add_special: bool | None = Field(None, description="add the BOS token where the model uses one (default true)")
    add_special_tokens: bool | None = Field(None, description="the same, under vLLM's name")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tokens: list[TokenId]


# ----- running one choice ----------------------------------------------------------------------------

@dataclass
class Choice:
    """What one choice produced so far."""
    index: int
    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    prompt_logprobs: list[TokenEvent] | None = None


@dataclass
class Piece:
    """A step of one choice's stream: new text and the tokens that made it, or the end."""
    index: int
    text: str
    tokens: list[TokenEvent]
    finish_reason: str | None = None
    cached_tokens: int = 0  # on the last piece: prompt tokens reused from the KV cache
    prompt_logprobs: list[TokenEvent] | None = None  # with score_prompt: each prompt token's, the first None


class Server:
    """The state behind the app: the loaded model, its engine, the name it is served under."""

    def __init__(self, lm: LoadedModel, model_name: str, *, max_batch: int = 8, max_seq_len: int | None = None,
                 api_key: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.lm, self.tokenizer, self.model_name, self.api_key = lm, lm.tokenizer, model_name, api_key
        self.engine = Engine(lm.model, max_batch=max_batch, max_seq_len=max_seq_len)
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_requests = Counter("llamalite_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.m_prompt = Counter("llamalite_prompt_tokens", "prompt tokens received", registry=r)
        self.m_cached = Counter("llamalite_cached_prompt_tokens", "prompt tokens reused from the KV cache", registry=r)
        self.m_generated = Counter("llamalite_generated_tokens", "tokens generated", registry=r)
        self.m_latency = Histogram("llamalite_request_latency_seconds", "generation request latency", registry=r,
                                   buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.m_ttft = Histogram("llamalite_time_to_first_token_seconds", "time to first token", registry=r,
                                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        Gauge("llamalite_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: self.engine.queue_depth)
        Gauge("llamalite_active_requests", "requests being decoded", registry=r).set_function(lambda: self.engine.active)
        Gauge("llamalite_batch_slots", "KV-cache slots (largest batch)", registry=r).set(max_batch)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}' "
                                f"(GET /v1/models lists it)", param="model", code="model_not_found")

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary of {vocab}", param=param)
        return list(ids)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.check_ids(prompt, "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        return ids

    def budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """max_tokens checked against the context (None: everything the context leaves)."""
        ctx = self.engine.max_seq_len
        if max_tokens is None:
            if n_prompt >= ctx:
                raise APIError(400, f"the prompt is {n_prompt} tokens but the context is {ctx}; shorten it",
                               param="messages", code="context_length_exceeded")
            return ctx - n_prompt
        try:
            self.engine.check(n_prompt, max_tokens)
        except ContextLengthError as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        return max_tokens

    async def run(self, index: int, prompt: list[int], max_tokens: int, body: _Sampling, logprobs: int | None,
                  stop: list[str], score_prompt: bool = False) -> AsyncIterator[Piece]:
        """One choice as a stream of pieces; leaving early (a client gone) cancels it in the engine."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = None if body.seed is None else (body.seed + index) % 2 ** 63
        request = EngineRequest(prompt, max_tokens=max_tokens, sampling=body.sampling(),
                                stop_ids=self.tokenizer.end_ids, seed=seed, logprobs=logprobs,
                                score_prompt=score_prompt, deliver=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        start = time.monotonic()
        first = True
        self.engine.submit(request)
        text = TextStream(self.tokenizer, stop)
        held: list[TokenEvent] = []  # tokens whose text is not out yet
        try:
            while True:
                event = await events.get()
                if isinstance(event, PromptEvent):
                    yield Piece(index, "", [], prompt_logprobs=[TokenEvent(prompt[0])] + event.logprobs)
                    continue
                if isinstance(event, TokenEvent):
                    if first:
                        self.m_ttft.observe(time.monotonic() - start)
                        first = False
                    held.append(event)
                    piece = text.push(event.token)
                    if text.stopped:
                        request.cancel()
                        yield Piece(index, piece, held, "stop", request.cached_tokens)
                        self._account(request, len(held))
                        return
                    if piece:
                        yield Piece(index, piece, held)
                        held = []
                    continue
                self._account(request, event.completion_tokens)
                if event.reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", type="server_error")
                if event.reason == "cancelled":
                    raise APIError(503, "the server is shutting down", type="server_error")
                yield Piece(index, text.flush(), held, event.reason, event.cached_tokens)
                return
        finally:
            request.cancel()
            self.m_latency.observe(time.monotonic() - start)

    def _account(self, request: EngineRequest, generated: int) -> None:
        self.m_prompt.inc(len(request.prompt))
        self.m_cached.inc(request.cached_tokens)
        self.m_generated.inc(generated)


def _merge(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Pieces of several choices as they come (choices run side by side in the engine's batch)."""
    async def merged():
        if len(streams) == 1:
            async for piece in streams[0]:
                yield piece
            return
        out: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(stream):
            try:
                async for piece in stream:
                    await out.put(piece)
                await out.put(done)
            except BaseException as e:  # handed to the consumer, which re-raises it
                await out.put(e)

        tasks = [asyncio.create_task(pump(s)) for s in streams]
        try:
            remaining = len(tasks)
            while remaining:
                item = await out.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each stream's own cleanup runs first
            for s in streams:
                await s.aclose()
    return merged()


def _token_text(server: Server, token: int) -> str:
    return server.tokenizer.decode([token], skip_special=False)


def _completion_logprobs(server: Server, tokens: list[TokenEvent], offset: int) -> dict[str, Any]:
    texts = [_token_text(server, t.token) for t in tokens]
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {_token_text(server, i): lp for i, lp in (t.top_logprobs or [])}
                             for t in tokens],
            "text_offset": offsets}


def _chat_logprobs(server: Server, tokens: list[TokenEvent]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(server, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in (t.top_logprobs or [])]} for t in tokens]}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _collect(stream: AsyncIterator[Piece], n: int, http: Request) -> list[Choice]:
    """Every choice in full; a client that goes away cancels the work."""
    choices = [Choice(i) for i in range(n)]

    async def consume():
        async for piece in stream:
            c = choices[piece.index]
            c.text += piece.text
            c.tokens.extend(piece.tokens)
            if piece.finish_reason:
                c.finish_reason, c.cached_tokens = piece.finish_reason, piece.cached_tokens
            if piece.prompt_logprobs is not None:
                c.prompt_logprobs = piece.prompt_logprobs

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await http.is_disconnected():
                raise APIError(499, "the client closed the request")
        task.result()  # an error from a choice surfaces here
        return choices
    finally:
        if not task.done():
            task.cancel()  # closes the choices' streams, which cancel their engine requests


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def _choices_usage(prompts: list[list[int]], n: int, choices: list[Choice]) -> dict[str, Any]:
    return _usage(sum(len(p) for p in prompts) * n, sum(len(c.tokens) for c in choices),
                  sum(c.cached_tokens for c in choices))


def _streaming(stream: AsyncIterator[Piece], chunk, final) -> StreamingResponse:
    async def body():
        try:
            async for piece in stream:
                for data in chunk(piece):
                    yield _sse(data)
            for data in final():
                yield _sse(data)
        except APIError as e:  # headers are gone: the error travels as an event, as OpenAI's does
            yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        finally:
            await stream.aclose()
        yield _sse("[DONE]")
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ----- the app ----------------------------------------------------------------------------------------

def create_app(server: Server, start_engine: bool = True) -> FastAPI:
    """The FastAPI app. With start_engine, the app runs the engine in a thread while it is up;
    `serve` instead runs the engine on the main thread (see Engine.run) and the app beside it."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            server.engine.start()
        try:
            yield
        finally:
            if start_engine:
                server.engine.stop()

    app = FastAPI(title="llamalite", version=__import__("llamalite").__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for a local LLaMA-family model")
    app.state.server = server
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # The one model id this server accepts, so the spec (and tools generating requests from it) know it.
        if app.openapi_schema is None:
            schema = default_openapi()
            for name in ("CompletionRequest", "ChatRequest"):
                fields = schema["components"]["schemas"][name]["properties"]
                fields["model"]["enum"] = [server.model_name]
                for key in ("max_tokens", "max_completion_tokens"):
                    if key in fields:  # a number or null: bound the number by the context
                        for option in fields[key].get("anyOf", [fields[key]]):
                            if option.get("type") == "integer":
                                option["maximum"] = server.engine.max_seq_len
            vocab = server.tokenizer.vocab_size - 1

            def bound_ids(node: Any) -> None:  # token ids: below the vocabulary size
                if isinstance(node, dict):
                    if node.get("type") == "integer" and node.get("minimum") == 0 and "maximum" not in node:
                        node["maximum"] = vocab
                    for v in node.values():
                        bound_ids(v)
                elif isinstance(node, list):
                    for v in node:
                        bound_ids(v)

            for name in ("CompletionRequest", "DetokenizeRequest"):
                bound_ids(schema["components"]["schemas"][name]["properties"].get("prompt" if name[0] == "C" else "tokens"))
        return app.openapi_schema

    app.openapi = openapi

    async def authorize(http: Request) -> None:
        if server.api_key is None:
            return
        header = http.headers.get("authorization", "")
        if header != f"Bearer {server.api_key}":
            raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _error(e.status, e.message, e.type, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}); "
                               "send a JSON object with Content-Type: application/json")
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        detail = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                           for err in errors[:5])
        return _error(400, f"invalid request: {detail}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    @app.middleware("http")
    async def count(http: Request, call_next):
        response = await call_next(http)
        route = http.scope.get("route")
        server.m_requests.labels(route.path if route else "other", str(response.status_code)).inc()
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("llamalite").joinpath("web/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_name, "active": server.engine.active,
                "queued": server.engine.queue_depth}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "llamalite",
                "context_length": server.engine.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        text = body.content if body.content is not None else body.prompt
        if text is None:
            raise APIError(400, "give the text to tokenize as content (or prompt)", param="content")
        special = next((v for v in (body.add_special, body.add_special_tokens) if v is not None), True)
        tokens = server.tokenizer.encode(text, add_bos=None if special else False)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.engine.max_seq_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        text = server.tokenizer.decode(server.check_ids(body.tokens, "tokens"))
        return {"content": text, "prompt": text}  # llama.cpp's name and vLLM's

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info() -> dict[str, Any]:
        """What a client needs to tokenize as the server does (vLLM's endpoint; lm-eval reads it)."""
        tok = server.tokenizer
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token if tok.bos_id is not None else None,
                "eos_token": tok.eos_token if tok.eos_id is not None else None, "pad_token": None,
                "add_bos_token": tok.add_bos, "chat_template": server.lm.chat_template,
                "model_max_length": server.engine.max_seq_len}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, http: Request):
        server.check_model(body.model)
        # The prompt's own log-probabilities (what lm-eval's loglikelihood reads), or an echo of nothing but it.
        score = body.echo and (body.logprobs is not None or body.max_tokens == 0)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is only for echo: scoring the prompt)",
                           param="max_tokens")
        raw = body.prompt
        prompts = ([raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)) or [""]
        ids = [server.prompt_ids(p) for p in prompts]
        budgets = [server.budget(len(p), body.max_tokens) for p in ids]
        stop = body.stop_strings()
        texts = [p if isinstance(p, str) else server.tokenizer.decode(p) for p in prompts]
        n = body.n
        stream = _merge([server.run(i * n + j, p, b, body, body.logprobs, stop, score)
                         for i, (p, b) in enumerate(zip(ids, budgets)) for j in range(n)])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        offsets = {}

        def choice_logprobs(index: int, tokens: list[TokenEvent]):
            if body.logprobs is None:
                return None
            out = _completion_logprobs(server, tokens, offsets.get(index, 0))
            if out["text_offset"]:
                offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
            return out

        if body.stream:
            usage_counts = {"completion": 0}
            echoed: set[int] = set()

            def chunk(piece: Piece):
                usage_counts["completion"] += len(piece.tokens)
                text, tokens = piece.text, piece.tokens
                if body.echo and piece.index not in echoed and (piece.prompt_logprobs is not None or not score):
                    echoed.add(piece.index)
                    text = texts[piece.index // n] + text
                    tokens = (piece.prompt_logprobs or []) + tokens
                if not text and not tokens and not piece.finish_reason:
                    return
                yield {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                       "choices": [{"index": piece.index, "text": text,
                                    "logprobs": choice_logprobs(piece.index, tokens),
                                    "finish_reason": piece.finish_reason}]}

            def final():
                if body.stream_options and body.stream_options.include_usage:
                    yield {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                           "choices": [], "usage": _usage(sum(len(x) for x in ids) * n, usage_counts["completion"])}
            return _streaming(stream, chunk, final)

        choices = await _collect(stream, len(ids) * n, http)
        return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                "choices": [{"index": c.index, "text": (texts[c.index // n] if body.echo else "") + c.text,
                             "logprobs": choice_logprobs(c.index, (c.prompt_logprobs or []) + c.tokens),
                             "finish_reason": c.finish_reason}
                            for c in choices],
                "usage": _choices_usage(ids, n, choices)}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, http: Request):
        server.check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            text = render_chat(server.lm.chat_template, server.tokenizer, messages)
        except TemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt = server.tokenizer.encode(text, add_bos=False)
        if not prompt:
            raise APIError(400, "the rendered conversation is empty", param="messages")
        budget = server.budget(len(prompt), body.max_completion_tokens or body.max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        stop, n = body.stop_strings(), body.n
        stream = _merge([server.run(j, prompt, budget, body, logprobs, stop) for j in range(n)])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}

        if body.stream:
            usage_counts = {"completion": 0}

            roles: set[int] = set()

            def chunk(piece: Piece):
                usage_counts["completion"] += len(piece.tokens)
                if piece.index not in roles:  # each choice opens with its role, as OpenAI's streams do
                    roles.add(piece.index)
                    yield {**head, "choices": [{"index": piece.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]}
                if piece.text or piece.tokens:
                    yield {**head, "choices": [{"index": piece.index, "delta": {"content": piece.text},
                                                "logprobs": _chat_logprobs(server, piece.tokens) if body.logprobs else None,
                                                "finish_reason": None}]}
                if piece.finish_reason:
                    yield {**head, "choices": [{"index": piece.index, "delta": {}, "logprobs": None,
                                                "finish_reason": piece.finish_reason}]}

            def final():
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": _usage(len(prompt) * n, usage_counts["completion"])}

            return _streaming(stream, chunk, final)

        choices = await _collect(stream, n, http)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": _chat_logprobs(server, c.tokens) if body.logprobs else None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": _choices_usage([prompt], n, choices)}

    return app


class BackgroundServer:
    """The app served by uvicorn in a thread on 127.0.0.1 and a free port, for tests, benchmarks and
    notebooks: `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def wait_until_serving(url: str, proc, timeout: float = 120) -> None:
    """Poll GET /health of a `llamalite serve` started as subprocess `proc` until it answers (tests,
    benchmarks); raise if the process exits first or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} did not start (its process "
                               f"{'exited' if proc.poll() is not None else 'is still starting'})")
        time.sleep(0.1)


def serve(lm: LoadedModel, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 8, max_seq_len: int | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM: the engine on this thread (the one that loaded the model), HTTP in
    another. Requests still running when it stops end with an error event (503), not a hang."""
    import signal
    import threading

    import uvicorn

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a service manager's stop: the same clean shutdown as Ctrl-C

    server = Server(lm, model_name, max_batch=max_batch, max_seq_len=max_seq_len, api_key=api_key)
    http = uvicorn.Server(uvicorn.Config(create_app(server, start_engine=False), host=host, port=port,
                                         log_level="info"))
    thread = threading.Thread(target=http.run, name="llamalite-http", daemon=True)
    thread.start()
    watcher = threading.Thread(target=lambda: (thread.join(), server.engine.stop()), daemon=True)
    watcher.start()  # the HTTP side ending (port taken, shutdown) ends the engine loop too
    try:
        server.engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        failed = not http.should_exit and not thread.is_alive()
        http.should_exit = True
        server.engine.stop()
        thread.join(timeout=10)
    if failed:
        raise OSError(f"could not serve on {host}:{port} (the reason is logged above); is the port in use? "
                      f"Try another with --port")
