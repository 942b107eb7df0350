"""Which backend runs a model: an ExecuTorch program (a .pte: ondevice), this rank's part of a model
under torchrun (distributed), or one model file of any format (formats). The verbs, the server and the
library's `llamalite.load` come through here; nothing below chooses a backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .formats.load import LoadedModel, load as load_file

if TYPE_CHECKING:
    from .distributed.group import Shard


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         quantized: bool = True, shard: "Shard | None" = None, pipeline: bool = False,
         kv_type: str | None = None) -> LoadedModel:
    """A model from `path` (loading.load says what each format gives). A .pte program runs through
    executorch.runtime; with `shard` (parallel.Shard, under torchrun), only this rank's slices of a GGUF
    file are read and the model is this rank's part of a tensor-parallel one, or with `pipeline` its
    stage of consecutive layers. `kv_type` (model.KV_TYPES) is what its KV caches hold."""
    path = Path(path).expanduser()
    if path.suffix == ".pte":
        from .ondevice.program import load_pte

        if shard is not None or torch.device(device).type != "cpu" or kv_type is not None:
            raise ValueError("an ExecuTorch program runs in one process on the CPU with the KV cache it was "
                             "exported with: drop torchrun, --device and --kv-type")
        return load_pte(path)
    if shard is not None:
        from .distributed.load import load_part

        return load_part(path, shard, pipeline, dtype, device, quantized, kv_type)
    return load_file(path, dtype, device, quantized, kv_type)
