"""Embeddings: a text's vector from the model's last hidden state, pooled and L2-normalized.

Pooling as llama.cpp's `--pooling`: `mean` over the text's tokens (the default), `last` (the last
token's state, which has seen the whole text under causal attention) or `cls` (the first token's).
Texts are batched by length, right-padded: under causal attention a token never sees the padding
after it, so a text's vector is the same alone or in a batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .loading import LoadedModel
from .model import Transformer

POOLING = ("mean", "last", "cls")


@torch.inference_mode()
def embed_ids(model: Transformer, inputs: Sequence[Sequence[int]], pooling: str = "mean",
              max_batch_tokens: int = 8192) -> torch.Tensor:
    """(N, dim) L2-normalized vectors for N token-id lists, in their order."""
    if pooling not in POOLING:
        raise ValueError(f"unknown pooling '{pooling}'; known: {', '.join(POOLING)}")
    if any(len(ids) == 0 for ids in inputs):
        raise ValueError("an input is empty: give at least one token")
    ctx = model.config.context_length
    if any(len(ids) > ctx for ids in inputs):
        longest = max(len(ids) for ids in inputs)
        raise ValueError(f"an input is {longest} tokens but the model's context is {ctx}; shorten it")
    out = torch.empty(len(inputs), model.config.dim)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    start = 0
    while start < len(order):
        end = start + 1  # the batch grows while its padded size fits
        while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= max_batch_tokens:
            end += 1
        batch = order[start:end]
        width = len(inputs[batch[-1]])
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, :len(inputs[i])] = torch.tensor(list(inputs[i]))
        states = model.hidden(tokens.to(model.device)).float().cpu()  # (B, T, dim)
        for row, i in enumerate(batch):
            n = len(inputs[i])
            out[i] = states[row, :n].mean(0) if pooling == "mean" else states[row, n - 1 if pooling == "last" else 0]
        start = end
    return F.normalize(out, dim=-1)


def embed(lm: LoadedModel, inputs: Sequence[str] | Sequence[Sequence[int]] | str, pooling: str = "mean") -> torch.Tensor:
    """(N, dim) vectors for texts (tokenized as the model's tokenizer does, BOS where it adds one) or
    token-id lists; one text gives (1, dim)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    ids = [lm.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
    return embed_ids(lm.model, ids, pooling)
