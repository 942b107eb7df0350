"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update,
y = x W^T + (alpha / r) x A^T B^T, with A (r, in) random and B (out, r) zero, so training starts
from the base model exactly. `merge()` folds the update into a plain nn.Linear; `save_adapter`
writes the update alone in PEFT's layout (adapter_model.safetensors + adapter_config.json), which
PEFT loads onto the Hugging Face export of the base model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..formats.export import QUANT_TYPES
from ..formats.layout import permute_rope
from ..formats.hf import meta_to_hf_name
from ..model.transformer import LINEAR_PARENTS, ExpertLinear


def _hf_module(i: int, target: str) -> str:
    """The Hugging Face module name of layer i's target (PEFT names adapters after it)."""
    return meta_to_hf_name(f"layers.{i}.{LINEAR_PARENTS[target]}.{target}.weight").removesuffix(".weight")


class LoRALinear(nn.Module):
    """nn.Linear's call signature: the frozen `base` plus (alpha / rank) * B A."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA wraps a dense nn.Linear, not {type(base).__name__}: load the model with "
                            f"quantized=False (quantized GGUF blocks are dequantized for training)")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        # PEFT's initialisation: A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0
        bound = 1 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound, generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the weight, (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scale

    def merge(self) -> nn.Linear:
        """A plain nn.Linear computing the same function."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.delta().to(self.base.weight.dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


class LoRAExperts(nn.Module):
    """model.ExpertLinear's call signature (forward(x, e)): the frozen `base` plus, for each expert e, its own
    (alpha / rank) * B[e] A[e] (A (E, rank, in) random, B (E, out, rank) zero)."""

    def __init__(self, base: ExpertLinear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, ExpertLinear):
            raise TypeError(f"LoRA wraps dense experts, not {type(base).__name__}: load the model with quantized=False")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        n, out_f, in_f = w.shape
        self.lora_a = nn.Parameter(torch.empty(n, rank, in_f, dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(n, out_f, rank, dtype=w.dtype, device=w.device))
        with torch.no_grad():  # as LoRALinear, expert by expert
            self.lora_a.uniform_(-1 / math.sqrt(in_f), 1 / math.sqrt(in_f), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.base(x, e) + (self.dropout(x) @ self.lora_a[e].T @ self.lora_b[e].T) * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the experts' weights, (E, out, in)."""
        return (self.lora_b @ self.lora_a) * self.scale

    def merge(self) -> ExpertLinear:
        """A plain ExpertLinear computing the same function."""
        n, out_f, in_f = self.base.weight.shape
        merged = ExpertLinear(n, in_f, out_f, bias=self.base.bias is not None).to(self.base.weight)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.delta().to(self.base.weight.dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def _holder(layer: nn.Module, target: str) -> nn.Module:
    """The module that holds a layer's `target` as an attribute: its attention or feed-forward, or for w1 w2 w3
    of a mixture of experts, its experts (every expert's projection; the router and any shared expert stay as
    they are)."""
    ffn = layer.feed_forward
    if target in ("w1", "w2", "w3") and hasattr(ffn, "experts"):
        return ffn.experts
    return getattr(layer, LINEAR_PARENTS[target])


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("wq", "wv"),
               dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Freeze every weight of a Transformer and wrap its `targets` layers (wq wk wv wo w1 w2 w3) in LoRA; in a
    mixture of experts, w1 w2 w3 are every expert's, each with its own pair (the routers stay frozen)."""
    unknown = sorted(set(targets) - set(LINEAR_PARENTS))
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(LINEAR_PARENTS)}")
    model.requires_grad_(False)  # the routers too: they stay as trained
    generator = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for t in targets:
            holder = _holder(layer, t)
            base = getattr(holder, t)
            wrap = LoRAExperts if isinstance(base, ExpertLinear) else LoRALinear
            setattr(holder, t, wrap(base, rank, alpha, dropout, generator))
    return model


def lora_layers(model: nn.Module) -> list[tuple[int, str, "LoRALinear | LoRAExperts"]]:
    """(layer index, target name, module) of every LoRA layer."""
    out = []
    for i, layer in enumerate(model.layers):
        for t in LINEAR_PARENTS:
            m = getattr(_holder(layer, t), t, None)
            if isinstance(m, (LoRALinear, LoRAExperts)):
                out.append((i, t, m))
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base: a plain model again, the same function."""
    for i, t, m in lora_layers(model):
        setattr(_holder(model.layers[i], t), t, m.merge())
    return model


def save_adapter(model: nn.Module, out: str | Path, base_model: str = "") -> Path:
    """The LoRA update alone, in PEFT's layout for the Hugging Face export of the base model
    (`llamalite export --to hf`): q and k rows permuted to HF's RoPE layout, as the base weights are."""
    from safetensors.torch import save_file


    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (apply_lora first)")
    if any(isinstance(m, LoRAExperts) for _, _, m in layers):
        raise ValueError("an adapter on a mixture's experts has no PEFT layout that transformers' fused experts load: "
                         "export the fine-tune merged (llamalite export RUN --to gguf or --to hf)")
    cfg = model.config
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, t, m in layers:
        b = m.lora_b.detach().float().cpu()
        if t == "wq":
            b = permute_rope(b, cfg.n_heads)
        elif t == "wk":
            b = permute_rope(b, cfg.n_kv_heads)
        prefix = f"base_model.model.{_hf_module(i, t)}"
        tensors[f"{prefix}.lora_A.weight"] = m.lora_a.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    first = layers[0][2]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.rank, "lora_alpha": first.alpha,
              "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
              "target_modules": sorted({_hf_module(0, t).rsplit(".", 1)[1] for _, t, _ in layers}), "bias": "none",
              "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": base_model or None, "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def lora_kept(model: torch.nn.Module, dtype: str, max_layers: int = 32) -> float:
    """How much of an (unmerged) LoRA update survives quantizing the merged weights to `dtype`: the
    change quantization makes, Q(W + D) - Q(W), projected on the update D (1 = all of it). A LoRA update
    is far smaller than a 4-bit step, so re-quantizing to the base's own 4-bit grid rounds most of it
    away. Measured on up to `max_layers` LoRA layers spread through the model."""
    import gguf
    from gguf import GGMLQuantizationType as T

    qtype = T[QUANT_TYPES[dtype]]
    layers = lora_layers(model)
    layers = layers[::max(1, len(layers) // max_layers)][:max_layers]

    def q(a: np.ndarray) -> np.ndarray:
        return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype), qtype)

    along = total = 0.0
    for _, _, m in layers:
        w, d = m.base.weight.detach().float().cpu().numpy(), m.delta().detach().float().cpu().numpy()
        along += float(((q(w + d) - q(w)) * d).sum())
        total += float((d * d).sum())
    return along / total if total else 1.0
