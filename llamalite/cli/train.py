"""The training wing: prepare, train, finetune, export."""

from __future__ import annotations

import json
import os
import sys
import time

from .options import run_config, run_flags


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


def cmd_train(args) -> int:
    import torch

    from ..train.config import TrainConfig
    from ..train.loop import train

    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(run_config(args, TrainConfig))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(json.dumps(result), file=sys.stderr)
    return 0


def cmd_finetune(args) -> int:
    import torch

    from ..train.config import FinetuneConfig
    from ..train.finetune import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = run_config(args, FinetuneConfig)
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
        from ..ondevice.export import DTYPES
        from ..ondevice.program import require_executorch

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
        from ..ondevice.export import export_executorch
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


def prepare_flags(p):
    p.add_argument("inputs", nargs="+", help="text, Markdown or JSONL files (a 'text' field), or directories of them")
    p.add_argument("--out", required=True, help="directory for the token shards and index.json")
    p.add_argument("--tokenizer", help="model (or tokenizer.json / tokenizer.model) whose tokenizer to use")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                   help="train a byte-level BPE of this vocabulary size on the corpus instead")
    p.add_argument("--val-every", type=int, default=100, help="every N-th piece of text goes to validation (default 100)")


def train_flags(p):
    from ..train.config import TrainConfig

    run_flags(p, TrainConfig)


def finetune_flags(p):
    from ..train.config import FinetuneConfig

    run_flags(p, FinetuneConfig)


def export_flags(p):
    p.add_argument("source", help="a training checkpoint (ckpt-*.pt, best.pt, or the run directory: its best) "
                                  "or any model llamalite loads")
    p.add_argument("--to", choices=("gguf", "hf", "adapter", "executorch"), required=True,
                   help="a GGUF file, a Hugging Face directory, (LoRA fine-tunes) the adapter alone in PEFT's layout, "
                        "or an ExecuTorch program (.pte) for phones and TVs")
    p.add_argument("--dtype", help="gguf: f32, f16, q8_0, q4_1, q4_0, mxfp4 (experts MXFP4, the rest q8_0); hf: f32, "
                                   "f16, bf16 (default f32); executorch: fp32, 8da4w, 8da8w (default fp32)")
    p.add_argument("--out", required=True, help="the .gguf or .pte file, or the Hugging Face / adapter directory")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="executorch: the positions its KV cache holds (default: the model's context, at most 2048)")
    p.add_argument("--max-memory", metavar="SIZE", help="executorch: refuse a KV cache bigger than this (e.g. 512M)")
