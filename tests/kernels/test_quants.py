import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants as gq

from llamalite.kernels.blocks import BLOCK, dequantize
from tests.helpers import random_blocks


@pytest.mark.parametrize("type_name", sorted(BLOCK))
def test_dequantize_matches_gguf_package(type_name):
    n_el, n_bytes = BLOCK[type_name]
    rows, cols = 3, n_el * 2
    raw = random_blocks(type_name, rows * cols // n_el).reshape(rows, -1)
    expected = gq.dequantize(raw, GGMLQuantizationType[type_name])
    ours = dequantize(raw, type_name, (rows, cols))
    torch.testing.assert_close(ours, torch.from_numpy(expected.astype(np.float32)), rtol=0, atol=0)


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_plain_types_match_gguf_package(type_name):
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    raw = gq.quantize(x, GGMLQuantizationType[type_name])
    ours = dequantize(raw, type_name, (4, 8))
    expected = gq.dequantize(raw, GGMLQuantizationType[type_name])
    torch.testing.assert_close(ours, torch.from_numpy(expected.astype(np.float32)), rtol=0, atol=0)


def test_unsupported_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="Q2_K is not supported.*Q4_K"):
        dequantize(np.zeros(84, np.uint8), "Q2_K", (256,))


def test_mxfp4_becomes_q8_0_of_the_same_values():
    """MXFP4 as Q8_0 blocks: exactly the gguf package's values where the scale fits fp16 (2^-24 .. 2^15),
    within 2^-25 where it is smaller; None (re-quantize) where it is larger."""
    from llamalite.kernels.blocks import mxfp4_as_q8_0

    raw = random_blocks("MXFP4", 4 * 8, seed=3).reshape(4, -1)  # scales 2^-28 .. 2^11
    want = torch.from_numpy(gq.dequantize(raw, GGMLQuantizationType.MXFP4).astype(np.float32))
    q8 = mxfp4_as_q8_0(raw, 4)
    got = torch.from_numpy(gq.dequantize(q8.numpy(), GGMLQuantizationType.Q8_0).astype(np.float32))
    exact = torch.from_numpy(raw[:, ::17].astype(np.int32) >= 128 - 24).repeat_interleave(32, dim=1)
    assert exact.any() and (~exact).any()
    assert torch.equal(got[exact], want[exact])
    assert float((got - want).abs().max()) <= 2.0 ** -25
    from llamalite.kernels.ops import kernels_available

    if kernels_available():  # the kernels' loop and PyTorch's ops: the same bytes
        assert torch.equal(q8, mxfp4_as_q8_0(raw, 4, kernels=False))
        assert torch.equal(torch.ops.llamalite.mxfp4_as_q8_0(torch.from_numpy(raw)), q8.reshape(-1, 34))
    raw[0, 0] = 128 + 16
    assert mxfp4_as_q8_0(raw, 4) is None
