"""Continuous batching: concurrent requests decoded together, one batched forward per step.

Each running request owns one row of the model's KV cache (a slot). Between steps, waiting requests
join (their prompt prefilled into a free slot, one chunk per step so running requests keep decoding)
and finished or cancelled ones leave. A slot remembers the tokens it holds after its request leaves:
a chat that resends its history is given the slot holding the longest common prefix, and only the
new tokens are computed.

A request's greedy output does not depend on what it is batched with: every row of a batched step
goes through the same per-row arithmetic as a batch of one (the kernels quantize and reduce each
activation row on its own; attention reads only the row's own cache), up to GEMV_MAX_ROWS rows.

The engine runs in one background thread; requests are handed over thread-safely and report back
through a callback (the server's event loop) or a queue (plain Python callers).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from ..generation.steps import PREFILL_CHUNK, ContextLengthError, common_prefix, shift_context
from ..model.transformer import Transformer
from ..generation.sampling import GREEDY, SamplingParams, choose

if TYPE_CHECKING:
    from ..generation.constrain import Matcher
    from ..generation.prompt_cache import Entry, PromptCache
    from ..generation.speculative import Drafting, Speculation


@dataclass
class TokenEvent:
    """One generated token, with its log-probability and the top alternatives when asked for."""
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class PromptEvent:
    """The prompt's own tokens scored (asked for with score_prompt): for each prompt token after the
    first, its log-probability given the tokens before it, and the top alternatives."""
    logprobs: list[TokenEvent]


@dataclass
class Finished:
    """The last event of a request: reason is "stop", "length", "cancelled" or "error"."""
    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused from an earlier request
    error: str | None = None


Event = TokenEvent | PromptEvent | Finished


class Request:
    """A prompt to complete. Events arrive through `deliver` (called on the engine's thread), or, by
    default, through a queue read by iterating over the request."""

    def __init__(self, prompt: Sequence[int], *, max_tokens: int, sampling: SamplingParams = GREEDY,
                 stop_ids: Sequence[int] = (), seed: int | None = None, logprobs: int | None = None,
                 score_prompt: bool = False, deliver: Callable[[Event], None] | None = None,
                 constraint: Matcher | None = None, adapter: int | None = None,
                 speculative: dict | None = None):
        if len(prompt) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if max_tokens < (0 if score_prompt else 1):
            raise ValueError("max_tokens must be at least 1 (0 only when scoring the prompt)")
        self.prompt, self.max_tokens, self.sampling = list(prompt), max_tokens, sampling
        self.stop_ids = frozenset(stop_ids)
        self.logprobs = logprobs
        self.score_prompt = score_prompt  # deliver a PromptEvent: what log-likelihood evaluations read
        self.constraint = constraint  # this sequence's grammar state (constrain.Matcher): masks its logits
        self.adapter = adapter  # the model's LoRA adapter for this request (adapters.AdapterSet), None: none
        self.speculative = speculative  # its settings of the engine's drafting (Drafting.for_request's arguments)
        self.speculation: Speculation | None = None  # made at admission
        self.prompt_logprobs: list[TokenEvent] = []
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        self.generated = 0
        self.cached_tokens = 0
        self.cancelled = False
        self.submitted = time.monotonic()
        self._queue: queue.Queue[Event] | None = None
        if deliver is None:
            self._queue = queue.Queue()
            deliver = self._queue.put
        self.deliver = deliver

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot before its next step."""
        self.cancelled = True

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise RuntimeError("this request delivers its events to a callback")
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, Finished):
                return


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)  # what this cache row holds, positions 0..len-1
    request: Request | None = None
    pending: int | None = None  # sampled, emitted, not yet in the cache: the next step's input
    adapter: int | None = None  # the LoRA adapter its cached keys and values were computed with
    last_used: float = 0.0
    shifted: bool = False  # its cache went through a context shift: no longer what a prefill would compute
    restore: "tuple[Entry, int] | None" = None  # a prompt-cache entry to load before its first prefill chunk

    @property
    def prefilling(self) -> bool:
        return self.request is not None and self.pending is None


class EngineClosed(RuntimeError):
    """A request handed to an engine that has been closed (its model unloaded, or the server stopping)."""


class Runner:
    """The one thread that drives every engine of a server, one scheduling round of each in turn.
    One thread, because GNU OpenMP keeps a thread team per calling thread, and once two teams exist on a
    machine with as many cores as one team it stops spin-waiting between parallel regions (one decode
    step is about 120 of them), which measured 2x slower here. Best run on the thread that loaded the
    first model, for the same reason."""

    def __init__(self):
        self.cv = threading.Condition()
        self.engines: list[Engine] = []
        self.stopping = False
        self._thread: threading.Thread | None = None

    def add(self, engine: "Engine") -> None:
        with self.cv:
            self.engines.append(engine)
            self.cv.notify()

    def retire(self, engine: "Engine") -> None:
        """Close `engine` once it has nothing left to do (what it runs now finishes first)."""
        with self.cv:
            engine.retiring = True
            self.cv.notify()

    def start(self) -> "Runner":
        """Run in a background thread (see the class for when to prefer the calling thread)."""
        if self._thread is None:
            self.stopping = False
            self._thread = threading.Thread(target=self.run, name="llamalite-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    def run(self) -> None:
        """Run every engine's requests until stop() is called."""
        try:
            while True:
                with self.cv:
                    while not self.stopping and not any(e.has_work() or e.retiring for e in self.engines):
                        self.cv.wait()
                    if self.stopping:
                        break
                    for engine in [e for e in self.engines if e.retiring and not e.has_work()]:
                        self.engines.remove(engine)
                        engine.close()
                    busy = [e for e in self.engines if e.has_work()]
                for engine in busy:
                    engine.tick()
        finally:  # stopped, or interrupted (Ctrl-C): every request still here hears that it is over
            with self.cv:
                engines = list(self.engines)
            for engine in engines:
                engine.drain()
                if engine.prompt_cache is not None:  # what the last requests left is written before the process ends
                    engine.prompt_cache.flush()


class Engine:
    """Schedules requests over one model with `max_batch` KV-cache rows of `max_seq_len` positions. Its
    rounds run on a Runner's thread: its own, or one shared with the other models of a server."""

    def __init__(self, model: Transformer, *, max_batch: int = 8, max_seq_len: int | None = None,
                 runner: Runner | None = None, context_shift: bool = False, keep: int = 0,
                 prompt_cache: PromptCache | None = None, drafting: Drafting | None = None):
        """With `context_shift`, a reply that fills its slot's context goes on: the first `keep` tokens (at
        least one; -1: the request's prompt) stay, half of the rest are dropped and the others move down
        (Transformer.shift_caches), as generate does; max_tokens is then bounded by nothing but itself.
        With a `prompt_cache` (llamalite.generation.prompt_cache, on disk), a prompt's prefix found there and longer
        than any slot's is loaded rather than computed, and what a slot holds when its request ends is
        saved (not for LoRA adapters' requests, nor after a context shift). With `drafting`
        (speculative.Drafting), each request's drafted tokens are checked in the step that decodes it, as
        rows of their own beside the other requests' (llamalite.generation.speculative)."""
        ctx = model.config.context_length
        self.model = model
        self.context_shift, self.keep = context_shift, keep  # keep -1: each request's whole prompt
        self.max_seq_len = min(ctx, max_seq_len or ctx)
        self.max_batch = max_batch
        self.prompt_cache = prompt_cache
        self.drafting = drafting
        model.setup_caches(max_batch, self.max_seq_len)
        if drafting is not None and drafting.draft_model is not None:
            drafting.draft_model.reserve(max_batch, self.max_seq_len)  # a draft cache row for each slot
        self.slots = [_Slot() for _ in range(max_batch)]
        self.waiting: deque[Request] = deque()
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "steps": 0,
                      "largest_batch": 0}
        self.runner = runner or Runner()
        self._cv = self.runner.cv
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()  # other work for the engine's thread
        self.retiring = False  # close once idle (Runner.retire)
        self.closed = False
        self.runner.add(self)

    # ----- the public side (any thread) -----

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextLengthError if a request of this size cannot run here."""
        if self.context_shift and prompt_tokens < self.max_seq_len:
            return
        if prompt_tokens + max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens and {max_tokens} more were asked for, but the context "
                f"is {self.max_seq_len} tokens; shorten the prompt or lower max_tokens")

    def submit(self, request: Request) -> Request:
        self.check(len(request.prompt), request.max_tokens)
        if request.speculative and self.drafting is None:
            raise ValueError("this model decodes without a draft: start the server with --draft-model or --lookup "
                             "for speculative settings")
        with self._cv:
            if self.closed:
                raise EngineClosed("this model has been unloaded")
            self.waiting.append(request)
            self._cv.notify()
        return request

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine's thread between two steps (a forward of another kind, such as
        embeddings: the model's thread team stays the only one); its result or error comes back in
        the Future."""
        future: Future = Future()
        with self._cv:
            if self.closed or self.runner.stopping:
                future.set_exception(EngineClosed("the server is shutting down" if self.runner.stopping else
                                                  "this model has been unloaded"))
                return future
            self._jobs.append((fn, future))
            self._cv.notify()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return sum(s.request is not None for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting or self._jobs) or any(s.request is not None for s in self.slots)

    def start(self) -> "Engine":
        """Run the engine (and any other on its runner) in a background thread."""
        self.runner.start()
        return self

    def stop(self) -> None:
        self.runner.stop()

    def run(self) -> None:
        """Schedule and run requests on this thread until stop() is called (see Runner)."""
        self.runner.run()

    # ----- the runner's thread -----

    def tick(self) -> None:
        """Work handed over by call(), then one scheduling round."""
        with self._cv:
            jobs = list(self._jobs)
            self._jobs.clear()
        for fn, future in jobs:
            if future.set_running_or_notify_cancel():  # not cancelled while it waited
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 (handed to the caller)
                    future.set_exception(e)
        if self.waiting or self.active:
            self.step()

    def close(self) -> None:
        """Refuse new work from now on, and end what is here."""
        with self._cv:
            self.closed = True
        self.drain()
        if self.prompt_cache is not None:
            self.prompt_cache.close()

    def drain(self) -> None:
        """Every request still here hears that it is over (cancelled); work handed over fails."""
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, "cancelled")
        with self._cv:
            waiting, self.waiting = list(self.waiting), deque()
            jobs, self._jobs = list(self._jobs), deque()
        for r in waiting:
            r.deliver(Finished("cancelled", len(r.prompt), 0))
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineClosed("the server is shutting down"))

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling round: drop cancelled requests, admit waiting ones, prefill one chunk, then
        decode one token for every running request in one batched forward."""
        self.stats["steps"] += 1
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot, "cancelled")
        self._admit()
        prefilling = [s for s in self.slots if s.prefilling]
        if prefilling:
            slot = min(prefilling, key=lambda s: s.request.submitted)  # first come, first prefilled
            self._guard([slot], lambda: self._prefill_chunk(slot))
        decoding = [s for s in self.slots if s.request is not None and s.pending is not None]
        if decoding:
            self._guard(decoding, lambda: self._decode(decoding))

    def _guard(self, slots: list[_Slot], work: Callable[[], None]) -> None:
        # A failing forward fails the requests in it, never the engine; their cache rows are unknown.
        try:
            work()
        except Exception as e:  # noqa: BLE001 (reported to each request, the engine goes on)
            for slot in slots:
                if slot.request is not None:
                    self._finish(slot, "error", f"{type(e).__name__}: {e}")
                slot.tokens = []

    def _admit(self) -> None:
        with self._cv:
            if any(r.cancelled for r in self.waiting):  # anywhere in the queue: a client gone frees its place now
                for request in [r for r in self.waiting if r.cancelled]:
                    request.deliver(Finished("cancelled", len(request.prompt), 0))
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            while self.waiting:
                request = self.waiting[0]
                free = [s for s in self.slots if s.request is None]
                if not free:
                    return
                self.waiting.popleft()
                # The slot already holding most of this prompt; among equals, the least recently used. A
                # cache computed with another adapter holds other keys and values: nothing of it is reused.
                def reusable(s: _Slot) -> int:
                    return common_prefix(s.tokens, request.prompt) if s.adapter == request.adapter else 0
                slot = max(free, key=lambda s: (reusable(s), -s.last_used))
                keep = min(reusable(slot), len(request.prompt) - 1)
                if request.score_prompt:
                    keep = 0  # every prompt position's logits are needed: nothing comes from the cache
                slot.tokens = slot.tokens[:keep]
                slot.request, slot.pending, slot.adapter = request, None, request.adapter
                if self.drafting is not None:
                    request.speculation = self.drafting.for_request(**(request.speculative or {}))
                if self.prompt_cache is not None and request.adapter is None and not request.score_prompt:
                    entry, n = self.prompt_cache.lookup(self.model, request.prompt)
                    n = min(n, len(request.prompt) - 1)
                    slot.restore = (entry, n) if n > keep else None
                request.cached_tokens = keep
                self.stats["requests"] += 1
                self.stats["prompt_tokens"] += len(request.prompt)
                self.stats["cached_tokens"] += keep

    def _prefill_chunk(self, slot: _Slot) -> None:
        request, row = slot.request, self.slots.index(slot)
        if slot.restore is not None:  # found on disk: loaded here, off the admission lock
            (entry, n), slot.restore = slot.restore, None
            if self.prompt_cache.restore(self.model, entry, n, row):
                slot.tokens = list(request.prompt[:n])
                self.stats["cached_tokens"] += n - request.cached_tokens
                request.cached_tokens = n
        lo = len(slot.tokens)
        chunk = request.prompt[lo:lo + PREFILL_CHUNK]
        device = self.model.device
        with self._adapters([request.adapter]):
            logits = self.model(torch.tensor([chunk], device=device), torch.arange(lo, lo + len(chunk), device=device),
                                last_only=not request.score_prompt, rows=torch.tensor([row], device=device))
        slot.tokens.extend(chunk)
        if request.score_prompt:  # logits at position i score prompt token i + 1
            targets = request.prompt[lo + 1:lo + len(chunk) + 1]
            request.prompt_logprobs += self._logprob_events(logits[0, :len(targets)], targets, request.logprobs)
        if len(slot.tokens) == len(request.prompt):
            if request.score_prompt:
                request.deliver(PromptEvent(request.prompt_logprobs))
                if request.max_tokens == 0:
                    self._finish(slot, "length")
                    return
            self._sampled(slot, logits[0, -1])

    @staticmethod
    def _logprob_events(logits: torch.Tensor, targets: list[int], top: int | None) -> list[TokenEvent]:
        logp = logits.float().log_softmax(-1)  # (T, vocab)
        chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
        events = [TokenEvent(t, lp) for t, lp in zip(targets, chosen)]
        if top:
            values, indices = logp.topk(top, dim=-1)
            for e, i, v in zip(events, indices.tolist(), values.tolist()):
                # Tokens a constraint or a -100 bias ruled out have no probability: not alternatives.
                e.top_logprobs = [(t, lp) for t, lp in zip(i, v) if lp != float("-inf")]
        return events

    def _decode(self, slots: list[_Slot]) -> None:
        # Each slot's next token, and the tokens drafted to follow it (speculation): one row each, all in
        # the slot's cache row at consecutive positions; a row attends to the positions up to its own.
        device = self.model.device
        feeds, qs = [], []
        for slot in slots:
            drafts, q, spec = [], None, slot.request.speculation
            if spec is not None:
                r = slot.request
                drafts, q = spec.propose(slot.tokens + [slot.pending], r.max_tokens - r.generated - 1,
                                         self.max_seq_len - len(slot.tokens) - 2, r.sampling, r.generator,
                                         self.slots.index(slot))
            feeds.append([slot.pending] + drafts)
            qs.append(q)
        tokens = torch.tensor([t for feed in feeds for t in feed], device=device)[:, None]
        pos = torch.tensor([len(s.tokens) + i for s, feed in zip(slots, feeds) for i in range(len(feed))],
                           device=device)[:, None]
        rows = torch.tensor([self.slots.index(s) for s, feed in zip(slots, feeds) for _ in feed], device=device)
        with self._adapters([s.request.adapter for s, feed in zip(slots, feeds) for _ in feed]):
            logits = self.model(tokens, pos, rows=rows)  # (rows, 1, vocab)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(slots))
        at = 0
        for slot, feed, q in zip(slots, feeds, qs):
            slot.tokens.append(slot.pending)
            slot.pending = None
            for j in range(len(feed)):
                draft = feed[j + 1] if j + 1 < len(feed) else None
                if not self._sampled(slot, logits[at + j, -1], draft, q[j] if q and draft is not None else None):
                    break
            if len(feed) > 1 and slot.request is not None:
                slot.request.speculation.checked(len(feed) - 1, j)
            at += len(feed)

    def _adapters(self, row_adapters: list[int | None]):
        """Each row of the next forward routed to its LoRA adapter (when the model serves any)."""
        adapters = getattr(self.model, "adapters", None)
        return adapters.use(row_adapters) if adapters is not None else contextlib.nullcontext()

    def _sampled(self, slot: _Slot, logits: torch.Tensor, draft: int | None = None,
                 q: torch.Tensor | None = None) -> bool:
        """Draw the request's next token from its logits and report it (or finish). With a drafted token
        to check (sampling.choose): True when it is the token taken and the request goes on, so that
        the next row (computed after it) holds the next token's logits."""
        request = slot.request
        if request.constraint is not None:  # this row's own mask: a batch mixes free and constrained rows
            logits = request.constraint.mask(logits)
        token = choose(logits, request.sampling, slot.tokens, request.generator, draft, q)  # sample() without a draft
        if token in request.stop_ids:
            self._finish(slot, "stop")
            return False
        if request.constraint is not None:
            request.constraint.advance(token)
        if request.logprobs is None:
            event = TokenEvent(token)
        else:
            event = self._logprob_events(logits[None], [token], request.logprobs)[0]
        request.generated += 1
        self.stats["generated_tokens"] += 1
        request.deliver(event)
        if request.constraint is not None and request.constraint.done:  # complete: nothing more may follow
            self._finish(slot, "stop")
        elif request.generated >= request.max_tokens:
            self._finish(slot, "length")
        elif not self.context_shift and len(slot.tokens) + 1 >= self.max_seq_len:
            self._finish(slot, "length")
        elif len(slot.tokens) >= self.max_seq_len and not self._shift(slot):  # no position left for it
            self._finish(slot, "length")
        elif token == draft:  # computed in this step, at the next position: the next row follows it
            request.speculation.stats.accepted += 1
            slot.tokens.append(token)
            return True
        else:
            slot.pending = token
        return False

    def _shift(self, slot: _Slot) -> bool:
        """Make room in a full slot by a context shift, if the engine does them and there is room to make."""
        if not self.context_shift:
            return False
        keep = max(1, len(slot.request.prompt) if self.keep < 0 else self.keep)
        tokens = shift_context(self.model, slot.tokens, keep, row=self.slots.index(slot))
        if tokens is None:
            return False
        slot.tokens, slot.shifted = tokens, True
        return True

    def _finish(self, slot: _Slot, reason: str, error: str | None = None) -> None:
        request = slot.request
        if self.prompt_cache is not None and reason != "error" and not slot.shifted and slot.adapter is None:
            self.prompt_cache.save(self.model, slot.tokens, self.slots.index(slot))
        slot.request, slot.pending, slot.last_used, slot.restore = None, None, time.monotonic(), None
        if slot.shifted:  # its keys and values are not what a prompt's prefill gives: not a prefix to reuse
            slot.tokens, slot.shifted = [], False
        request.deliver(Finished(reason, len(request.prompt), request.generated, request.cached_tokens, error))
