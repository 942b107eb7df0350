"""`llamalite eval` (perplexity, multiple-choice scoring) and `llamalite lm-eval` (lm-evaluation-harness)."""

from __future__ import annotations

import json

from .options import add_model_flags, open_model, split_flags


def cmd_eval(args) -> int:
    from pathlib import Path

    from ..eval.scoring import multiple_choice, perplexity, read_tasks

    lm = open_model(args)
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


def eval_flags(p):
    p.add_argument("kind", choices=("perplexity", "tasks"), help="perplexity of a text file, or multiple-choice tasks")
    p.add_argument("file", nargs="?", help="the text file (perplexity)")
    add_model_flags(p, lora=True)
    split_flags(p)
    p.add_argument("--ctx", type=int, default=512, help="perplexity window in tokens (default 512, as llama.cpp)")
    p.add_argument("--tasks", help="JSONL task file (default: llamalite's basic_facts.jsonl, 40 questions)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--json", action="store_true", help="one JSON report")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
