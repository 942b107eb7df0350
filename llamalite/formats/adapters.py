"""LoRA adapters read from files into low-rank pairs in Meta's layout, for the runtime's AdapterSet:
`llamalite finetune`'s run directories and checkpoints (no export step), and PEFT's adapter directories
(adapter_config.json + adapter_model.safetensors, Hugging Face's q/k row layout, which is turned back
into Meta's here, as the loader does for weights)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..runtime.adapters import Pairs
from .checkpoint import checkpoints_in
from .layout import unpermute_rope


_HF_TARGETS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1", "up_proj": "w3",
               "down_proj": "w2"}


class AdapterError(ValueError):
    """An adapter that cannot be served on this model, with the reason."""


def read_adapter(path: str | Path, config, base: Path | None = None) -> Pairs:
    """An adapter's low-rank pairs in Meta's layout, each B already multiplied by its scale. `path`: a
    PEFT adapter directory, a `llamalite finetune` run directory, or one of its .pt checkpoints; `base`,
    the served model's file, is checked against the base a fine-tune recorded."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "adapter_config.json").exists():
        return _read_peft(path, config)
    if path.is_dir():


        found = [path / "best.pt"] if (path / "best.pt").exists() else checkpoints_in(path)
        if not found:
            raise AdapterError(f"{path} holds neither a PEFT adapter (adapter_config.json) nor a llamalite "
                               "fine-tuning checkpoint (best.pt, ckpt-*.pt)")
        path = found[0]
    if path.suffix != ".pt" or not path.is_file():
        raise AdapterError(f"{path} is not an adapter: give a PEFT adapter directory or a `llamalite finetune` run "
                           "directory (or one of its .pt checkpoints)")
    return _read_finetune(path, config, base)


def _read_peft(path: Path, config) -> Pairs:
    from safetensors.torch import load_file



    cfg = json.loads((path / "adapter_config.json").read_text())
    refuse = [(cfg.get("peft_type", "LORA") != "LORA", f"peft_type {cfg.get('peft_type')!r} (only LORA)"),
              (bool(cfg.get("use_dora")), "use_dora (DoRA)"), (cfg.get("bias", "none") != "none", "trained biases"),
              (bool(cfg.get("modules_to_save")), "modules_to_save (whole layers trained beside the adapter)"),
              (bool(cfg.get("alpha_pattern")), "alpha_pattern"), (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out")]
    bad = [what for hit, what in refuse if hit]
    if bad:
        raise AdapterError(f"{path}: this adapter uses {', '.join(bad)}, which llamalite does not serve unmerged")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise AdapterError(f"{path} has no adapter_model.safetensors (PyTorch .bin adapters are not read: save "
                           "it with safe_serialization=True)")
    tensors = load_file(str(weights))
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.\w+)?\.weight$", key)
        if m is None or m.group(2) not in _HF_TARGETS:
            raise AdapterError(f"{path}: the adapter tensor {key} is not a LoRA pair of an attention or feed-forward "
                               "projection, which is all llamalite serves unmerged")
        found.setdefault((int(m.group(1)), _HF_TARGETS[m.group(2)]), {})[m.group(3)] = t.float()
    alpha, rs = float(cfg.get("lora_alpha", cfg.get("r", 8))), bool(cfg.get("use_rslora"))
    pairs: Pairs = {}
    for (layer, target), ab in found.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: layer {layer} {target} has lora_{''.join(ab)} without its other half")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if target in ("wq", "wk"):  # HF's half-split q/k rows back to Meta's interleaved ones
            b = unpermute_rope(b, config.n_heads if target == "wq" else config.n_kv_heads)
        pairs[(layer, target)] = (a, b * (alpha / (r ** 0.5 if rs else r)))
    return _checked(pairs, config, path)


def _read_finetune(path: Path, config, base: Path | None) -> Pairs:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a checkpoint that does not load is reported as such)
        raise AdapterError(f"{path} cannot be read as a llamalite checkpoint ({type(e).__name__}: {e})") from None
    setup = ckpt.get("finetune") if isinstance(ckpt, dict) else None
    if not setup:
        raise AdapterError(f"{path} is not a fine-tuning checkpoint (a pretraining run has no adapter to serve)")
    if setup.get("lora") is None:
        raise AdapterError(f"{path} is a full fine-tune (every weight trained), not an adapter: serve it as a model "
                           f"after `llamalite export {path.parent} --to gguf`")
    trained_on = Path(setup["base"])
    if base is not None and trained_on.name != Path(base).name:
        raise AdapterError(f"{path} was trained on {trained_on.name}, not on the served {Path(base).name}: serve it "
                           f"with --model {trained_on}")
    scale = setup["lora"]["alpha"] / setup["lora"]["rank"]
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in ckpt["model"].items():
        m = re.search(r"layers\.(\d+)\.(?:attention|feed_forward)\.(w[qkvo123])\.lora_([ab])$", key)
        if m:
            found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t.float()
    pairs = {k: (ab["a"], ab["b"] * scale) for k, ab in found.items() if set(ab) == {"a", "b"}}
    if not pairs:
        raise AdapterError(f"{path} holds no LoRA pairs")
    return _checked(pairs, config, path)


def _checked(pairs: Pairs, config, path: Path) -> Pairs:
    """Pairs whose shapes fit the model (a mismatch means an adapter of another model)."""
    dim, hd = config.dim, config.head_dim
    shapes = {"wq": (config.n_heads * hd, dim), "wk": (config.n_kv_heads * hd, dim),
              "wv": (config.n_kv_heads * hd, dim), "wo": (dim, config.n_heads * hd), "w1": (config.hidden_dim, dim),
              "w3": (config.hidden_dim, dim), "w2": (dim, config.hidden_dim)}
    for (layer, target), (a, b) in pairs.items():
        out, inp = shapes[target]
        if layer >= config.n_layers or a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{path}: the adapter's layer {layer} {target} (A {tuple(a.shape)}, B {tuple(b.shape)}) "
                               f"does not fit this model ({config.n_layers} layers, {target} is {out}x{inp}): it was "
                               "trained for another model")
    return pairs
