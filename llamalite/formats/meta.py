"""Meta's checkpoint directories (params.json, consolidated.*.pth, tokenizer.model): the config read
from params.json, and the loader, which joins model-parallel shards along the dimension each was cut."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from ..model.config import ModelConfig, RopeScaling
from ..text.tokenizer import tokenizer_from_model_file
from .build import build_model
from .loaded import LoadedModel, ModelFileError


# Dimension along which Meta's model-parallel shards split each weight (fairscale Column/RowParallel).
_META_SHARD_DIM: list[tuple[str, int | None]] = [
    ("attention.wq", 0), ("attention.wk", 0), ("attention.wv", 0), ("attention.wo", 1),
    ("feed_forward.w1", 0), ("feed_forward.w3", 0), ("feed_forward.w2", 1), ("output", 0),
    ("norm", None),  # attention_norm, ffn_norm, norm: replicated
]


def _meta_shard_dim(name: str, shard: torch.Tensor, vocab_size: int) -> int | None:
    if name.startswith("tok_embeddings"):
        # LLaMA 1/2 split the embedding by columns (ParallelEmbedding), Llama 3 by rows.
        return 1 if shard.shape[0] == vocab_size else 0
    for key, dim in _META_SHARD_DIM:
        if key in name:
            return dim
    return None


def load_meta(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise ModelFileError(f"{path} has params.json but no consolidated.*.pth")
    if not (path / "tokenizer.model").exists():
        raise ModelFileError(f"{path} has no tokenizer.model (it comes with the Meta download)")
    tokenizer = tokenizer_from_model_file(path / "tokenizer.model")
    try:
        cfg = config_from_meta(json.loads((path / "params.json").read_text()), vocab_size=tokenizer.vocab_size)
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path / 'params.json'} cannot be read: {e}") from e
    parts = []
    for s in shards:
        try:
            # weights_only: a checkpoint is tensors, never arbitrary pickled objects.
            parts.append(torch.load(s, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:
            raise ModelFileError(f"{s} cannot be read as a Meta checkpoint ({e}); it may be truncated") from e
    weights: dict[str, torch.Tensor] = {}
    for name in parts[0]:
        if name.endswith("rope.freqs"):  # LLaMA 1 stored RoPE frequencies; they are recomputed
            continue
        tensors = [p[name] for p in parts]
        dim = _meta_shard_dim(name, tensors[0], cfg.vocab_size) if len(tensors) > 1 else None
        weights[name] = tensors[0] if dim is None else torch.cat(tensors, dim=dim)
    types = Counter(str(w.dtype).removeprefix("torch.") for w in weights.values())
    model = build_model(cfg, weights, dtype)
    return LoadedModel(model, tokenizer, None, path, "meta", types)


def config_from_meta(params: Mapping[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """Read a Meta `params.json` dict (vocab_size is -1 in LLaMA 1 files: pass the tokenizer's)."""
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise ValueError("params.json has no vocab_size; it must come from tokenizer.model")
        vocab = vocab_size
    rope = RopeScaling(factor=params.get("rope_scaling_factor", 8.0)) if params.get("use_scaled_rope") else None
    return ModelConfig(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=vocab,
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=rope,
        context_length=params.get("max_seq_len", 8192 if vocab >= 128000 else 2048 if vocab == 32000 else 4096),
    )
