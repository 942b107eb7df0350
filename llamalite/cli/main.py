"""The `llamalite` command. The verb table below is the program's map: each verb's handler and flags live in
its wing (run, serve, train, eval; shared flag groups in options) and import what they need when they run,
so `--help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from .eval import cmd_eval, cmd_lm_eval, eval_flags
from .options import TENSOR_PARALLEL
from .run import (bench_flags, chat_flags, cmd_bench, cmd_chat, cmd_embed, cmd_generate, cmd_info, cmd_list, cmd_pull,
                  cmd_tokenize, embed_flags, generate_flags, info_flags, pull_flags, tokenize_flags)
from .serve import cmd_serve, serve_flags
from .train import (cmd_export, cmd_finetune, cmd_prepare, cmd_train, export_flags, finetune_flags, prepare_flags,
                    train_flags)


def _passthrough(argv: list[str]) -> Any:
    """The arguments of a verb that hands them all to another program (argparse would take its flags)."""
    return argparse.Namespace(verb=argv[0], args=argv[1:], handler=VERBS[argv[0]][0])


# verb -> (handler, help, argument setup): the program's map
VERBS: dict[str, tuple[Callable[[Any], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "generate": (cmd_generate, "complete a prompt and print the completion", generate_flags),
    "chat": (cmd_chat, "chat in the terminal (or one message per line from a pipe)", chat_flags),
    "tokenize": (cmd_tokenize, "print the token ids of a text as JSON", tokenize_flags),
    "info": (cmd_info, "show a model's architecture, sizes, quantization and template", info_flags),
    "bench": (cmd_bench, "measure load, prefill, decode, time to first token and memory", bench_flags),
    "embed": (cmd_embed, "print each text's embedding (pooled last hidden state, L2-normalized) as a JSON line",
              embed_flags),
    "serve": (cmd_serve, "serve the OpenAI API (completions, chat, streaming, batching) and a chat page", serve_flags),
    "prepare": (cmd_prepare, "tokenize a corpus into training shards (or train a tokenizer on it)", prepare_flags),
    "train": (cmd_train, "pretrain a LLaMA on prepared data with the paper's recipe; --resume continues", train_flags),
    "finetune": (cmd_finetune, "fine-tune a model (LoRA, or --full) on chat, prompt/completion or text JSONL",
                 finetune_flags),
    "export": (cmd_export, "write a checkpoint or model as GGUF (f32/f16/q8_0/q4_1/q4_0/mxfp4), Hugging Face files "
                           "or a LoRA adapter", export_flags),
    "eval": (cmd_eval, "perplexity (llama.cpp's method) or zero-shot multiple-choice accuracy", eval_flags),
    "lm-eval": (cmd_lm_eval, "run lm-evaluation-harness with the `llamalite` model type (lm-eval's own arguments)",
                lambda p: p.add_argument("args", nargs=argparse.REMAINDER, help="e.g. --model llamalite --model_args "
                                         "model=PATH --tasks hellaswag")),
    "pull": (cmd_pull, "download a model from the Hugging Face Hub into the store", pull_flags),
    "list": (cmd_list, "list the models in the store", lambda p: None),
}


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
