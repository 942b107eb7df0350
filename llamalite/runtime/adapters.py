"""LoRA adapters served unmerged: the base model's weights stay as they are (quantized or not) and
each adapter's low-rank update is added at run time, y = base(x) + B (A x) * alpha / r, to the rows of a
batch that asked for that adapter. Rows with different adapters, or none, run in the same forward.

Adapters come from `llamalite finetune` or PEFT directories, read by formats/adapters.py.

`AdapterSet(model)` holds a model's adapters and routes rows to them: `with adapters.use(row_adapters):`
around a forward. Each adapted layer becomes an `AdaptedLinear` (nn.Linear's call signature); the
kernels' one-call decode step (quantized.FastTransformer) gets the same pairs and adds them inside.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..model.transformer import LINEAR_PARENTS

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")  # the kernels' order of a block's weights

Pairs = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, target) -> (A (r, in), B (out, r) scaled)


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
            parent = getattr(self.model.layers[layer], LINEAR_PARENTS[target])
            module = getattr(parent, target, None)
            if module is None:
                raise ValueError(f"adapter {name!r} changes layer {layer}'s {target}, which this model's layer has not "
                                 f"(a mixture of experts): adapters on experts are not served")
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
