"""Native code and its Python face: the ground floor of llamalite."""

from .blocks import BLOCK, dequantize
from .ops import KERNEL_TYPES, kernels_available, register_fake, simd_path, simd_paths

__all__ = ["BLOCK", "KERNEL_TYPES", "dequantize", "kernels_available", "register_fake", "simd_path", "simd_paths"]
