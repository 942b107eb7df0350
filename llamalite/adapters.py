"""LoRA adapters served unmerged: the base model's weights stay as they are (quantized or not) and
each adapter's low-rank update is added at run time, y = base(x) + B (A x) * alpha / r, to the rows of a
batch that asked for that adapter. Rows with different adapters, or none, run in the same forward.

Adapters come from `llamalite finetune` (its run directory or one of its checkpoints: no export step)
or from PEFT's adapter directories (adapter_config.json + adapter_model.safetensors, Hugging Face's
q/k row layout, which is turned back into Meta's here, as the loader does for weights).

`AdapterSet(model)` holds a model's adapters and routes rows to them: `with adapters.use(row_adapters):`
around a forward. Each adapted layer becomes an `AdaptedLinear` (nn.Linear's call signature); the
kernels' one-call decode step (quantized.FastTransformer) gets the same pairs and adds them inside.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .lora import _PARENT

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")  # the kernels' order of a block's weights
_HF_TARGETS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1", "up_proj": "w3",
               "down_proj": "w2"}

Pairs = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, target) -> (A (r, in), B (out, r) scaled)


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
        from .train import _checkpoints

        found = [path / "best.pt"] if (path / "best.pt").exists() else _checkpoints(path)
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

    from .loading import unpermute_rope

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


class AdaptedLinear(nn.Module):
    """A linear layer (nn.Linear or a quantized one) plus the low-rank updates of the adapters that touch
    it, each added to the rows routed to its adapter (see AdapterSet.use)."""

    def __init__(self, base: nn.Module, routing: "AdapterSet"):
        super().__init__()
        self.base, self.routing = base, routing
        self.in_features, self.out_features = base.in_features, base.out_features
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter -> (A (r, in), Bt (r, out))

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (the base layer's output for x, rows first) with each routed adapter's update added in place."""
        if not self.routing.index or not self.pairs:
            return y
        x2 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        y2 = y.view(y.shape[0], -1, y.shape[-1])  # (B, T, out)
        for k, rows in self.routing.index.items():
            pair = self.pairs.get(k)
            if pair is None:
                continue
            a, bt = pair
            if rows is None:  # every row
                y2 += (x2 @ a.T) @ bt
            else:
                y2.index_add_(0, rows, (x2.index_select(0, rows) @ a.T) @ bt)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_delta(self.base(x), x)


def adapted(module: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y with `module`'s routed adapter updates, where y came from its weights by another path (a fused
    product of several layers)."""
    return module.add_delta(y, x) if isinstance(module, AdaptedLinear) else y


class AdapterSet:
    """The adapters served on one model, and which rows of the next forward use which (`use`)."""

    def __init__(self, model: nn.Module):
        self.model, self.names = model, []
        self.rows: torch.Tensor | None = None  # (B,) adapter per row, -1 none; None: no row is adapted
        self.index: dict[int, torch.Tensor | None] = {}  # adapter -> its rows (None: all of them)
        model.adapters = self

    def add(self, name: str, pairs: Pairs) -> int:
        """Serve `pairs` as adapter `name`; returns its index for `use`."""
        index = len(self.names)
        device = self.model.device
        for (layer, target), (a, b) in pairs.items():
            parent = getattr(self.model.layers[layer], _PARENT[target])
            module = getattr(parent, target)
            if not isinstance(module, AdaptedLinear):
                module = AdaptedLinear(module, self)
                setattr(parent, target, module)
            dtype = module.base.weight.dtype if isinstance(module.base, nn.Linear) else torch.float32
            module.pairs[index] = (a.to(device, dtype).contiguous(), b.T.to(device, dtype).contiguous())
        plan = getattr(self.model, "plan", None)
        if plan is not None:  # the kernels' decode step adds the same pairs (fp32, on the CPU)
            empty = torch.empty(0)
            a_list, bt_list = [], []
            for layer in range(len(self.model.layers)):
                for target in TARGETS:
                    a, b = pairs.get((layer, target), (empty, empty.view(0, 0)))
                    a_list.append(a.float().contiguous())
                    bt_list.append(b.T.float().contiguous() if b.numel() else empty)
            plan.add_adapter(index, a_list, bt_list)
        self.names.append(name)
        return index

    def route_all(self, adapter: int | None) -> None:
        """Every row of every forward from now on through `adapter` (None: the base model again): one model
        run as its fine-tune, as `llamalite generate --lora` does."""
        self.rows, self.index = None, ({} if adapter is None else {adapter: None})

    def rows_for(self, batch: int) -> torch.Tensor | None:
        """The adapter of each of `batch` rows, as the kernels' step takes it; None when no row is adapted."""
        if not self.index:
            return None
        if self.rows is not None and len(self.rows) == batch:
            return self.rows
        every = [k for k, rows in self.index.items() if rows is None]
        return torch.full((batch,), every[0], dtype=torch.long) if every else None

    @contextmanager
    def use(self, row_adapters: Sequence[int | None]) -> Iterator[None]:
        """Route the rows of the forwards inside to their adapters (None or -1: the base model)."""
        ks = [-1 if k is None else k for k in row_adapters]
        saved = self.rows, self.index
        device = self.model.device
        self.rows = torch.tensor(ks, dtype=torch.long) if any(k >= 0 for k in ks) else None
        self.index = {k: None if all(j == k for j in ks) else
                      torch.tensor([b for b, j in enumerate(ks) if j == k], device=device) for k in set(ks) if k >= 0}
        try:
            yield
        finally:
            self.rows, self.index = saved
