"""The verbs that run a model: generate, chat, tokenize, info, bench, embed; and the model store's pull and list."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .options import (add_model_flags, generator_for, grammar_flags, grammar_from, kv_flags, open_model,
                      prompt_cache_from, prompt_cache_flags, prompt_cache_size, read_prompt, sampling_flags,
                      sampling_from, shift_flags, speculation_from, speculation_flags, split_flags)


def cmd_generate(args) -> int:
    from ..text.chat_template import encode_chat
    from ..generation.tokens import generate
    from ..generation.stream import stream_text

    prompt_cache_size(args)
    lm = open_model(args)
    cache = prompt_cache_from(args, lm)
    speculation = speculation_from(args, lm)
    text = read_prompt(args.prompt)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}]
        ids = encode_chat(lm.chat_template, lm.tokenizer, messages)
    else:
        ids = lm.tokenizer.encode(text)
    grammar = grammar_from(args, lm.tokenizer)
    tokens = generate(lm.model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling_from(args),
                      stop_ids=lm.tokenizer.end_ids, generator=generator_for(args.seed), truncate=args.truncate,
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
    prompt_cache_size(args)
    lm = open_model(args)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        cache = prompt_cache_from(args, lm)
        try:
            return chat_loop(args, lm, cache, speculation_from(args, lm))
        finally:
            if cache is not None:
                cache.close()
    speculation_from(args, lm)  # refused under torchrun, with the reason
    # Under torchrun: rank 0 holds the conversation (stdin is its own) and hands each forward of its part of
    # the model to the other ranks, which make the same call on theirs (as a split server does).
    import torch.distributed as dist

    from ..distributed.group import Leader, control_group, follow

    control = control_group()
    if dist.get_rank() != 0:
        follow(lm.model, control)
        return 0
    lm.model = leader = Leader(lm.model, control)
    try:
        return chat_loop(args, lm)
    finally:
        leader.close()


def chat_loop(args, lm, cache=None, speculation=None) -> int:
    from ..text.chat_template import encode_chat
    from ..generation.tokens import generate
    from ..generation.steps import ContextLengthError
    from ..generation.stream import stream_text

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"llamalite chat with {lm.path.name}. /clear starts over, /exit quits.", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    generator = generator_for(args.seed, every_rank=False)  # under torchrun, rank 0 alone samples (Leader)
    grammar = grammar_from(args, lm.tokenizer)
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
            tokens = generate(lm.model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling_from(args),
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
    from ..formats.load import load_tokenizer
    from ..formats.gguf import gguf_vocab_only
    from ..runtime.quantized import bytes_per_token, count_parameters
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
        **({"active_parameters": cfg.parameter_counts()[1], "experts": cfg.n_experts,
            "experts_per_token": cfg.n_experts_used, "expert_ffn_dim": cfg.expert_hidden_dim,
            "shared_expert_ffn_dim": cfg.shared_expert_dim, "dense_layers": list(cfg.dense_layers)}
           if cfg.n_experts else {}),
        "weight_bytes_per_token": bytes_per_token(lm.model),
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
            elif k in ("parameters", "active_parameters"):
                v = f"{v:,} ({v / 1e6:.1f}M)"
            elif k == "weight_bytes_per_token":
                v = f"{v:,} ({v / 2**20:.1f} MiB)"
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

    from ..distributed.group import from_env

    if args.threads:
        torch.set_num_threads(args.threads)
    shard = from_env()
    result = run_bench(resolve_model(args.model), args.prompt_tokens, args.gen_tokens, args.repeats,
                       compile=args.compile, shard=shard, pipeline=args.pp, kv_type=args.kv_type,
                       speculation=lambda lm: speculation_from(args, lm))  # None where no draft is asked for
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


def cmd_embed(args) -> int:
    from ..generation.embed import embed

    lm = open_model(args)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("give texts to embed as arguments, or one per line on stdin")
    for i, vector in enumerate(embed(lm, texts, args.pooling)):
        print(json.dumps({"index": i, "embedding": [round(x, 7) for x in vector.tolist()]}))
    return 0


def generate_flags(p):
    kv_flags(p)
    prompt_cache_flags(p)
    speculation_flags(p)
    shift_flags(p)
    add_model_flags(p, lora=True)
    split_flags(p)
    sampling_flags(p)
    grammar_flags(p)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", help="system prompt, with --chat")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens if it exceeds the context")
    p.add_argument("prompt", nargs="?", help="prompt text; '-' or nothing reads stdin")


def chat_flags(p):
    kv_flags(p)
    prompt_cache_flags(p)
    speculation_flags(p)
    shift_flags(p)
    add_model_flags(p, lora=True)
    sampling_flags(p)
    grammar_flags(p)
    split_flags(p)
    p.add_argument("--system", help="system prompt")


def tokenize_flags(p):
    add_model_flags(p)
    p.add_argument("--no-special", action="store_true", help="treat special-token texts as plain text")
    p.add_argument("text", nargs="?", help="text to tokenize (default: stdin)")


def info_flags(p):
    add_model_flags(p)
    p.add_argument("--json", action="store_true")


def bench_flags(p):
    kv_flags(p)
    speculation_flags(p)
    add_model_flags(p)
    split_flags(p)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--json", action="store_true", help="one JSON object (medians, with min and max)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compile time reported)")


def embed_flags(p):
    add_model_flags(p, lora=True)
    p.add_argument("--pooling", choices=("mean", "last", "cls"), default="mean",
                   help="pool the last hidden state over the text's tokens (mean, the default), or take the last "
                        "or first token's")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("texts", nargs="*", help="texts to embed (default: one per line from stdin)")


def pull_flags(p):
    p.add_argument("repo", help="ORG/NAME for a checkpoint, ORG/NAME/FILE.gguf for one file")
    p.add_argument("--revision", help="branch, tag or commit")
