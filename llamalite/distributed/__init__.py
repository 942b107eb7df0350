"""A model over torchrun's ranks, for inference: split by heads (tensor parallelism) or by layers (a
pipeline), each rank reading only its part of a GGUF file."""

import importlib

# name -> the module that defines it: loaded on first use, so that importing one submodule (the CLI's
# --help reads model.config) does not import its neighbours (torch among them)
_WHERE = {"ParallelError": "group", "Shard": "group", "from_env": "group", "parallelize": "tensor_parallel"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
