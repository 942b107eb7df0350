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
