"""Meta's tensor layout against the other formats', both ways, in one place.

Meta's checkpoints (and llama.cpp's GGUF files of the llama architecture) rotate interleaved pairs of
q/k dimensions; Hugging Face's files, and GGUF files of the families llama.cpp does not permute, rotate
half-split ones (rotate_half). Phi-3 fuses q/k/v and gate/up into single projections. Loaders turn a
file's tensors into Meta's layout (`unpermute_rope`, `family_layout`); writers turn them back
(`permute_rope`, `family_tensors`).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..model.config import ModelConfig


NEOX_FAMILIES = ("qwen2", "qwen3", "phi3", "gpt-oss")  # their GGUF q/k rows are in HF's half-split RoPE layout, as HF's


def family_layout(cfg: ModelConfig, weights: dict, blocks: dict, neox: bool) -> None:
    """In place, a family's tensors as the model file holds them: Phi-3's fused q/k/v and gate/up
    projections split by rows, and (`neox`: HF files, and GGUF files of the families llama.cpp does not
    permute) q/k rows, biases and norms from the half-split RoPE layout to Meta's interleaved one.
    `weights` holds dense tensors, `blocks` (raw rows, type, packed) quantized ones; rows of blocks
    split and reorder as rows of values do."""
    def rows(entry, lo: int, hi: int):
        return entry[lo:hi] if isinstance(entry, torch.Tensor) else (entry[0][lo:hi], *entry[1:])

    def store(name: str) -> dict | None:
        return weights if name in weights else blocks if name in blocks else None

    qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        fused = p + "attention.wqkv.weight"
        where = store(fused)
        if where is not None:  # [q; k; v]
            entry = where.pop(fused)
            for part, lo, hi in (("wq", 0, qd), ("wk", qd, qd + kd), ("wv", qd + kd, qd + 2 * kd)):
                where[f"{p}attention.{part}.weight"] = rows(entry, lo, hi)
        up = p + "feed_forward.w3.weight"
        if cfg.family == "phi3" and store(up) is not None:  # [gate; up], as llama.cpp's and HF's Phi-3 hold them
            where = store(up)
            entry = where.pop(up)
            where[p + "feed_forward.w1.weight"] = rows(entry, 0, cfg.hidden_dim)
            where[up] = rows(entry, cfg.hidden_dim, 2 * cfg.hidden_dim)
        if not neox:
            continue
        for name, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            for kind in ("weight", "bias"):
                key = f"{p}attention.{name}.{kind}"
                where = store(key)
                if where is None:
                    continue
                entry = where[key]
                raw = entry if isinstance(entry, torch.Tensor) else entry[0]
                turned = unpermute_rope(raw.reshape(raw.shape[0], -1), heads).reshape(raw.shape)
                where[key] = turned if isinstance(entry, torch.Tensor) else (turned.contiguous(), *entry[1:])
        for name in ("q_norm", "k_norm"):  # one head's dimensions, the same reordering
            key = f"{p}attention.{name}.weight"
            if key in weights:
                weights[key] = unpermute_rope(weights[key].reshape(-1, 1), 1).reshape(-1)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows per head as [all even dims, all odd dims] (its rotate_half RoPE); Meta
    interleaves them. Inverse of the `permute` in transformers' convert_llama_weights_to_hf.py."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def family_tensors(cfg: ModelConfig, weights: dict[str, torch.Tensor], neox: bool) -> dict[str, torch.Tensor]:
    """The reverse of family_layout: q/k rows, biases and norms back to the half-split RoPE layout
    where the format holds them so (`neox`), and Phi-3's projections fused again (its names: attention.wqkv,
    and feed_forward.w3 holding gate and up)."""
    out = {}
    for name, t in weights.items():
        kind = name.rsplit(".", 2)[-2] if name.startswith("layers.") else ""
        if neox and kind in ("wq", "wk"):
            heads = cfg.n_heads if kind == "wq" else cfg.n_kv_heads
            t = permute_rope(t.reshape(t.shape[0], -1), heads).reshape(t.shape)
        elif neox and kind in ("q_norm", "k_norm"):
            t = permute_rope(t.reshape(-1, 1), 1).reshape(-1)
        out[name] = t
    if cfg.family == "phi3":
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            out[p + "attention.wqkv.weight"] = torch.cat([out.pop(p + f"attention.{x}.weight") for x in ("wq", "wk", "wv")])
            out[p + "feed_forward.w3.weight"] = torch.cat([out.pop(p + "feed_forward.w1.weight"),
                                                         out.pop(p + "feed_forward.w3.weight")])
    return out


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's half-split layout (the inverse of unpermute_rope)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_name(name: str, top: Mapping[str, str], layer: Mapping[str, str], pattern: str) -> str | None:
    """The Meta name of another format's tensor `name` under its tables (format name -> Meta name); `pattern`
    matches a layer's tensor as (index, the layer table's key, weight or bias). None: not a model tensor."""
    if name in top:
        return top[name]
    m = re.fullmatch(pattern, name)
    if m and m.group(2) in layer:
        return f"layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
    return None


def reverse_name(name: str, top: Mapping[str, str], layer: Mapping[str, str], fmt: str) -> str:
    """A Meta name under another format's tables (format name -> Meta name), read backwards."""
    for theirs, ours in top.items():
        if ours == name:
            return theirs
    _, i, rest = name.split(".", 2)
    ours, kind = rest.rsplit(".", 1)
    return fmt.format(i=i, name=next(theirs for theirs, o in layer.items() if o == ours), kind=kind)
