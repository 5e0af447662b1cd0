"""Weights in every ggml type for kernel tests (CPU and CUDA).

Where gguf.quants can quantize a type, the weight is random normal data quantized by it; for
the other types it is random block bytes whose float16 scale fields are set to small finite
values (random bytes there would give infinities and NaNs).
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import quantize

QUANTIZABLE_BY_GGUF = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"}

# Byte offsets of the float16 scale fields inside one block (from ggml-common.h's layouts).
F16_SCALE_OFFSETS = {
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ1_S": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,),
    "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
}


def _small_f16_bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    magnitudes = rng.uniform(1e-3, 2e-2, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return magnitudes.astype(np.float16).view(np.uint8).reshape(*shape, 2)


def _set_iq1_m_scale(rng: np.random.Generator, blocks: np.ndarray) -> None:
    """IQ1_M spreads its float16 scale over the top nibbles of the four u16 scales (bytes 48..55)."""
    scale_bits = _small_f16_bytes(rng, blocks.shape[:2]).view(np.uint16)[..., 0]
    for k in range(4):
        nibble = ((scale_bits >> (4 * k)) & 0xF).astype(np.uint8)
        high_byte = blocks[..., 49 + 2 * k]
        blocks[..., 49 + 2 * k] = (high_byte & 0x0F) | (nibble << 4)


def random_weight(rng: np.random.Generator, type_name: str, n_rows: int, n_cols: int) -> np.ndarray:
    """uint8 (n_rows, row_bytes) weight bytes of the given ggml type."""
    qtype = QType[type_name]
    if type_name in QUANTIZABLE_BY_GGUF:
        values = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        return np.ascontiguousarray(quantize(values, qtype)).view(np.uint8).reshape(n_rows, -1)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_rows, n_cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS.get(type_name, ()):
        blocks[..., offset : offset + 2] = _small_f16_bytes(rng, blocks.shape[:2])
    if type_name == "IQ1_M":
        _set_iq1_m_scale(rng, blocks)
    return blocks.reshape(n_rows, -1)
