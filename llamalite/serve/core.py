"""The shared core of the server: the `Server` object over the engine (one choice as a stream of pieces),
its metrics, and the responses that need a server: logprobs in OpenAI's shapes, a JSON body built off
the event loop, a stream of server-sent events. What needs no server is in protocol.py and streaming.py."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi.responses import Response, StreamingResponse

from ..generation.steps import ContextLengthError

from ..generation.stream import TextStream
from ..formats.loaded import LoadedModel
from ..generation.sampling import SamplingParams
from .engine import Engine, EngineClosed, PromptEvent, Request as EngineRequest, Runner, TokenEvent
from .guard import Limits
from .protocol import APIError
from .streaming import Piece, sse

if TYPE_CHECKING:
    from ..generation.constrain import Grammar
    from ..generation.prompt_cache import PromptCache
    from ..generation.speculative import Drafting


# ----- running one choice ----------------------------------------------------------------------------


class Metrics:
    """A server's Prometheus metrics; token counts and latencies by model, queue gauges over every loaded
    model (`servers` says which those are)."""

    def __init__(self, servers: Callable[[], list["Server"]]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("llamalite_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.prompt = Counter("llamalite_prompt_tokens", "prompt tokens received", ["model"], registry=r)
        self.cached = Counter("llamalite_cached_prompt_tokens", "prompt tokens reused from the KV cache", ["model"],
                              registry=r)
        self.generated = Counter("llamalite_generated_tokens", "tokens generated", ["model"], registry=r)
        self.latency = Histogram("llamalite_request_latency_seconds", "generation request latency", ["model"],
                                 registry=r, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("llamalite_time_to_first_token_seconds", "time to first token", ["model"], registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        Gauge("llamalite_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: sum(s.engine.queue_depth for s in servers()))
        Gauge("llamalite_active_requests", "requests being decoded", registry=r).set_function(
            lambda: sum(s.engine.active for s in servers()))
        Gauge("llamalite_batch_slots", "KV-cache slots (largest batch) of the loaded models", registry=r).set_function(
            lambda: sum(s.engine.max_batch for s in servers()))


class Server:
    """One loaded model served under a name: its engine and the checks and runs of its requests. A
    server of several models (hub.Hub) shares its runner, worker threads, metrics and limits among them."""

    def __init__(self, lm: LoadedModel, model_name: str, *, max_batch: int = 8, max_seq_len: int | None = None,
                 api_key: str | None = None, limits: Limits | None = None, pooling: str = "mean",
                 runner: Runner | None = None, prep: ThreadPoolExecutor | None = None, metrics: Metrics | None = None,
                 context_shift: bool = False, keep: int = 0, prompt_cache: "PromptCache | None" = None,
                 drafting: "Drafting | None" = None):
        self.lm, self.tokenizer, self.model_name, self.api_key = lm, lm.tokenizer, model_name, api_key
        self.pooling = pooling  # of /v1/embeddings: mean, last or cls (llamalite.generation.embed)
        self.engine = Engine(lm.model, max_batch=max_batch, max_seq_len=max_seq_len, runner=runner,
                             context_shift=context_shift, keep=keep, prompt_cache=prompt_cache, drafting=drafting)
        self.limits = limits or Limits.for_context(self.engine.max_seq_len)
        # No prompt text longer than this fits the context, since no token decodes to more characters
        # than the longest one in the vocabulary.
        vocab = self.tokenizer.vocab_size
        self.max_prompt_chars = self.engine.max_seq_len * max(len(self.tokenizer.decode([i], skip_special=False))
                                                              for i in range(vocab))
        # Tokenizing, rendering templates and building large responses run here, off the event loop.
        self.prep = prep or ThreadPoolExecutor(max_workers=2, thread_name_prefix="llamalite-prep")
        self.created = int(time.time())
        self.metrics = metrics or Metrics(lambda: [self])
        self.adapter: int | None = None  # the LoRA adapter this view of the model serves (with_adapter)
        self.views: dict[str, Server] = {}  # its adapters' views, by name (hub.Hub.build)

    def with_adapter(self, name: str, index: int) -> "Server":
        """This model served as `name` with its LoRA adapter `index` (adapters.AdapterSet): the same
        engine, slots and weights, each request's rows routed to the adapter."""
        view = copy.copy(self)
        view.model_name, view.adapter = name, index
        return view

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on a worker thread, so that the event loop keeps answering other clients."""
        return await asyncio.get_running_loop().run_in_executor(self.prep, functools.partial(fn, *args))

    def check_text(self, text: str, param: str) -> None:
        """Refuse, before tokenizing it, text that cannot fit the context whatever its tokens."""
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"the {param} is {len(text)} characters, more than the context of "
                                f"{self.engine.max_seq_len} tokens can hold; shorten it", param=param,
                           code="context_length_exceeded")

    def check_stop(self, stop: list[str]) -> list[str]:
        limit = self.limits.max_stop_chars
        if any(len(s) > limit for s in stop):
            raise APIError(400, f"a stop string is {max(map(len, stop))} characters; the most is {limit}", param="stop")
        return stop

    def check_choices(self, choices: int, param: str) -> None:
        """A request's prompts x n against the queue: too many for any queue is 400, for this one now 429."""
        limit = self.limits.max_queue
        if choices > self.engine.max_batch + limit:  # more than every slot and the whole queue
            raise APIError(400, f"the request asks for {choices} generations (prompts x n); the most is "
                                f"{self.engine.max_batch + limit}", param=param)
        free = self.engine.max_batch - self.engine.active
        if self.engine.queue_depth + choices - free > limit:
            raise APIError(429, f"the server is busy: {self.engine.queue_depth} generations are waiting (the most is "
                                f"{limit}); retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})

    def check_speculative(self, speculative: dict | None) -> None:
        """A request's speculative settings against what this server drafts with."""
        if not speculative:
            return
        drafting = self.engine.drafting
        if drafting is None:
            raise APIError(400, "this server decodes without drafts: speculative settings need a server started "
                                "with --draft-model or --lookup", param="speculative")
        try:
            drafting.for_request(**speculative)
        except ValueError as e:
            raise APIError(400, str(e).replace("--draft", "speculative.n_").replace("-max", "max").replace(
                "-min", "min"), param="speculative") from None

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary of {vocab}", param=param)
        return list(ids)

    def prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Text (tokenized as the model's tokenizer does) or token ids, checked; `param` names the field."""
        if isinstance(prompt, str):
            self.check_text(prompt, param)
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.check_ids(prompt, param)
        if not ids:
            raise APIError(400, f"the {param} is empty: give at least one token", param=param)
        return ids

    def budget(self, n_prompt: int, max_tokens: int | None, param: str = "messages",
               limit_param: str = "max_tokens") -> int:
        """max_tokens checked against the context (None: everything the context leaves); `param` and
        `limit_param` name the prompt's field and the limit's, as the request's API spells them."""
        ctx = self.engine.max_seq_len
        if max_tokens is None:
            if n_prompt >= ctx:
                raise APIError(400, f"the prompt is {n_prompt} tokens but the context is {ctx}; shorten it",
                               param=param, code="context_length_exceeded")
            return ctx - n_prompt
        try:
            self.engine.check(n_prompt, max_tokens)
        except ContextLengthError as e:
            message = str(e).replace("max_tokens", limit_param)
            raise APIError(400, message, param=limit_param, code="context_length_exceeded") from None
        return max_tokens

    async def run(self, index: int, prompt: list[int], max_tokens: int, sampling: SamplingParams, seed: int | None,
                  logprobs: int | None, stop: list[str], score_prompt: bool = False,
                  grammar: Grammar | None = None, speculative: dict | None = None,
                  stop_when: Callable[[str], bool] | None = None) -> AsyncIterator[Piece]:
        """One choice as a stream of pieces; leaving early (a client gone) cancels it in the engine. Choice
        `index` is seeded with seed + index; with a grammar, it gets its own matcher of it. `stop_when`
        (fed each piece of text in turn; a fresh one per choice) ends the choice, finish reason "stop",
        when it says so (a tool call repeated: calling.ToolCalling.stop_when)."""
        self.check_speculative(speculative)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = None if seed is None else (seed + index) % 2 ** 63
        request = EngineRequest(prompt, max_tokens=max_tokens, sampling=sampling,
                                stop_ids=self.tokenizer.end_ids, seed=seed, logprobs=logprobs,
                                score_prompt=score_prompt, constraint=grammar.matcher() if grammar else None,
                                adapter=self.adapter, speculative=speculative,
                                deliver=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        start = time.monotonic()
        first = True
        try:
            self.engine.submit(request)
        except EngineClosed:  # unloaded for another model between this request's checks and now
            raise APIError(503, f"the model '{self.model_name}' was just unloaded to make room for another; retry",
                           type="server_error", code="model_unloaded", headers={"Retry-After": "1"}) from None
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
                        self.metrics.ttft.labels(self.model_name).observe(time.monotonic() - start)
                        first = False
                    held.append(event)
                    piece = text.push(event.token)
                    if text.stopped or piece and stop_when is not None and stop_when(piece):
                        request.cancel()
                        yield Piece(index, piece, held, "stop", request.cached_tokens, stop_string=text.matched)
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
            self.metrics.latency.labels(self.model_name).observe(time.monotonic() - start)

    def _account(self, request: EngineRequest, generated: int) -> None:
        m, name = self.metrics, self.model_name
        m.prompt.labels(name).inc(len(request.prompt))
        m.cached.labels(name).inc(request.cached_tokens)
        m.generated.labels(name).inc(generated)


def _token_text(server: Server, token: int) -> str:
    return server.tokenizer.decode([token], skip_special=False)


def completion_logprobs(server: Server, tokens: list[TokenEvent], offset: int) -> dict[str, Any]:
    texts = [_token_text(server, t.token) for t in tokens]
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {_token_text(server, i): lp for i, lp in (t.top_logprobs or [])}
                             for t in tokens],
            "text_offset": offsets}


def chat_logprobs(server: Server, tokens: list[TokenEvent]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(server, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in (t.top_logprobs or [])]} for t in tokens]}


async def json_response(server: Server, build: Callable[[], dict[str, Any]]) -> Response:
    """A response body built and encoded on a worker thread: with logprobs it can run to megabytes."""
    body = await server.offload(lambda: json.dumps(build(), ensure_ascii=False).encode("utf-8"))
    return Response(body, media_type="application/json")


def streaming_response(server: Server, stream: AsyncIterator[Piece], chunk, final) -> StreamingResponse:
    async def body():
        try:
            async for piece in stream:
                if piece.prompt_logprobs is not None:  # a scored prompt: a large event, built off the loop
                    yield await server.offload(lambda: "".join(sse(data) for data in chunk(piece)))
                    continue
                for data in chunk(piece):
                    yield sse(data)
            for data in final():
                yield sse(data)
        except APIError as e:  # headers are gone: the error travels as an event, as OpenAI's does
            yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        finally:
            await stream.aclose()
        yield sse("[DONE]")
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
