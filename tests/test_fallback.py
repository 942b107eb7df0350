"""Without the compiled kernels, quantized layers run on PyTorch ops and give the reference result."""

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T, quants as gq

import llamalite.kernels.ops as ops
import llamalite.runtime.quantized as q


def test_pure_pytorch_path_without_kernels(monkeypatch):
    monkeypatch.setattr(ops, "_loaded", False)
    w = np.random.default_rng(0).standard_normal((24, 96)).astype(np.float32)
    raw = torch.from_numpy(gq.quantize(w, T.Q4_1))
    layer = q.QuantLinear(raw, "Q4_1", 96)
    assert not layer.packed and ops.simd_path() == "pytorch"
    x = torch.randn(3, 96)
    ref = torch.from_numpy(gq.dequantize(raw.numpy(), T.Q4_1).astype(np.float32))
    torch.testing.assert_close(layer(x), F.linear(x, ref), rtol=0, atol=0)
    emb = q.QuantEmbedding(raw, "Q4_1", 96)
    torch.testing.assert_close(emb(torch.tensor([[2, 5]])), ref[[2, 5]][None], rtol=0, atol=0)


def test_missing_kernels_are_reported_once(monkeypatch, recwarn):
    import sys

    monkeypatch.setitem(sys.modules, "llamalite.kernels._cpu", None)  # an import of it now fails, as unbuilt
    monkeypatch.setattr(ops, "_loaded", None)
    assert ops.kernels_available() is False
    assert ops.kernels_available() is False
    messages = [str(w.message) for w in recwarn if "compiled kernels are unavailable" in str(w.message)]
    assert len(messages) == 1 and "pip install --no-build-isolation" in messages[0]
