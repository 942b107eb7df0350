"""Native code and its Python face: the ground floor of llamalite."""

import importlib

# name -> the module that defines it: loaded on first use, so that importing one submodule (the CLI's
# --help reads model.config) does not import its neighbours (torch among them)
_WHERE = {"BLOCK": "blocks", "KERNEL_TYPES": "ops", "dequantize": "blocks", "kernels_available": "ops",
          "register_fake": "ops", "simd_path": "ops", "simd_paths": "ops"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
