"""Generation: an iterator of token ids over a model with a static KV cache, and a text stream on
top of it that handles stop strings and never emits broken UTF-8.

A model remembers which tokens its KV cache holds (`cache_tokens`), so a chat that resends its
history only computes the new tokens: the common prefix is reused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generator, Iterator, Sequence

import torch

from ..model.transformer import Transformer
from .sampling import SamplingParams, choose
from ..text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from .constrain import Matcher
    from .prompt_cache import PromptCache
    from .speculative import Speculation

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


def _ensure_cache(model: Transformer, needed: int) -> None:
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
    _ensure_cache(model, min(ctx, len(prompt) + budget))
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


@dataclass
class Completion:
    """What `stream_text` produced, filled in as it runs."""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length" once done


class TextStream:
    """Token ids in, text out, as they arrive: never broken UTF-8, and text that could be the start of
    a stop string is held back until it is known not to be one. A stop string sets `stopped`; it and
    everything after it are never emitted. The text ends at the first place where a stop string
    ends (the longest, if several end there), whatever the token boundaries.

    Matching is linear in the text: each stop string has a Knuth-Morris-Pratt automaton whose state
    is the length of the longest prefix of it that the text now ends with, which is also how much
    text must be held back for it."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.decoder = tokenizer.stream()
        self.stop = [s for s in stop if s]
        self._fail = [_kmp_failure(s) for s in self.stop]
        self._state = [0] * len(self.stop)
        self.pending = ""  # decoded, not yet emitted
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, token: int) -> str:
        """The text that is now safe to emit (maybe empty)."""
        if self.stopped:
            return ""
        new = self.decoder.push(token)
        start = len(self.pending)
        self.pending += new
        for offset, ch in enumerate(new):
            longest, which = 0, None
            for k, (s, fail) in enumerate(zip(self.stop, self._fail)):
                state = self._state[k]
                while state and s[state] != ch:
                    state = fail[state - 1]
                if s[state] == ch:
                    state += 1
                if state == len(s):
                    if state > longest:
                        longest, which = state, s
                    state = fail[state - 1]
                self._state[k] = state
            if longest:
                self.stopped, self.matched = True, which
                text, self.pending = self.pending[:start + offset + 1 - longest], ""
                return text
        cut = len(self.pending) - max(self._state, default=0)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text

    def flush(self) -> str:
        """What is still held back, once no more tokens will come."""
        if self.stopped:
            return ""
        text, self.pending = self.pending + self.decoder.flush(), ""
        return text


def _kmp_failure(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


def stream_text(tokenizer: Tokenizer, token_ids: Generator[int, None, str], stop: Sequence[str] = (),
                completion: Completion | None = None) -> Iterator[str]:
    """Text pieces as tokens arrive (see TextStream); a stop string ends the stream."""
    out = completion if completion is not None else Completion()
    text = TextStream(tokenizer, stop)
    try:
        while True:
            try:
                token = next(token_ids)
            except StopIteration as done:
                out.finish_reason = done.value or "length"
                break
            out.tokens.append(token)
            piece = text.push(token)
            if piece:
                out.text += piece
                yield piece
            if text.stopped:
                out.finish_reason = "stop"
                return
        piece = text.flush()
        if piece:
            out.text += piece
            yield piece
    finally:
        token_ids.close()
