"""A model built from Meta-named tensors: built on the meta device (nothing allocated twice), each tensor
checked against the config's shapes and assigned, quantized blocks as the runtime's layers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping

import torch
from torch import nn

from ..model.config import ModelConfig
from ..model.transformer import Transformer
from .loaded import ModelFileError


@contextmanager
def _skip_init():
    """Skip nn.init while building on the meta device: the weights are assigned right after, and
    initialising meta tensors routes through torch's Python reference ops (and imports torch._dynamo,
    a second of start-up)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *args, **kwargs: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def build_model(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                quantized: Mapping[str, tuple[torch.Tensor, str, bool]] | None = None) -> Transformer:
    """Assign Meta-named weights into a model built without memory; shapes and names are checked.

    `quantized` maps weight names to (block bytes, type name, already packed): those layers become
    QuantLinear / QuantEmbedding modules holding the blocks (GGUF-ordered ones are repacked in place
    for the kernels: the caller hands over buffers it owns)."""
    from ..runtime.quantized import QuantEmbedding, QuantExpertLinear, QuantLinear, use_kernels
    from ..kernels.blocks import BLOCK

    quantized = dict(quantized or {})
    with torch.device("meta"), _skip_init():
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight")
    given = set(weights) | set(quantized)
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    if missing:
        raise ModelFileError(f"the checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    if unexpected:
        raise ModelFileError(f"the checkpoint has {len(unexpected)} tensors the config does not know, "
                             f"e.g. {unexpected[:3]}")
    state = {}
    for name, shape in expected.items():
        if name in quantized:
            raw, type_name, _ = quantized[name]
            n_el, n_bytes = BLOCK[type_name]
            w_shape = (raw.shape[0], raw.shape[1] // n_bytes * n_el)
            if len(shape) == 3 and raw.shape[0] % shape[0] == 0:  # the experts' rows one after another
                w_shape = (shape[0], raw.shape[0] // shape[0], w_shape[1])
        else:
            w_shape = tuple(weights[name].shape)
        if tuple(w_shape) != tuple(shape):
            raise ModelFileError(f"tensor {name!r} has shape {tuple(w_shape)} but the config expects {tuple(shape)}")
        if name not in quantized:
            state[name] = weights[name].to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for name, (raw, type_name, packed) in quantized.items():
        parent, attr = name.removesuffix(".weight").rsplit(".", 1) if "." in name.removesuffix(".weight") else (
            "", name.removesuffix(".weight"))
        owner = model.get_submodule(parent)
        if attr == "tok_embeddings":
            setattr(owner, attr, QuantEmbedding(raw, type_name, cfg.dim, in_place=True, packed=packed))
        else:
            if len(expected[name]) == 3:  # one projection of every expert
                layer = QuantExpertLinear(raw, type_name, expected[name][0], expected[name][2], in_place=True,
                                          packed=packed)
            else:
                layer = QuantLinear(raw, type_name, expected[name][1], in_place=True, packed=packed)
            layer.bias = getattr(owner, attr).bias  # a dense bias stays one (loaded above)
            setattr(owner, attr, layer)
    if cfg.tie_embeddings:
        emb = model.tok_embeddings
        if isinstance(emb, QuantEmbedding):
            model.output = QuantLinear.sharing(emb)
        else:
            model.output.weight = emb.weight
    return use_kernels(model).eval()
