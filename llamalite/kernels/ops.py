"""The compiled kernels' face: whether they loaded, which SIMD path this CPU takes, the block types that
have a kernel, and the ops' shapes for torch.compile. The ops themselves (torch.ops.llamalite.*) are
registered by importing the extension, llamalite.kernels._cpu, built from cpu.cpp at install.

The ground floor: everything above (the model, the runtime layers, the distributed reducer) asks here,
and nothing here imports the rest of llamalite.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from .blocks import BLOCK

# ggml type ids of the block formats with a fused kernel
KERNEL_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}

_loaded: bool | None = None


def kernels_available() -> bool:
    """Whether llamalite.kernels._cpu (built at install) loads; says once, if not, that PyTorch ops are used."""
    global _loaded
    if _loaded is None:
        try:
            importlib.import_module(f"{__package__}._cpu")  # registers torch.ops.llamalite.*
            _loaded = True
        except ImportError as e:
            _loaded = False
            warnings.warn(f"llamalite's compiled kernels are unavailable ({e}); using the slower pure-PyTorch "
                          f"path. Reinstall with a C++ compiler present: pip install --no-build-isolation -e .",
                          stacklevel=2)
    return _loaded


def simd_paths() -> list[tuple[str, int]]:
    """The kernel paths this CPU runs, best first, with the numbers `qmatmul_path` takes."""
    if not kernels_available():
        return []
    return [tuple(p) for p in importlib.import_module(f"{__package__}._cpu").simd_paths()]


def simd_path() -> str:
    """The path the kernels take here: avx512vnni, avx2 or portable (or pytorch: no compiled kernels)."""
    paths = simd_paths()
    return paths[0][0] if paths else "pytorch"


def register_fake() -> None:
    """Shapes of the custom ops for torch.compile's tracing."""
    if not kernels_available() or getattr(register_fake, "done", False):
        return

    @torch.library.register_fake("llamalite::qmatmul")
    def _(x, w, qtype):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("llamalite::repack")
    def _(w, qtype):
        return torch.empty_like(w)

    @torch.library.register_fake("llamalite::repack_")
    def _(w, qtype):
        return None

    @torch.library.register_fake("llamalite::quantize_q8_0")
    def _(w):
        return w.new_empty((w.shape[0], w.shape[1] // 32 * 34), dtype=torch.uint8)

    @torch.library.register_fake("llamalite::qmatmul_multi")
    def _(x, ws, qtype):
        return x.new_empty((x.shape[0], sum(w.shape[0] for w in ws)), dtype=torch.float32)

    @torch.library.register_fake("llamalite::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("llamalite::silu_mul")
    def _(gu):
        return gu.new_empty((gu.shape[0], gu.shape[1] // 2))

    @torch.library.register_fake("llamalite::experts")
    def _(x, ids, weights, w1, w3, w2, t13, t2, n_experts, path=0, b1=None, b3=None, b2=None, limit=0.0, alpha=1.702):
        return torch.empty_like(x, dtype=torch.float32)

    @torch.library.register_fake("llamalite::dequantize")
    def _(w, qtype):
        n_el, n_bytes = BLOCK[next(k for k, v in KERNEL_TYPES.items() if v == qtype)]
        return w.new_empty((w.shape[0], w.shape[1] // n_bytes * n_el), dtype=torch.float32)

    register_fake.done = True
