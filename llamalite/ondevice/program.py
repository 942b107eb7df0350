"""A `.pte` program run here through `executorch.runtime`: loaded without the exporter's imports, its
kernel libraries registered once a process, its tokenizer and config read from beside it (what
ondevice/export.py writes)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch

from ..model.config import ModelConfig


def require_executorch(part: str = "exir") -> None:
    """Import executorch's exporter (`exir`) or its `runtime`, or say what to install."""
    try:
        if part == "runtime":
            _import_runtime()
        importlib.import_module(f"executorch.{part}")
    except ImportError:
        raise DeviceExportError("exporting to (or running) ExecuTorch needs the executorch package: "
                                "pip install 'llamalite[device]'") from None


def _import_runtime() -> None:
    """executorch.runtime without the exporter: its bindings import one warnings helper from
    executorch.exir, whose package imports the whole exporter (2.4 s here). The package is stood in for by
    an empty one of the same path while the runtime imports; a later `import executorch.exir` runs it whole."""
    if "executorch.exir" in sys.modules or "executorch.runtime" in sys.modules:
        return
    spec = importlib.util.find_spec("executorch.exir")
    if spec is None or not spec.submodule_search_locations:
        return
    stand_in = types.ModuleType("executorch.exir")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["executorch.exir"] = stand_in
    try:
        importlib.import_module("executorch.runtime")
    finally:
        del sys.modules["executorch.exir"]
        for name in [n for n in sys.modules if n.startswith("executorch.exir.") and n != "executorch.exir._warnings"]:
            del sys.modules[name]


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null for a block (C++ logging that Python cannot turn down)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def load_kernels() -> None:
    """Those ops' kernels for executorch.runtime (a device's runner links them: ExecuTorch's LLaMA runner
    does)."""
    _import_runtime()
    import executorch.runtime  # the runtime the libraries register into

    root = Path(executorch.runtime.__file__).parent.parent
    for pattern in ("extension/llm/custom_ops/*custom_ops_aot_lib.*", "kernels/quantized/*quantized_ops_aot_lib.*"):
        for lib in root.glob(pattern):
            torch.ops.load_library(str(lib.resolve()))


def tokenizer_dir(pte: Path) -> Path:
    return pte.with_suffix(".tokenizer")


def meta_path(pte: Path) -> Path:
    return pte.with_suffix(".json")


class PteModel:
    """A `.pte` program run through executorch.runtime, with what generate, chat, bench and perplexity ask
    of a model: one sequence, its KV cache inside the program."""

    device = torch.device("cpu")
    kv_type = None

    def __init__(self, path: Path, config: ModelConfig, max_seq_len: int):
        require_executorch("runtime")
        load_kernels()
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        with quiet_stderr():  # the pool's CPU probe logs what it reads, at info level, to fd 2
            portable_lib._unsafe_reset_threadpool(torch.get_num_threads())  # --threads, as torch's
        self.path = path
        self.method = Runtime.get().load_program(str(path)).load_method("forward")
        self.config = dataclasses.replace(config, context_length=max_seq_len)
        self.max_seq_len, self.cache_batch = max_seq_len, 1
        self.cache_tokens: list[int] = []

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None) -> None:
        if max_batch_size != 1:
            raise ValueError(f"{self.path.name} is an ExecuTorch program of one sequence: run it with one "
                             f"(serve needs --max-batch 1)")
        if max_seq_len > self.max_seq_len:
            raise ValueError(f"{self.path.name} was exported for {self.max_seq_len} positions, not {max_seq_len}")
        self.cache_tokens = []

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[0] != 1 or (rows is not None and bool((rows != 0).any())):
            raise ValueError(f"{self.path.name} runs one sequence at a time (no batches, drafts or slots)")
        T = tokens.shape[1]
        pos = torch.arange(T) if input_pos is None else input_pos.reshape(-1)
        if T > 1 and not bool((pos[1:] - pos[:-1] == 1).all()):
            raise ValueError(f"{self.path.name} takes a run of consecutive positions (its cache is written from the first)")
        if int(pos[-1]) >= self.max_seq_len:
            raise ValueError(f"position {int(pos[-1])} is beyond the {self.max_seq_len} positions {self.path.name} "
                             f"was exported for (--max-seq-len)")
        logits = self.method.execute([tokens.long().cpu(), pos.long().cpu()])[0]
        return logits[:, -1:] if last_only else logits


def load_pte(path: Path):
    """A LoadedModel of an exported program and the tokenizer and metadata beside it."""
    from ..formats.loaded import LoadedModel, ModelFileError
    from ..text.tokenizer import tokenizer_from_hf_dir

    meta_file, tok_dir = meta_path(path), tokenizer_dir(path)
    if not meta_file.exists():
        raise ModelFileError(f"{path} has no {meta_file.name} beside it (written by `llamalite export --to "
                             f"executorch`): llamalite needs its config to run the program")
    meta = json.loads(meta_file.read_text())
    cfg = ModelConfig(**{k: v for k, v in meta["config"].items()})
    if not tok_dir.is_dir():
        raise ModelFileError(f"{path} has no tokenizer beside it ({tok_dir.name}/): export it again with its tokenizer")
    tokenizer = tokenizer_from_hf_dir(tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text()) if (tok_dir / "tokenizer_config.json").exists() else {}
    model = PteModel(path, cfg, int(meta["max_seq_len"]))
    return LoadedModel(model, tokenizer, config.get("chat_template"), path, "executorch", metadata=meta)


class DeviceExportError(ValueError):
    """A model or setting the export cannot handle, or ExecuTorch missing; the message says what to do."""
