"""Half-precision bit conversions (exhaustive or dense) and the row size table."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QType
from numba import njit

from kernels.cpu import block_shape, row_bytes
from kernels.cpu.formats import f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits


@njit
def _halves_to_f32(bits):
    out = np.empty(bits.shape[0], dtype=np.float32)
    for i in range(bits.shape[0]):
        out[i] = f16_bits_to_f32(bits[i])
    return out


@njit
def _f32_to_halves(values, brain):
    out = np.empty(values.shape[0], dtype=np.uint16)
    for i in range(values.shape[0]):
        out[i] = f32_to_bf16_bits(values[i]) if brain else f32_to_f16_bits(values[i])
    return out


def test_every_half_converts_like_numpy():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(_halves_to_f32(bits).view(np.uint32), expected.view(np.uint32))


def test_float_to_half_rounds_like_numpy():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32)
    near_subnormal_and_overflow = np.concatenate([
        np.arange(0x33000000, 0x38900000, 97, dtype=np.uint32),  # halves' subnormal range
        np.arange(0x477FE000, 0x47801000, dtype=np.uint32),  # 65504 .. 65536
        np.array([0, 0x7F800000], dtype=np.uint32),
    ])
    bits = np.concatenate([bits, near_subnormal_and_overflow, near_subnormal_and_overflow | 0x80000000])
    values = bits.view(np.float32)
    values = values[~np.isnan(values)]  # NaN payloads are not part of the contract
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    assert np.array_equal(_f32_to_halves(values, False), expected)
    assert np.array_equal(_f32_to_halves(np.array([np.nan], np.float32), False) & 0x7E00, [0x7E00])


def test_float_to_bfloat16_rounds_to_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5e-39, 3.4e38, np.inf, -np.inf, np.nan], np.float32)
    halfway_down, halfway_up = np.uint32(0x3F808000), np.uint32(0x3F818000)  # ties: to even
    values = np.concatenate([values, np.array([halfway_down, halfway_up], np.uint32).view(np.float32)])
    expected_high = (values.view(np.uint32).astype(np.uint64) + 0x7FFF + ((values.view(np.uint32) >> 16) & 1)) >> 16
    result = _f32_to_halves(values, True)
    finite = ~np.isnan(values)
    assert np.array_equal(result[finite], expected_high[finite].astype(np.uint16))
    assert result[np.isnan(values)][0] & 0x7FC0 == 0x7FC0  # stays a quiet NaN
    assert result[-2:].tolist() == [0x3F80, 0x3F82]


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_K, QType.Q6_K, QType.F16, QType.IQ4_XS])
def test_row_bytes_follows_gguf_table(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert block_shape(qtype) == (block_size, type_size)
    assert row_bytes(qtype, 3 * max(block_size, 256)) == 3 * max(block_size, 256) // block_size * type_size
    with pytest.raises(ValueError):
        row_bytes(qtype, block_size + 1 if block_size > 1 else 0)
