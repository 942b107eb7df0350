"""Writing models out in other tools' formats. For now the GGUF side of the config; the exporter of
issue 5 (`llamalite export`) grows here."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig


def gguf_add_config(writer: Any, cfg: ModelConfig, vocab_size: int | None = None) -> None:
    """The `llama.*` keys of a GGUF file for `cfg`, on a `gguf.GGUFWriter` (the reverse of config_from_gguf;
    RoPE scaling, which GGUF stores as a tensor, is not written)."""
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(vocab_size or cfg.vocab_size)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        writer.add_rope_dimension_count(cfg.head_dim)
