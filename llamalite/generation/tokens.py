"""generate(): an iterator of token ids over a model with a static KV cache (steps.py: the prompt's
prefill with prefix reuse, the context shift), sampled by sampling.py's rule, optionally drafted
(speculative.py) and constrained (constrain.py). stream.py turns the ids into text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator, Sequence

import torch

from ..model.transformer import Transformer
from .sampling import SamplingParams, choose
from .steps import ensure_cache, fit_prompt, prefill, shift_context

if TYPE_CHECKING:
    from .constrain import Matcher
    from .prompt_cache import PromptCache
    from .speculative import Speculation


def generate(model: Transformer, prompt: Sequence[int], *, max_new_tokens: int = 256,
             sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
             generator: torch.Generator | None = None, truncate: bool = False,
             constraint: Matcher | None = None, context_shift: bool = False,
             keep: int = 0, prompt_cache: PromptCache | None = None,
             speculation: Speculation | None = None) -> Generator[int, None, str]:
    """Yield new token ids; the generator's return value is the finish reason, "stop" or "length".

    Stop ids end generation and are not yielded. Generation also ends at the model's context, unless
    `context_shift`: then, each time the cache is full, the first `keep` tokens (at least the first one,
    BOS where the model has one; -1: the whole prompt) stay, half of the rest are dropped and the others
    move down in the cache (Transformer.shift_caches), as llama.cpp's context shift does. With a
    `constraint` (constrain.Grammar(...).matcher()) every token is one the grammar allows, and
    generation stops ("stop") once the grammar is complete. With a `prompt_cache` (llamalite.generation.prompt_cache),
    the prompt's longest prefix saved on disk is restored rather than computed, and what the cache holds
    at the end is saved. With `speculation` (llamalite.generation.speculative), drafted tokens are checked several at
    a pass; the tokens are those decoding without it gives (greedy), or distributed as they are (sampled).
    """
    ctx = model.config.context_length
    prompt = fit_prompt(prompt, ctx, truncate)
    budget = max_new_tokens if context_shift else min(max_new_tokens, ctx - len(prompt))
    if budget <= 0:
        return "length"
    keep = max(1, len(prompt) if keep < 0 else keep)
    ensure_cache(model, min(ctx, len(prompt) + budget))
    device = model.device
    logits = prefill(model, prompt, prompt_cache)
    history = model.cache_tokens = list(prompt)  # kept equal to what the cache holds
    stop = set(stop_ids)
    step = getattr(model, "decode_step", model)
    shifted = False
    preds, drafts, qs = logits[None], [], None  # preds[j]: the logits after history[:base + j]
    emitted = valid = 0
    try:
        while True:
            base = len(history) - len(drafts)  # history ends with the last forward's input: a token, its drafts
            for j in range(len(preds)):
                valid = base + j  # what the cache holds that this row's token may follow
                logits = preds[j] if constraint is None else constraint.mask(preds[j])
                draft = drafts[j] if j < len(drafts) else None
                seen = history if valid == len(history) else history[:valid]  # no copy on a plain step
                token = choose(logits, sampling, seen, generator, draft, qs[j] if draft is not None and qs else None)
                if token in stop:
                    return "stop"
                if constraint is not None:
                    constraint.advance(token)
                yield token
                emitted += 1
                if constraint is not None and constraint.done:  # the grammar is complete: nothing more may follow
                    return "stop"
                if emitted == budget:
                    return "length"
                if token != draft:  # a draft token replaced, or the pass's own next token: the rest is void
                    break
                speculation.stats.accepted += 1
            if drafts:
                speculation.checked(len(drafts), j)
            del history[valid:]
            if len(history) >= model.max_seq_len:  # the cache is full (only with context_shift)
                tokens = shift_context(model, history, keep)
                if tokens is None:
                    return "length"
                history = model.cache_tokens = tokens
                shifted, valid = True, len(tokens)
            drafts, qs = [], None
            if speculation is not None:
                drafts, qs = speculation.propose(history + [token], budget - emitted - 1,
                                                 model.max_seq_len - len(history) - 1, sampling, generator)
            feed = [token] + drafts
            with torch.inference_mode():
                if len(feed) == 1:
                    preds = step(torch.tensor([[token]], device=device), torch.tensor([len(history)], device=device))[0]
                else:  # one row a token, all in this cache row: row i attends to the positions up to its own
                    at = torch.arange(len(history), len(history) + len(feed), device=device)
                    preds = model(torch.tensor(feed, device=device)[:, None], at[:, None],
                                  rows=torch.zeros(len(feed), dtype=torch.long, device=device))[:, 0]
            history.extend(feed)
    finally:
        del model.cache_tokens[valid:]
        if shifted:  # the positions after `keep` were moved, not computed from these tokens: no prefix to reuse
            model.cache_tokens = model.cache_tokens[:keep]
        if prompt_cache is not None:
            prompt_cache.save(model, model.cache_tokens)


