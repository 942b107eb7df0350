"""What every loader returns (LoadedModel) and raises (ModelFileError), whatever the format or backend."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.config import ModelConfig
from ..model.transformer import Transformer
from ..text.tokenizer import Tokenizer


class ModelFileError(ValueError):
    """A model file or directory that cannot be loaded; the message says what is wrong and what to do."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    chat_template: str | None
    path: Path
    format: str  # "gguf", "hf" or "meta"
    tensor_types: Counter = field(default_factory=Counter)  # storage type -> number of tensors
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config
