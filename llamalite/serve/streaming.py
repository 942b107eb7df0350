"""A reply as pieces: the choices of one request as they stream out of the engine, merged, collected
whole, framed as server-sent events, and counted for `usage`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from .engine import TokenEvent


@dataclass
class Choice:
    """What one choice produced so far."""
    index: int
    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    prompt_logprobs: list[TokenEvent] | None = None


@dataclass
class Piece:
    """A step of one choice's stream: new text and the tokens that made it, or the end."""
    index: int
    text: str
    tokens: list[TokenEvent]
    finish_reason: str | None = None
    cached_tokens: int = 0  # on the last piece: prompt tokens reused from the KV cache
    prompt_logprobs: list[TokenEvent] | None = None  # with score_prompt: each prompt token's, the first None
    stop_string: str | None = None  # on the last piece: the stop string that ended the choice, if one did


def merge(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Pieces of several choices as they come (choices run side by side in the engine's batch)."""
    async def merged():
        if len(streams) == 1:
            async for piece in streams[0]:
                yield piece
            return
        out: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(stream):
            try:
                async for piece in stream:
                    await out.put(piece)
                await out.put(done)
            except BaseException as e:  # handed to the consumer, which re-raises it
                await out.put(e)

        tasks = [asyncio.create_task(pump(s)) for s in streams]
        try:
            remaining = len(tasks)
            while remaining:
                item = await out.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each stream's own cleanup runs first
            for s in streams:
                await s.aclose()
    return merged()


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def collect(stream: AsyncIterator[Piece], n: int) -> list[Choice]:
    """Every choice in full. A client that goes away cancels the task running this (see guard.Guard),
    which closes the choices' streams, which cancel their engine requests."""
    choices = [Choice(i) for i in range(n)]
    async for piece in stream:
        c = choices[piece.index]
        c.text += piece.text
        c.tokens.extend(piece.tokens)
        if piece.finish_reason:
            c.finish_reason, c.cached_tokens = piece.finish_reason, piece.cached_tokens
        if piece.prompt_logprobs is not None:
            c.prompt_logprobs = piece.prompt_logprobs
    return choices


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def choices_usage(prompts: list[list[int]], n: int, choices: list[Choice]) -> dict[str, Any]:
    return usage_of(sum(len(p) for p in prompts) * n, sum(len(c.tokens) for c in choices),
                  sum(c.cached_tokens for c in choices))
