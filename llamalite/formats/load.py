"""Load a model from the files users have: GGUF, a Hugging Face directory, a Meta checkpoint, telling
which by its files; then place it (device, KV type). Each format is one module (gguf.py, hf.py, meta.py)
with its name table, its config reader and its loader; build.py assigns the tensors into the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..kernels.ops import kernels_available
from ..model.transformer import kv_type_name
from ..text.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir, tokenizer_from_model_file
from .gguf import gguf_metadata, load_gguf, open_gguf
from .hf import load_hf
from .loaded import LoadedModel, ModelFileError
from .meta import load_meta


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         quantized: bool = True, kv_type: str | None = None) -> LoadedModel:
    """Load a GGUF file, an HF directory or a Meta checkpoint directory, telling which by its files,
    onto `device` in `dtype` (fp32 by default: without AVX-512 BF16, bf16 matmuls are slow on CPUs).
    GGUF Q4_0/Q4_1/Q8_0 weights stay quantized for the CPU kernels unless `quantized` is False (e.g.
    for training); on other devices they are dequantized, where dense matmuls are the fast path.
    `kv_type` (model.KV_TYPES) is what its KV caches hold; by default default_kv_type's choice.
    (backends.load also takes ExecuTorch programs and a rank's part under torchrun.)"""
    if kv_type is not None:
        kv_type_name(kv_type)  # an unknown name is refused before the weights are read
    on_cpu = torch.device(device).type == "cpu"
    return place(_load(Path(path).expanduser(), dtype, quantized and on_cpu), device, kv_type)


def place(lm: LoadedModel, device: str | torch.device = "cpu", kv_type: str | None = None) -> LoadedModel:
    """A loaded model moved to `device`, its chat template handed to its tokenizer, its KV type set."""
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu:
        lm.model.to(device)
    if lm.tokenizer is not None and lm.chat_template and not lm.tokenizer.chat_template:
        lm.tokenizer.chat_template = lm.chat_template  # travels with the tokenizer (save_tokenizer, GGUF export)
    if kv_type == "q8_0" and not on_cpu:
        raise ValueError(f"a q8_0 KV cache needs the CPU kernels, not {device}: use --kv-type f16 or bf16")
    lm.model.kv_type = kv_type or default_kv_type(lm.model)
    return lm


def default_kv_type(model: torch.nn.Module) -> str | None:
    """f16 for an fp32 model on the CPU kernels, whose attention reads fp16 keys and values directly:
    half the bytes of fp32 a step, so decode at long contexts runs faster (BENCHMARKS.md) for a
    rounding that keeps greedy answers (benchmarks/faithfulness.py). Otherwise None: the model's dtype."""
    on_cpu = model.norm.weight.device.type == "cpu"
    return "f16" if on_cpu and kernels_available() and model.norm.weight.dtype == torch.float32 else None


def _load(path: Path, dtype: torch.dtype, quantized: bool) -> LoadedModel:
    if not path.exists():
        raise ModelFileError(f"no model at {path}: give a GGUF file, a Hugging Face directory or a Meta "
                             f"checkpoint directory (or a name from `llamalite list`)")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return load_gguf(path, dtype, quantized)
        raise ModelFileError(f"{path} is not a GGUF file (it does not start with the GGUF magic); "
                             f"for a Hugging Face or Meta checkpoint give its directory")
    if (path / "config.json").exists():
        return load_hf(path, dtype)
    if (path / "params.json").exists():
        return load_meta(path, dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], dtype, quantized)
    raise ModelFileError(f"{path} holds neither config.json (Hugging Face), params.json (Meta) nor one "
                         f".gguf file" + (f" (it holds {len(ggufs)} .gguf files: name one)" if ggufs else ""))


def load_tokenizer(path: str | Path) -> "Tokenizer":
    """Only the tokenizer of a model (GGUF file, HF or Meta directory), or of a tokenizer.json /
    tokenizer.model file: what `prepare` needs, without loading any weights."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"no model or tokenizer at {path}")
    if path.is_file():
        if path.name == "tokenizer.json":
            return tokenizer_from_hf_dir(path.parent)
        if path.suffix == ".model":
            return tokenizer_from_model_file(path)
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFileError(f"{path} is neither a GGUF file, a tokenizer.json nor a tokenizer.model")
        meta = gguf_metadata(open_gguf(path))
        tokenizer = tokenizer_from_gguf(meta)
        tokenizer.chat_template = meta.get("tokenizer.chat_template")
        return tokenizer
    if (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists():
        return tokenizer_from_hf_dir(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_tokenizer(ggufs[0])
    raise ModelFileError(f"{path} holds no tokenizer.json, tokenizer.model or single .gguf file")


# ----- GGUF ---------------------------------------------------------------------------------------


# ----- Hugging Face -------------------------------------------------------------------------------


# ----- Meta ---------------------------------------------------------------------------------------


