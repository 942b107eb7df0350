"""Steps over a model's KV cache: a prompt prefilled in chunks, reusing the prefix the cache already holds
(a model remembers its `cache_tokens`, so a chat that resends its history computes only the new tokens);
prefill from a given position (a draft model's rows); a prompt fitted to the context; the context
shifted when a reply reaches it; the decode step compiled."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import torch

from ..model.transformer import Transformer

if TYPE_CHECKING:
    from .prompt_cache import PromptCache


PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory on long prompts


CACHE_ROUND = 256  # KV cache capacity grows in steps of this many positions


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compile_decode(model: Transformer) -> None:
    """Compile the one-token decode step with torch.compile (the prefill stays eager: its shapes vary).
    The first step pays the compile (tens of seconds on a small CPU; inductor caches it on disk for
    later runs); after that each step runs with far less Python overhead."""
    # RoPE's complex multiply runs as an ATen kernel inside the compiled graph; that is expected.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    model.decode_step = torch.compile(model)


def fit_prompt(prompt: Sequence[int], context_length: int, truncate: bool = False) -> list[int]:
    """The prompt, checked against the context (one position must stay free for a new token).
    With truncate, the oldest tokens are dropped instead of raising."""
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    limit = context_length - 1
    if len(prompt) > limit:
        if not truncate:
            raise ContextLengthError(
                f"the prompt is {len(prompt)} tokens but the model's context is {context_length}; "
                f"shorten the prompt or allow truncation (--truncate) to keep its last {limit} tokens")
        return list(prompt[-limit:])
    return list(prompt)


def ensure_cache(model: Transformer, needed: int) -> None:
    if model.max_seq_len >= needed and model.cache_batch == 1:
        return
    capacity = min(model.config.context_length, -(-needed // CACHE_ROUND) * CACHE_ROUND)
    model.setup_caches(1, capacity)


@torch.inference_mode()
def prefill(model: Transformer, tokens: Sequence[int], prompt_cache: PromptCache | None = None) -> torch.Tensor:
    """Run `tokens` through the cache, reusing the cached common prefix (or a longer one from
    `prompt_cache`, on disk); returns the last logits (V,)."""
    start = min(common_prefix(model.cache_tokens, tokens), len(tokens) - 1)  # at least one token to get logits
    if prompt_cache is not None:
        entry, n = prompt_cache.lookup(model, tokens)
        n = min(n, len(tokens) - 1)
        if n > start and prompt_cache.restore(model, entry, n):
            start = n
    model.cache_tokens = list(tokens[:start])  # what stays true if a chunk below fails
    logits = prefill_from(model, tokens, start)
    model.cache_tokens = list(tokens)
    return logits


@torch.inference_mode()
def prefill_from(model: Transformer, tokens: Sequence[int], start: int, row: int | None = None) -> torch.Tensor:
    """Compute tokens[start:] into the cache (row `row` of a cache of several; default: a batch of one)
    after the start tokens already there, PREFILL_CHUNK at a time; the last logits (V,)."""
    device = model.device
    rows = None if row is None else torch.tensor([row], device=device)
    for lo in range(start, len(tokens), PREFILL_CHUNK):
        chunk = torch.tensor([tokens[lo:lo + PREFILL_CHUNK]], device=device)
        logits = model(chunk, torch.arange(lo, lo + chunk.shape[1], device=device), last_only=True, rows=rows)
    return logits[0, -1]


def shift_context(model: Transformer, tokens: list[int], keep: int, row: int = 0) -> list[int] | None:
    """llama.cpp's context shift of cache row `row`, full of `tokens`: the first `keep` stay, half of the
    rest are dropped and the others move down (Transformer.shift_caches). Returns the tokens the row then
    holds, or None when there is nothing after the kept ones to drop."""
    if keep >= len(tokens) - 1:
        return None
    discard = (len(tokens) - keep) // 2
    model.shift_caches(keep, discard, len(tokens), row=row)
    return tokens[:keep] + tokens[keep + discard:]
