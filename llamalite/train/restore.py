"""A run directory or a checkpoint back to (model, tokenizer): what `export` writes out. A pretraining
checkpoint rebuilds its model from the saved config; a LoRA fine-tune is rebuilt on its base model and
merged into it unless asked not to; anything else is loaded as a model file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..formats.export import ExportError
from .finetune import load_finetuned
from ..formats.checkpoint import checkpoints_in
from ..formats.load import load, load_tokenizer
from .lora import merge_lora
from ..model.transformer import Transformer


def load_for_export(source: str | Path, merge: bool = True):
    """(model, tokenizer, name) from a training or fine-tuning checkpoint (file or run directory: its
    best) or any loadable model. A LoRA fine-tune comes merged into its base unless `merge` is False."""
    path = Path(source).expanduser()
    if path.is_dir() and any(path.glob("ckpt-*.pt")):


        path = path / "best.pt" if (path / "best.pt").exists() else checkpoints_in(path)[0]
    if path.suffix == ".pt":
        return _from_checkpoint(path, merge)
    lm = load(path, quantized=False)
    return lm.model, lm.tokenizer, path.stem if path.is_file() else path.name


def _from_checkpoint(path: Path, merge: bool):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a checkpoint that does not load is reported as such)
        raise ExportError(f"{path} cannot be read as a llamalite checkpoint ({type(e).__name__}: {e})") from e
    if "model_config" not in ckpt or "model" not in ckpt:
        raise ExportError(f"{path} is not a llamalite training checkpoint (no model_config / model)")
    name = path.parent.name
    if "finetune" in ckpt:
        try:
            model, tokenizer = load_finetuned(ckpt)
        except (FileNotFoundError, ValueError) as e:
            raise ExportError(f"{path}: {e}") from None
        return (merge_lora(model) if merge else model), tokenizer, name
    model = Transformer(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    data = Path(ckpt["train_config"]["data"])
    tokenizer = None
    try:
        tokenizer = load_tokenizer(data)
    except (ValueError, FileNotFoundError):
        print(f"llamalite: the training data directory {data} has no tokenizer any more; exporting without one",
              flush=True)
    return model.eval(), tokenizer, name
