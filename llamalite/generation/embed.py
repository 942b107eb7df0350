"""Embeddings: a text's vector from the model's last hidden state, pooled and L2-normalized.

Pooling as llama.cpp's `--pooling`: `mean` over the text's tokens (the default), `last` (the last
token's state, which has seen the whole text under causal attention) or `cls` (the first token's).
Each text runs through the model alone, so its vector is the same, bit for bit, whatever else is in
the request: in a padded batch a text's rows would take the kernels' int16 GEMM or their dot products
depending on how many rows the others bring, and the two round differently (1.4e-4 apart on an Intel
host). The cost, measured on the default model (2 threads): texts of 64 and 256 tokens embed as fast
as in padded batches (1.6-1.9k tokens/s either way); texts of 6 tokens at a third of the batched rate
(540 against 1,650 tokens/s), each text streaming the weights once.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..formats.loaded import LoadedModel
from ..model.transformer import Transformer

POOLING = ("mean", "last", "cls")


@torch.inference_mode()
def embed_ids(model: Transformer, inputs: Sequence[Sequence[int]], pooling: str = "mean") -> torch.Tensor:
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
    for i, ids in enumerate(inputs):
        states = model.hidden(torch.tensor([list(ids)], device=model.device)).float().cpu()[0]  # (T, dim)
        out[i] = states.mean(0) if pooling == "mean" else states[len(ids) - 1 if pooling == "last" else 0]
    return F.normalize(out, dim=-1)


def embed(lm: LoadedModel, inputs: Sequence[str] | Sequence[Sequence[int]] | str, pooling: str = "mean") -> torch.Tensor:
    """(N, dim) vectors for texts (tokenized as the model's tokenizer does, BOS where it adds one) or
    token-id lists; one text gives (1, dim)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    ids = [lm.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
    return embed_ids(lm.model, ids, pooling)
