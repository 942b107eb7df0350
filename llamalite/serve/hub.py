"""The models one server serves, by name. Each model has its own engine and KV-cache slots; every
engine runs on one shared thread (engine.Runner) and the models share the worker threads, metrics and
limits. With `max_loaded`, a model is loaded on its first request and the least recently used beyond
that many are unloaded: a request to a cold model waits for its load while the others keep streaming,
and a model being unloaded finishes what it is running first."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..formats.loaded import LoadedModel
from ..generation.speculative import Drafting
from .core import Metrics, Server
from .protocol import APIError
from .engine import Runner
from .guard import Limits, clip


class Hub:
    """Served models by name: `loaders` maps each name to what loads it (called on a worker thread)."""

    def __init__(self, loaders: dict[str, Callable[[], LoadedModel]], *, max_loaded: int | None = None,
                 max_batch: int = 8, max_seq_len: int | None = None, api_key: str | None = None,
                 limits: Limits | None = None, pooling: str = "mean",
                 adapters: dict[str, tuple[str, str | Path]] | None = None, context_shift: bool = False,
                 keep: int = 0, prompt_cache: str | Path | None = None, prompt_cache_size: int | None = None,
                 drafting: "Callable[[LoadedModel], Drafting | None] | None" = None):
        """`adapters`: name -> (the model it adapts, its path), LoRA adapters served unmerged on that model
        (llamalite.runtime.adapters), each a model name of its own. `prompt_cache`: a directory where each model
        keeps its processed prompts across restarts (llamalite.generation.prompt_cache), at most `prompt_cache_size`
        bytes in all. `drafting`: what each model, once loaded, drafts with (speculative.Drafting; a draft
        model of its own, loaded beside it)."""
        if not loaders:
            raise ValueError("a server needs at least one model")
        for name, (base, _) in (adapters or {}).items():
            if base not in loaders:
                raise ValueError(f"the adapter '{name}' is for the model '{base}', which is not served "
                                 f"(served: {', '.join(loaders)})")
            if name in loaders:
                raise ValueError(f"'{name}' names both a model and an adapter; name them apart")
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("--max-loaded must be at least 1")
        self.loaders = dict(loaders)
        self.adapters = dict(adapters or {})
        self.max_loaded = max_loaded
        self.options = {"max_batch": max_batch, "max_seq_len": max_seq_len, "pooling": pooling,
                        "context_shift": context_shift, "keep": keep, "prompt_cache": prompt_cache,
                        "prompt_cache_size": prompt_cache_size, "drafting": drafting}
        self.api_key = api_key
        self.limits = limits or Limits.for_context(max_seq_len or 2048)
        self.runner = Runner()
        self.prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llamalite-prep")
        self.loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamalite-load")  # one load at a time
        self.servers: OrderedDict[str, Server] = OrderedDict()  # loaded, least recently used first
        self.metrics = Metrics(lambda: list(self.servers.values()))
        self.contexts: dict[str, int] = {}  # each model's context once it has been loaded
        self.created = int(time.time())
        self._loading: dict[str, asyncio.Future] = {}

    @classmethod
    def of(cls, server: Server) -> "Hub":
        """A hub of one model already loaded, sharing its runner, workers and metrics: what
        `create_app(server)` serves."""
        hub = cls({server.model_name: lambda: server.lm}, api_key=server.api_key, limits=server.limits)
        hub.runner, hub.prep, hub.metrics, hub.created = server.engine.runner, server.prep, server.metrics, server.created
        hub.servers[server.model_name] = server
        hub.contexts[server.model_name] = server.engine.max_seq_len
        return hub

    @property
    def names(self) -> list[str]:
        return list(self.loaders) + list(self.adapters)

    @property
    def first(self) -> Server | None:
        """The first model named, if loaded: what routes without a model field (/tokenize) use."""
        return self.servers.get(self.names[0])

    def build(self, name: str) -> Server:
        """Load `name` and make its server (blocking: call it from a worker thread or at start-up)."""
        o = self.options
        lm = self.loaders[name]()
        mine = {a: path for a, (base, path) in self.adapters.items() if base == name}
        if mine:
            from ..runtime.adapters import AdapterSet
            from ..formats.adapters import read_adapter

            served = AdapterSet(lm.model)
            for adapter, path in mine.items():
                served.add(adapter, read_adapter(path, lm.model.config, lm.path))
        cache = None
        if o["prompt_cache"] is not None:
            from ..generation.prompt_cache import DEFAULT_SIZE, PromptCache, model_key

            cache = PromptCache(o["prompt_cache"], model_key(lm), o["prompt_cache_size"] or DEFAULT_SIZE)
        server = Server(lm, name, max_batch=o["max_batch"], max_seq_len=o["max_seq_len"],
                        api_key=self.api_key, limits=self.limits, pooling=o["pooling"], runner=self.runner,
                        prep=self.prep, metrics=self.metrics, context_shift=o["context_shift"], keep=o["keep"],
                        prompt_cache=cache, drafting=o["drafting"](lm) if o["drafting"] is not None else None)
        server.created = self.created
        server.views = {adapter: server.with_adapter(adapter, k) for k, adapter in enumerate(mine)}
        self.contexts[name] = server.engine.max_seq_len
        for adapter in mine:
            self.contexts[adapter] = server.engine.max_seq_len
        return server

    def load_all(self) -> None:
        """Load every model now (the default without max_loaded: a bad path fails at start, not later)."""
        for name in self.loaders:
            if name not in self.servers:
                self.servers[name] = self.build(name)

    def check_name(self, name: str, param: str = "model") -> None:
        if name not in self.loaders and name not in self.adapters:
            served = ", ".join(f"'{n}'" for n in self.names)
            raise APIError(404, f"the model '{clip(name)}' does not exist; this server serves {served} "
                                f"(GET /v1/models lists them)", param=param, code="model_not_found")

    async def get(self, name: str, param: str = "model") -> Server:
        """The server of model `name`, loading it first if it is cold (every request for it meanwhile waits
        on the same load)."""
        self.check_name(name, param)
        if name in self.adapters:  # the adapted model's server, seen as the adapter
            return (await self.get(self.adapters[name][0], param)).views[name]
        server = self.servers.get(name)
        if server is not None:
            self.servers.move_to_end(name)
            return server
        pending = self._loading.get(name)
        if pending is None:
            pending = self._loading[name] = asyncio.get_running_loop().run_in_executor(self.loads, self.build, name)

            def loaded(future: asyncio.Future) -> None:  # on the event loop, whoever is still waiting
                self._loading.pop(name, None)
                if not future.cancelled() and future.exception() is None:
                    self.servers[name] = future.result()
                    self._evict()
            pending.add_done_callback(loaded)
        try:
            return await asyncio.shield(pending)  # a client that leaves does not cancel the load
        except Exception as e:  # noqa: BLE001 (a load that fails is a 503, and the next request tries again)
            raise APIError(503, f"the model '{name}' could not be loaded: {clip(str(e), 300)}", type="server_error",
                           code="model_load_failed") from None

    def _evict(self) -> None:
        """Unload the least recently used models beyond max_loaded: each stops taking requests now and is
        closed once what it runs has finished."""
        while self.max_loaded is not None and len(self.servers) > self.max_loaded:
            _, server = self.servers.popitem(last=False)
            self.runner.retire(server.engine)

    def cards(self) -> list[dict]:
        """/v1/models' entries: every model served, loaded or not."""
        def card(name: str) -> dict:
            base = self.adapters[name][0] if name in self.adapters else None
            out = {"id": name, "object": "model", "created": self.created, "owned_by": "llamalite",
                   "context_length": self.contexts.get(name), "loaded": (base or name) in self.servers}
            return {**out, "parent": base} if base else out
        return [card(name) for name in self.names]

    def start(self) -> None:
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop()
