"""Token ids to text as they arrive: never broken UTF-8, and stop strings matched across token boundaries
(a stop string and everything after it never emitted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, Iterator, Sequence

from ..text.tokenizer import Tokenizer


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
