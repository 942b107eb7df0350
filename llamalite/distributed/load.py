"""This rank's part of a GGUF file under torchrun: the Split (its heads) or the Stages (its layers) that
the GGUF loader reads by (formats' `load_gguf(part=...)`), then the split model's collectives or the
pipeline's hand-overs, and a check that every rank loaded the same file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..kernels.blocks import BLOCK
from ..model.transformer import kv_type_name
from ..formats.load import LoadedModel, place
from ..formats.gguf import load_gguf
from .group import ParallelError, Shard, check_same
from .pipeline import Stages, pipeline as stage
from .tensor_parallel import Split, parallelize


def part_of(shard: Shard, pipeline: bool):
    """For load_gguf: (config, tensor types) -> this rank's Split, or its Stages with `pipeline`."""
    def part(cfg: ModelConfig, types: dict[str, str]) -> Split | Stages:
        if pipeline:
            return Stages(cfg, shard)
        if cfg.family == "phi3":  # its fused q/k/v and gate/up rows
            raise ParallelError(f"splitting a {cfg.family} model by heads is not supported yet: split it by layers "
                                f"(--pp), or run it in one process")

        def block_of(name: str) -> int:  # elements per quantization block along the weight's rows
            return BLOCK.get(types[name], (1, 1))[0] if name in types else 1
        return Split(cfg, shard, w2_block=block_of("blk.0.ffn_down.weight"), wo_block=block_of("blk.0.attn_output.weight"))
    return part


def load_part(path: Path, shard: Shard, pipeline: bool = False, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", quantized: bool = True, kv_type: str | None = None) -> LoadedModel:
    """This rank's part of the GGUF model at `path`: the model is this rank's part of a tensor-parallel one
    (parallel.parallelize), or with `pipeline` its stage of consecutive layers (parallel.pipeline)."""
    if kv_type is not None:
        kv_type_name(kv_type)  # an unknown name is refused before the weights are read
    gguf = path if path.is_file() else next(iter(sorted(path.glob("*.gguf"))), None)
    if gguf is None or not path.exists():
        raise ParallelError(f"tensor parallelism reads GGUF files (each rank its own slices of the memory map); "
                            f"{path} is not one: convert it with `llamalite export {path} --to gguf`")
    on_cpu = torch.device(device).type == "cpu"
    lm = load_gguf(gguf, dtype, quantized and on_cpu, part_of(shard, pipeline))
    with open(gguf, "rb") as f:  # the header (metadata and tensor table) tells two models apart
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    check_same({"bytes": gguf.stat().st_size, "header_sha256": head})
    if pipeline:
        stage(lm.model, shard)
    else:
        parallelize(lm.model)
    return place(lm, device, kv_type)
