"""llamalite: run, chat with, serve, train and fine-tune LLaMA-family models in Python + PyTorch."""

__version__ = "0.1.0"

__all__ = ["load", "generate", "stream_text", "SamplingParams", "ModelConfig", "Transformer", "render_chat"]


def __getattr__(name: str):
    # Lazy: `import llamalite` (and `llamalite --help`) must not pay for importing torch.
    if name == "load":
        from .backends import load
        return load
    if name == "generate":
        from .generation.tokens import generate
        return generate
    if name == "stream_text":
        from .generation.stream import stream_text
        return stream_text
    if name == "SamplingParams":
        from .generation.sampling import SamplingParams
        return SamplingParams
    if name == "ModelConfig":
        from .model.config import ModelConfig
        return ModelConfig
    if name == "Transformer":
        from .model.transformer import Transformer
        return Transformer
    if name == "render_chat":
        from .text.chat_template import render_chat
        return render_chat
    raise AttributeError(f"module 'llamalite' has no attribute {name!r}")
