"""Files in and out: every model file format (GGUF, Hugging Face, Meta), its names, layout and loaders;
the writers; llamalite's run directories and adapters; where model files come from."""

import importlib

# name -> the module that defines it: loaded on first use, so that importing one submodule (the CLI's
# --help reads model.config) does not import its neighbours (torch among them). Loading a file is
# formats.load.load: a face name `load` would be replaced by the submodule of that name once imported.
_WHERE = {"LoadedModel": "loaded", "ModelFileError": "loaded", "load_tokenizer": "load",
          "resolve_model": "store"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
