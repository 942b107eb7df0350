"""Evaluation as the papers and llama.cpp do it: perplexity over a text file, and zero-shot multiple
choice by log-likelihood (accuracy and length-normalized accuracy, as lm-evaluation-harness reports).

Perplexity follows llama.cpp's `perplexity` tool (tools/perplexity/perplexity.cpp): the whole file is
tokenized once (with BOS where the model adds one), cut into non-overlapping windows of `ctx`
tokens, each window's first token is replaced by BOS, and only the second half of each window is
scored (every scored token then has at least ctx/2 tokens of context). Figures are therefore
comparable with llama.cpp's for the same model, file and context.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..text.tokenizer import Tokenizer


class EvalError(ValueError):
    """Input an evaluation cannot use; the message says what to give instead."""


@torch.inference_mode()
def perplexity(model: Callable[[torch.Tensor], torch.Tensor], tokenizer: Tokenizer, text: str, ctx: int = 512,
               progress: bool = True, device: str | torch.device = "cpu") -> dict:
    """llama.cpp's perplexity of `text` with windows of `ctx` tokens (see the module docstring)."""
    from tqdm import tqdm

    if ctx < 4:
        raise EvalError(f"ctx must be at least 4 tokens, got {ctx}")
    limit = getattr(getattr(model, "config", None), "context_length", None)
    if limit is not None and ctx > limit:
        raise EvalError(f"ctx {ctx} exceeds the model's context of {limit}")
    tokens = tokenizer.encode(text, parse_special=False)
    n_chunk = len(tokens) // ctx
    if len(tokens) < 2 * ctx:  # as llama.cpp: at least two windows
        raise EvalError(f"the text is {len(tokens)} tokens; perplexity with ctx {ctx} needs at least {2 * ctx}: "
                        f"give more text or a smaller --ctx")
    first = ctx // 2
    nll, count = 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(n_chunk), desc="perplexity", unit="window", disable=not progress):
        window = tokens[i * ctx:(i + 1) * ctx]
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            window = [tokenizer.bos_id] + window[1:]
        logits = model(torch.tensor([window], device=device))[0, first:ctx - 1].float()  # predicts first+1 ..
        targets = torch.tensor(tokens[i * ctx + first + 1:(i + 1) * ctx], device=logits.device)
        nll -= float(logits.log_softmax(-1).gather(1, targets[:, None]).sum())
        count += len(targets)
    seconds = time.perf_counter() - start
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "ctx": ctx, "windows": n_chunk,
            "scored_tokens": count, "tokens": len(tokens), "seconds": seconds,
            "tokens_per_second": n_chunk * ctx / seconds}


@dataclass
class Item:
    """One multiple-choice question: the model continues `context` with each choice."""
    context: str
    choices: list[str]
    gold: int
    delimiter: str = " "


def read_tasks(path: str | Path) -> list[Item]:
    """A JSONL task file: {"context": ..., "choices": [...], "gold": index} per line (optional
    "delimiter" between context and choice, default one space, as lm-evaluation-harness)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EvalError(f"no task file at {path}")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            item = Item(r["context"], list(r["choices"]), int(r["gold"]), r.get("delimiter", " "))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EvalError(f"{path}:{n}: each line must be {{\"context\": str, \"choices\": [str, ...], "
                            f"\"gold\": int}} ({type(e).__name__}: {e})") from e
        if not 0 <= item.gold < len(item.choices) or len(item.choices) < 2:
            raise EvalError(f"{path}:{n}: gold {item.gold} must index one of at least two choices")
        items.append(item)
    if not items:
        raise EvalError(f"{path} holds no questions")
    return items


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness makes them: trailing spaces of the context
    move to the continuation, the pair is encoded whole, and the continuation is what follows the
    context's own encoding (so a merge across the boundary is scored with the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, parse_special=False)
    ctx = tokenizer.encode(context, parse_special=False)
    return whole[:len(ctx)], whole[len(ctx):]


@torch.inference_mode()
def loglikelihood(model: Callable[[torch.Tensor], torch.Tensor], context: list[int], continuation: list[int],
                  device: str | torch.device = "cpu") -> tuple[float, bool]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
    if not continuation:
        raise EvalError("a choice encodes to no tokens")
    ids = (context + continuation)[-getattr(getattr(model, "config", None), "context_length", 1 << 30) - 1:]
    logits = model(torch.tensor([ids[:-1]], device=device))[0, -len(continuation):].float()
    logp = logits.log_softmax(-1)
    target = torch.tensor(continuation, device=logp.device)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def multiple_choice(model, tokenizer: Tokenizer, items: Sequence[Item], progress: bool = True,
                    device: str | torch.device = "cpu") -> dict:
    """Zero-shot accuracy (argmax of the choices' log-likelihoods) and length-normalized accuracy
    (log-likelihood divided by the choice's length in characters, the delimiter not counted), with
    standard errors, all as lm-evaluation-harness computes them (tests/test_harness.py checks)."""
    from tqdm import tqdm

    acc = acc_norm = 0
    for item in tqdm(items, desc="questions", unit="q", disable=not progress):
        scores = []
        for choice in item.choices:
            ctx, cont = encode_pair(tokenizer, item.context, item.delimiter + choice)
            scores.append(loglikelihood(model, ctx, cont, device)[0])
        acc += max(range(len(scores)), key=scores.__getitem__) == item.gold
        normed = [s / len(c) for s, c in zip(scores, item.choices)]  # the choice's characters, as lm-eval
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == item.gold
    n = len(items)

    def stderr(k: int) -> float:  # of a proportion, as lm-evaluation-harness (sample standard deviation / sqrt n)
        p = k / n
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0

    return {"acc": acc / n, "acc_stderr": stderr(acc), "acc_norm": acc_norm / n, "acc_norm_stderr": stderr(acc_norm),
            "n": n}
