"""What a training run is given: TrainConfig (pretraining, the paper's recipe as defaults) and
FinetuneConfig (fine-tuning, LoRA or full), each readable from a YAML file with its unknown keys refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class TrainConfig:
    """Everything a pretraining run is (llamalite.train.loop.train runs it). Plain data, no torch: the
    CLI builds its flags from these fields at once."""

    data: str = ""  # a directory made by `llamalite prepare`
    out: str = "runs/llama"  # checkpoints, metrics.jsonl and loss.png go here
    # model: a preset's sizes, or these
    preset: str | None = None
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    hidden_dim: int | None = None
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    seq_len: int = 256
    # optimisation (the LLaMA recipe)
    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch, per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # running
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 100
    keep: int = 3
    seed: int = 0
    precision: str = "auto"  # fp32, bf16 (autocast), or auto: bf16 where the GPU has it, else fp32
    checkpointing: bool = False  # activation checkpointing: less memory, ~30% more compute
    device: str = "cpu"  # under torchrun with cuda: each process takes cuda:LOCAL_RANK
    parallel: str = "ddp"  # under torchrun: ddp (replicated model) or fsdp (FSDP2 fully_shard, sharded)
    resume: bool = False
    progress: bool = True
    memory_check: bool = True  # refuse up front a run whose estimated memory exceeds what is free

    unused: ClassVar[tuple[str, ...]] = ()  # fields this kind of run does not read (no flags, not in YAML)

    @classmethod
    def settable(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name not in cls.unused]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping of config fields")
        known = {f.name for f in cls.settable()}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{**raw, **overrides})


# TrainConfig fields that size a model from scratch: a fine-tune takes its model's sizes instead.
MODEL_SHAPE_FIELDS = ("preset", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings", "rope_theta")


@dataclass
class FinetuneConfig(TrainConfig):
    """A fine-tuning run (llamalite.train.finetune.finetune runs it on train's loop): a loaded model, JSONL
    records (chat `messages`, `prompt`/`completion`, or `text`), LoRA unless `full`. Defaults follow
    common LoRA practice (Hu et al. 2021; QLoRA's learning rate): no weight decay, short warmup."""

    model: str = ""  # the base: GGUF, Hugging Face or Meta checkpoint, or store name; empty = the default model
    data: str = ""  # a JSONL file of records
    val_data: str = ""  # held-out records; empty = every val_every-th record of data
    val_every: int = 10
    out: str = "runs/finetune"
    full: bool = False  # train every weight instead of a LoRA adapter
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    targets: str = "wq,wk,wv,wo"  # comma-separated: any of wq wk wv wo w1 w2 w3
    seq_len: int = 1024  # records longer than this are cut
    steps: int = 200
    batch_size: int = 4
    lr: float = 2e-4
    warmup: int = 10
    weight_decay: float = 0.0
    eval_every: int = 25
    save_every: int = 50

    unused: ClassVar[tuple[str, ...]] = MODEL_SHAPE_FIELDS + ("eval_batches",)  # validation: every held-out record
