"""Sampling: pure functions from logits to a token id, with an explicit torch.Generator.

Order, as llama.cpp's default sampler chain: logit bias (OpenAI's `logit_bias`, added to the raw
logits), penalties (repetition, presence, frequency) over the recent history, then top-k, top-p, min-p, temperature, and a draw. Temperature 0 means greedy: the
argmax after penalties, with no randomness at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off; CTRL-style divide/multiply of seen tokens' logits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64  # how many recent tokens the penalties look at; -1: all
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); -100 bans, 100 forces

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (0.01 <= self.repetition_penalty <= 100, "repetition_penalty must be in [0.01, 100] (1 is off)"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
                  (all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias values must be in [-100, 100]")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


def apply_penalties(logits: torch.Tensor, history: Sequence[int], p: SamplingParams) -> torch.Tensor:
    """logits (V,) -> penalised copy; history is every token so far (prompt and generated)."""
    if p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
        return logits
    recent = history if p.penalty_last_n < 0 else history[-p.penalty_last_n:] if p.penalty_last_n else []
    if not recent:
        return logits
    ids, counts = torch.tensor(list(recent), device=logits.device).unique(return_counts=True)
    out = logits.clone()
    seen = out[ids]
    if p.repetition_penalty != 1.0:
        seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    seen = seen - p.presence_penalty - p.frequency_penalty * counts.to(seen.dtype)
    out[ids] = seen
    return out


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Set to -inf every logit that top-k, top-p or min-p removes; the best token always survives."""
    logits = logits.clone()
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False  # the best token stays even when top_p underflows to 0 in fp32
        logits[order[drop]] = float("-inf")
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits[probs < p.min_p * probs.max()] = float("-inf")
    return logits


def distribution(logits: torch.Tensor, p: SamplingParams, history: Sequence[int] = ()) -> torch.Tensor:
    """What `sample` draws from: fp64 probabilities (V,) after the whole chain (for greedy, all the mass on
    the argmax). Speculative decoding compares a draft's tokens against it."""
    logits = _biased(logits, p, history)
    if p.greedy:
        out = torch.zeros(logits.shape, dtype=torch.float64)
        out[int(logits.argmax())] = 1.0
        return out
    return _probs(logits, p)


def sample(logits: torch.Tensor, p: SamplingParams, history: Sequence[int] = (),
           generator: torch.Generator | None = None) -> int:
    """One token id from next-token logits (V,). Sampling runs on the CPU, where the generator is."""
    logits = _biased(logits, p, history)
    if p.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(_probs(logits, p), 1, generator=generator))


def choose(logits: torch.Tensor, sampling: SamplingParams, history: Sequence[int], generator: torch.Generator | None,
           draft: int | None = None, q: torch.Tensor | None = None) -> int:
    """The next token from the model's logits (V,): `sample`'s draw when there is no draft token to check;
    else the draft token or its replacement, by the speculative sampling rule (speculative.py's docstring) (q: the distribution
    the draft token was drawn from; None: it was certain, as a prompt lookup's is)."""
    if draft is None or sampling.greedy:
        return sample(logits, sampling, history, generator)
    p = distribution(logits, sampling, history)
    drawn = float(q[draft]) if q is not None else 1.0
    if float(torch.rand((), generator=generator, dtype=torch.float64)) * drawn < float(p[draft]):
        return draft
    residual = (p - q).clamp_(min=0) if q is not None else p.clone()
    if q is None:
        residual[draft] = 0.0
    if float(residual.sum()) <= 0.0:  # p and q the same: a rejection cannot happen; guard the rounding anyway
        residual = p
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


def _biased(logits: torch.Tensor, p: SamplingParams, history: Sequence[int]) -> torch.Tensor:
    logits = logits.float().cpu()
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias)
        logits = logits.clone()
        logits[list(ids)] += torch.tensor(bias)
    return apply_penalties(logits, history, p)


def _probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = filter_logits(logits, p)
    # Shift the best logit to 0 and divide in fp64: a tiny temperature (down to the smallest double)
    # then sends the rest to -inf, a sure draw of the best, where fp32 would make 0/0 = nan.
    return ((logits - logits.max()).double() / p.temperature).softmax(-1)
