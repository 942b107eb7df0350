"""Phones and TVs: a model exported to an ExecuTorch program (.pte), and such a program run."""

import importlib

# name -> the module that defines it: loaded on first use, so that importing one submodule (the CLI's
# --help reads model.config) does not import its neighbours (torch among them)
_WHERE = {"DeviceExportError": "program", "export_executorch": "export", "load_pte": "program"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
