"""Speculative decoding: a cheap guess of the next few tokens (a draft), checked by the model in one pass
over its weights instead of one pass a token. Decoding on a CPU is bound by reading the weights, so a
pass over k + 1 rows costs little more than over one, and every draft token the model agrees with is a
step saved.

Two drafters:
- DraftModel: a small model of the same vocabulary (Llama 3.2 1B for Llama 3.1 8B, ...) decodes k tokens
  ahead on its own KV cache, which follows the accepted tokens.
- PromptLookup: the tokens that followed the latest earlier occurrence of the last n tokens, in the
  prompt and the output so far (free: no second model). Edits, summaries and code copy their prompt.

The output is exactly what decoding without a draft gives. Greedy: a draft token is kept while it is
the model's argmax, and the first one that is not is replaced by the argmax (with llamalite's kernels
the checking pass computes each row as a one-token step does, so the tokens are the same, bit for bit).
Sampled: the speculative sampling rule (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023): draft token d, drawn from the draft's distribution q, is kept
with probability min(1, p(d) / q(d)) under the model's distribution p (after the whole sampling chain);
otherwise a token is drawn from max(0, p - q), renormalized. Each token is then distributed as p
(sampling.choose: a sampling rule, used by every decode loop, drafts or not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from .steps import CACHE_ROUND, common_prefix, prefill_from
from .sampling import SamplingParams, distribution, sample

if TYPE_CHECKING:
    from ..model.transformer import Transformer
    from ..text.tokenizer import Tokenizer

DRAFT_MAX = 7  # with the one token that is known, 8 rows: the kernels' one-token products up to GEMV_MAX_ROWS
DRAFT_P_MIN = 0.0  # off: a draft model's own top probability, below which greedy drafting stops (see --draft-p-min)


def default_draft_max(drafter: "DraftModel | PromptLookup") -> int:
    """Tokens drafted a pass unless told (BENCHMARKS.md, speculative decoding): a draft model pays a step of
    its own for each, a lookup nothing."""
    return 7 if isinstance(drafter, PromptLookup) else 3


class DraftError(ValueError):
    """A draft model that cannot draft for this model (another vocabulary)."""


@dataclass
class Stats:
    """What speculation did: passes of the model that checked a draft, tokens drafted and kept."""
    passes: int = 0  # forwards of the model over a draft (each also yields one token of its own)
    drafted: int = 0
    accepted: int = 0
    plain: int = 0  # one-token steps with no draft (none found, or fewer than draft_min)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        tokens = self.accepted + self.passes + self.plain
        return {"draft_passes": self.passes, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance, 4),
                "tokens_per_pass": round(tokens / (self.passes + self.plain), 3) if self.passes + self.plain else 0.0}


@dataclass
class Speculation:
    """How to speculate: a drafter, at most `draft_max` tokens a pass, none unless at least `draft_min`."""
    drafter: "DraftModel | PromptLookup"
    draft_max: int = 4
    draft_min: int = 1
    adaptive: bool = True
    p_min: float | None = None  # for a draft model: this in place of its own p_min
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self):
        if not 1 <= self.draft_max <= DRAFT_MAX:
            raise ValueError(f"--draft-max must be between 1 and {DRAFT_MAX}")
        if not 0 <= self.draft_min <= self.draft_max:
            raise ValueError("--draft-min must be between 0 and --draft-max")
        self.k = self.draft_max

    def checked(self, drafted: int, kept: int) -> None:
        """After a pass: the next draft is longer when this one was kept whole, shorter when not (as
        transformers' assisted generation does), within 1..draft_max."""
        if self.adaptive:
            self.k = min(self.draft_max, self.k + 2) if kept == drafted else max(1, self.k - 1)

    def propose(self, tokens: list[int], left: int, room: int, sampling: SamplingParams,
                generator: torch.Generator | None, row: int = 0) -> tuple[list[int], list[torch.Tensor] | None]:
        """Draft tokens to follow `tokens` (and their distributions), at most `left` (the tokens still to
        generate, less the pass's own) and `room` (the cache's free positions); none if fewer than draft_min."""
        k = min(self.k if self.adaptive else self.draft_max, left, room)
        if k < max(1, self.draft_min):
            self.stats.plain += 1
            return [], None
        drafts, qs = self.drafter.draft(tokens, k, sampling, generator, row, self.p_min)
        drafts, qs = drafts[:k], (qs[:k] if qs else None)
        if not drafts or len(drafts) < self.draft_min:
            self.stats.plain += 1
            return [], None
        self.stats.passes += 1
        self.stats.drafted += len(drafts)
        return drafts, qs


@dataclass
class Drafting:
    """A server's speculative decoding: a draft model (its cache rows the engine's slots) or a prompt
    lookup of n-grams up to `lookup`, and the settings a request may change (llama.cpp's server names
    them speculative.n_max, n_min and p_min)."""
    draft_model: "DraftModel | None" = None
    lookup: int | None = None
    draft_max: int = 3
    draft_min: int = 1

    def for_request(self, n_max: int | None = None, n_min: int | None = None,
                    p_min: float | None = None) -> Speculation | None:
        """One request's Speculation (its own statistics and draft length); None with n_max 0."""
        k = self.draft_max if n_max is None else n_max
        if k == 0:
            return None
        if p_min is not None and self.draft_model is None:
            raise ValueError("speculative.p_min is a draft model's setting; this server drafts by prompt lookup")
        drafter = self.draft_model if self.draft_model is not None else PromptLookup(self.lookup)
        return Speculation(drafter, k, min(k, self.draft_min if n_min is None else n_min), p_min=p_min)


class PromptLookup:
    """Drafts from the sequence itself: the tokens after the latest earlier occurrence of its last n tokens,
    trying n = `ngram` down to 1. An index of every n-gram's latest end keeps each lookup O(ngram)."""

    def __init__(self, ngram: int = 3, per: int = 2):
        if ngram < 1:
            raise ValueError("--lookup needs an n-gram size of at least 1")
        self.ngram, self.per = ngram, per
        self._seen: list[int] = []
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(ngram)]

    def draft(self, tokens: Sequence[int], k: int, sampling: SamplingParams, generator: torch.Generator | None,
              row: int = 0, p_min: float | None = None) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to k tokens to follow `tokens`; None for their distributions (each drafted for sure)."""
        n = len(tokens)
        if self._seen != list(tokens[:len(self._seen)]) or len(self._seen) > n:  # another sequence: start over
            self._seen, self._index = [], [{} for _ in range(self.ngram)]
        for end in range(max(len(self._seen) - 1, 0), n - 1):  # n-grams ending before the last token
            for m in range(1, self.ngram + 1):
                if end - m + 1 >= 0:
                    self._index[m - 1][tuple(tokens[end - m + 1:end + 1])] = end
        self._seen = list(tokens)
        for m in range(min(self.ngram, n), 0, -1):
            end = self._index[m - 1].get(tuple(tokens[n - m:]))
            if end is not None:
                matched = m  # how far back the two places agree: the longer, the likelier the copy goes on
                while matched < 64 and end - matched >= 0 and tokens[end - matched] == tokens[n - 1 - matched]:
                    matched += 1
                return list(tokens[end + 1:end + 1 + min(k, max(1, matched // self.per))]), None
        return [], None


class DraftModel:
    """A second, smaller model that decodes ahead on its own KV cache, a row for each sequence it drafts
    for (the engine's slots; row 0 for generate). A row's cache follows the sequence: its common prefix
    with the tokens handed in is kept, the rest computed. With greedy decoding it stops drafting once its
    own top probability falls below `p_min`."""

    def __init__(self, model: "Transformer", p_min: float = 0.0):
        self.model, self.p_min = model, p_min
        self.held: dict[int, list[int]] = {}  # cache row -> the tokens whose keys and values it holds

    @staticmethod
    def check_vocabulary(target: "Tokenizer", draft: "Tokenizer", target_vocab: int, draft_vocab: int) -> None:
        """The draft must speak the model's vocabulary: the same token for every id both have."""
        a, b = target.token_bytes(), draft.token_bytes()
        n = min(len(a), len(b))
        differ = next((i for i in range(n) if a[i] != b[i]), None)
        if differ is not None or abs(len(a) - len(b)) > 128 or abs(target_vocab - draft_vocab) > 128:
            def shown(raw: bytes) -> str:  # a special token's text follows a 0xFF byte (Tokenizer.token_bytes)
                return repr(raw[1:].decode(errors="replace") if raw[:1] == b"\xff" else raw.decode(errors="replace"))
            where = (f"token {differ} is {shown(a[differ])} in the model and {shown(b[differ])} in the draft"
                     if differ is not None else f"{len(a)} tokens against the draft's {len(b)}")
            raise DraftError(f"the draft model has another vocabulary ({where}); a draft model must share the "
                             f"model's tokenizer, as a smaller model of the same family does")

    def reserve(self, rows: int, positions: int) -> None:
        """Cache rows for `rows` sequences of up to `positions` tokens (more than the draft's context is cut)."""
        model = self.model
        positions = min(positions, model.config.context_length)
        if model.cache_batch < rows or model.max_seq_len < positions:
            model.setup_caches(max(rows, model.cache_batch),
                               min(model.config.context_length, -(-positions // CACHE_ROUND) * CACHE_ROUND))
            self.held = {}

    @torch.inference_mode()
    def draft(self, tokens: Sequence[int], k: int, sampling: SamplingParams, generator: torch.Generator | None,
              row: int = 0, p_min: float | None = None) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to k tokens to follow `tokens`, decoded on cache row `row`, and (sampling) the distributions
        they were drawn from."""
        p_min = self.p_min if p_min is None else p_min

        model = self.model
        self.reserve(row + 1, len(tokens) + k)
        k = min(k, model.max_seq_len - len(tokens))
        if k <= 0:
            return [], None
        device, at = model.device, torch.tensor([row], device=model.device)
        start = min(common_prefix(self.held.get(row, []), tokens), len(tokens) - 1)
        self.held[row] = list(tokens[:start])  # what stays true if the computing below fails
        logits = prefill_from(model, tokens, start, row)
        seq = list(tokens)
        out, qs = [], []
        for i in range(k):
            if sampling.greedy:
                token = sample(logits, sampling, seq)
                if p_min > 0 and float(logits.float().softmax(-1)[token]) < p_min:
                    break  # an unsure guess costs a row of the model's pass and is likely wrong
            else:
                q = distribution(logits, sampling, seq)
                token = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            out.append(token)
            if i == k - 1:
                break
            logits = model(torch.tensor([[token]], device=device), torch.tensor([[len(seq)]], device=device),
                           rows=at)[0, -1]
            seq.append(token)
        self.held[row] = seq
        return out, (qs if not sampling.greedy else None)
