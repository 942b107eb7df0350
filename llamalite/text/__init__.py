"""Text in and out: tokenizers of every format, exactly as the reference; chat templates."""

import importlib

# name -> the module that defines it: loaded on first use, so that importing one submodule (the CLI's
# --help reads model.config) does not import its neighbours (torch among them)
_WHERE = {"TemplateError": "chat_template", "Tokenizer": "tokenizer", "encode_chat": "chat_template",
          "render_chat": "chat_template", "save_tokenizer": "tokenizer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
