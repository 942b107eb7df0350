"""Dequantization of GGUF tensor types to fp32, vectorised in PyTorch.

Each block layout follows ggml's `ggml-common.h` structs (cited per function); the `gguf` package's
`gguf.quants.dequantize` is the reference the tests compare against. Input is the raw block bytes of
a tensor as a uint8 tensor whose last dimension is a whole number of blocks.
"""

from __future__ import annotations

import numpy as np
import torch

# type name -> (elements per block, bytes per block), as in ggml's type traits
BLOCK = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "MXFP4": (32, 17),
}
PLAIN = ("F32", "F16", "BF16")
SUPPORTED = PLAIN + tuple(BLOCK)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2k) uint8 -> (..., k) fp32 read as little-endian fp16."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes -> (n, 32) fp32: low nibbles are elements 0-15, high nibbles 16-31."""
    q = torch.empty(qs.shape[0], 32, dtype=torch.float32)
    q[:, :16] = qs & 0x0F  # writing into a preallocated fp32 tensor converts in the same pass
    q[:, 16:] = qs >> 4
    return q


def _bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n/8) bytes read as a little-endian bitfield -> (..., n) of 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b[..., :, None] >> shifts) & 1).flatten(-2)[..., :n]


def _q4_0(blk):  # block_q4_0 { ggml_half d; uint8_t qs[16]; }
    d = _f16(blk[:, 0:2])
    return (_nibbles(blk[:, 2:18]) - 8) * d


def _q4_1(blk):  # block_q4_1 { ggml_half d, m; uint8_t qs[16]; }
    d, m = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    return torch.addcmul(m, _nibbles(blk[:, 4:20]), d)


def _q5_0(blk):  # block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }
    d = _f16(blk[:, 0:2])
    q = _nibbles(blk[:, 6:22]) + _bits(blk[:, 2:6], 32) * 16
    return (q - 16) * d


def q5_0_as_q8_0(data: np.ndarray | torch.Tensor, rows: int) -> torch.Tensor:
    """Q5_0 blocks -> the same values as Q8_0 blocks, exactly: d * (q - 16) with q - 16 in [-16, 15]
    is a Q8_0 value of the same d. (rows, bytes) uint8 in GGUF order, 34 bytes a block for 22."""
    blk = torch.as_tensor(data).reshape(-1, 22)
    out = torch.empty(blk.shape[0], 34, dtype=torch.uint8)
    step = 1 << 16  # blocks at a time: the temporaries stay a few MB
    for b in range(0, blk.shape[0], step):
        part = blk[b:b + step]
        qs = part[:, 6:22]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1) | (_bits(part[:, 2:6], 32) << 4)
        out[b:b + step, 0:2] = part[:, 0:2]
        out[b:b + step, 2:34] = (q.to(torch.int16) - 16).to(torch.int8).view(torch.uint8)
    return out.reshape(rows, -1)


def _q5_1(blk):  # block_q5_1 { ggml_half d, m; uint8_t qh[4]; uint8_t qs[16]; }
    d, m = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    q = _nibbles(blk[:, 8:24]) + _bits(blk[:, 4:8], 32) * 16
    return torch.addcmul(m, q, d)


def _q8_0(blk):  # block_q8_0 { ggml_half d; int8_t qs[32]; }
    d = _f16(blk[:, 0:2])
    return blk[:, 2:34].contiguous().view(torch.int8).float() * d


def _k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks: ggml's get_scale_min_k4."""
    lo, hi = sc[:, 0:4], sc[:, 4:8]
    scales = torch.cat((lo & 63, (sc[:, 8:12] & 0x0F) | ((lo >> 6) << 4)), dim=-1)
    mins = torch.cat((hi & 63, (sc[:, 8:12] >> 4) | ((hi >> 6) << 4)), dim=-1)
    return scales.float(), mins.float()


def _q4_k(blk):  # block_q4_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qs[128]; }
    d, dmin = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    sc, mn = _k_scales(blk[:, 4:16])
    qs = blk[:, 16:144].reshape(-1, 4, 32)
    # Each 32-byte chunk holds two 32-element sub-blocks: low nibbles first, then high nibbles.
    q = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32).float()
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(-1, 256)


def _q5_k(blk):  # block_q5_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }
    d, dmin = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    sc, mn = _k_scales(blk[:, 4:16])
    qh = blk[:, 16:48]
    qs = blk[:, 48:176].reshape(-1, 4, 32)
    low = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32)
    # Sub-block i takes its fifth bit from bit i of every qh byte.
    high = (qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1  # (n, 8, 32)
    q = (low | (high << 4)).float()
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(-1, 256)


def _q6_k(blk):  # block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }
    ql = blk[:, 0:128].reshape(-1, 2, 64)
    qh = blk[:, 128:192].reshape(-1, 2, 32)
    sc = blk[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 16)
    d = _f16(blk[:, 208:210])
    # Per 128-element half: four 32-element groups from the low/high nibbles of ql[0:32], ql[32:64]
    # and 2-bit fields 0, 1, 2, 3 of qh.
    lo = torch.stack((ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4), dim=2)
    hi = torch.stack(tuple((qh >> (2 * i)) & 3 for i in range(4)), dim=2)
    q = (lo | (hi << 4)).float().reshape(-1, 16, 16) - 32  # 16 groups of 16 share one scale
    return (d[:, :, None] * sc[:, :, None] * q).reshape(-1, 256)


# MXFP4's E2M1 values, doubled (ggml's kvalues_mxfp4): the block's scale is then 2^(e - 128), not 2^(e - 127)
_E2M1 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32)


def _e2m1_int8(n: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8) -> _E2M1's integers as int8: magnitudes 0, 1, 2, 3, then (2 or 3) << 1 or << 2
    (4, 6, 8, 12); bit 3 the sign."""
    m = (n & 7).to(torch.int16)
    v = torch.where(m < 4, m, (2 + (m & 1)) << ((m >> 1) - 1).clamp(min=0))
    return torch.where((n & 8) > 0, -v, v).to(torch.int8)


def mxfp4_as_q8_0(data: np.ndarray | torch.Tensor, rows: int, kernels: bool = True) -> torch.Tensor | None:
    """MXFP4 blocks -> Q8_0 blocks (GGUF order, (rows, bytes) uint8, 34 bytes a block for 17) of the same
    values: each value kv * 2^(e - 128) (kv an integer of -12..12, _E2M1) is the Q8_0 value kv of scale
    d = 2^(e - 128), which fp16 holds exactly for e - 128 in -24..15. A block of smaller scale (values under
    2^-20) takes d = 2^-24 and rounds its values to it; None where a scale is past fp16's range (the caller
    re-quantizes then). The compiled kernels' loop where they are loaded (`kernels`), else PyTorch's ops."""
    blk = torch.as_tensor(data).reshape(-1, 17)
    e = blk[:, 0].to(torch.int32)
    if bool((e > 128 + 15).any()):
        return None
    if kernels and hasattr(torch.ops.llamalite, "mxfp4_as_q8_0"):
        return torch.ops.llamalite.mxfp4_as_q8_0(blk).reshape(rows, -1)
    out = torch.empty(blk.shape[0], 34, dtype=torch.uint8)
    step = 1 << 16  # blocks at a time: the temporaries stay a few MB
    for b in range(0, blk.shape[0], step):
        part, exp = blk[b:b + step], e[b:b + step] - 128
        q = torch.cat([_e2m1_int8(part[:, 1:17] & 0x0F), _e2m1_int8(part[:, 1:17] >> 4)], dim=1)  # (n, 32)
        small = (exp < -24).nonzero().flatten()  # below fp16's least subnormal: scale 2^-24, values rounded to it
        if len(small):
            q[small] = torch.round(torch.ldexp(q[small].float(), (exp[small] + 24)[:, None])).to(torch.int8)
        d = torch.ldexp(torch.ones(part.shape[0]), exp.clamp(min=-24)).to(torch.float16)
        out[b:b + step, 0:2] = d.view(torch.uint8).reshape(-1, 2)
        out[b:b + step, 2:34] = q.view(torch.uint8)
    return out.reshape(rows, -1)


def _mxfp4(blk):  # block_mxfp4 { uint8_t e; uint8_t qs[16]; }: OCP microscaling, an E8M0 scale and 4-bit E2M1 values
    scale = torch.ldexp(torch.ones(blk.shape[0], 1), blk[:, 0:1].to(torch.int32) - 128)
    return _E2M1[_nibbles(blk[:, 1:17]).long()] * scale


_DEQUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
            "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "MXFP4": _mxfp4}


def dequantize(data: np.ndarray | torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor data -> fp32 tensor of `shape` (PyTorch order: rows first)."""
    if type_name not in SUPPORTED:
        raise ValueError(f"GGUF tensor type {type_name} is not supported (supported: {', '.join(SUPPORTED)})")
    t = torch.as_tensor(data)
    if type_name == "F32":
        return t.view(torch.float32).reshape(shape)
    if type_name == "F16":
        return t.view(torch.float16).reshape(shape).float()
    if type_name == "BF16":
        return t.contiguous().view(torch.uint8).view(torch.bfloat16).reshape(shape).float()
    n_el, n_bytes = BLOCK[type_name]
    blocks = t.contiguous().view(torch.uint8).reshape(-1, n_bytes)
    return _DEQUANT[type_name](blocks).reshape(shape)
