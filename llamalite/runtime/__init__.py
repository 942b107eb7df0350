"""Modules swapped into a loaded model to run it: quantized layers on the kernels and their one-call
decode step; LoRA adapters served unmerged."""

import importlib

# name -> the module that defines it: loaded on first use, so that importing one submodule (the CLI's
# --help reads model.config) does not import its neighbours (torch among them)
_WHERE = {"AdaptedLinear": "adapters", "AdapterSet": "adapters", "FastTransformer": "quantized",
          "QuantEmbedding": "quantized", "QuantLinear": "quantized", "use_kernels": "quantized"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
