"""Generation over a loaded model: sampling, the decode loop and its KV-cache steps, streaming text,
speculative decoding, constraints (grammars, JSON schemas, tool calls), the prompt cache on disk,
embeddings."""

import importlib

# name -> the module that defines it: loaded on first use, so that importing one submodule (the CLI's
# --help reads model.config) does not import its neighbours (torch among them)
_WHERE = {"ContextLengthError": "steps", "GREEDY": "sampling", "SamplingParams": "sampling", "TextStream": "stream",
          "generate": "tokens", "stream_text": "stream"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
