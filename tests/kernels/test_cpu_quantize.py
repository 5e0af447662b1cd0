"""quantize_rows against ggml's reference quantizers, and the round trip through dequantize_rows.

data/ggml_quantize_reference.npz holds rows `x` and, per type, the bytes that ggml's
quantize_row_<type>_ref (ggml-quants.c, built for x86-64 without FMA) wrote for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize, quantize

from kernels.cpu import dequantize_rows, quantize_rows, row_bytes

REFERENCE = Path(__file__).parent / "data" / "ggml_quantize_reference.npz"
BLOCK_TYPE_NAMES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"]
GGUF_QUANTIZED_NAMES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# Relative RMS error of a round trip on normal data: what each format can hold, with margin.
ROUND_TRIP_BUDGET = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 1e-2, "Q5_0": 5e-2, "Q5_1": 5e-2,
                     "Q4_0": 1e-1, "Q4_1": 1e-1, "IQ4_NL": 1e-1}


def awkward_rows(rng: np.random.Generator) -> np.ndarray:
    """Rows with ties, constant and zero blocks, and a wide dynamic range."""
    x = rng.standard_normal((8, 128)).astype(np.float32)
    x[1] = rng.integers(-16, 17, 128).astype(np.float32) * np.float32(0.25)
    x[2, :64] = 0.0
    x[2, 64:] = 3.0
    x[3] *= np.exp(rng.uniform(-8, 8, 128)).astype(np.float32)
    x[4] *= np.float32(1e-6)
    x[5] = np.linspace(-1, 1, 128, dtype=np.float32)
    return x


@pytest.fixture(scope="module")
def ggml_reference():
    with np.load(REFERENCE) as data:
        return {name: data[name] for name in data.files}


@pytest.mark.parametrize("type_name", BLOCK_TYPE_NAMES)
def test_matches_ggml_reference_quantizer(ggml_reference, type_name):
    x = ggml_reference["x"]
    expected = ggml_reference[type_name]
    result = quantize_rows(x, QType[type_name])
    assert result.dtype == np.uint8 and result.shape == expected.shape
    if type_name == "IQ4_NL":
        # Row 8 starts with an all-zero block: ggml leaves that block's indices undefined
        # (its scale is 0), so only its scale bytes can be compared.
        result, expected = result.copy(), expected.copy()
        assert np.array_equal(result[8, :2], expected[8, :2])
        result[8, 2:18] = expected[8, 2:18] = 0
    assert np.array_equal(result, expected)


@pytest.mark.parametrize("type_name", GGUF_QUANTIZED_NAMES)
def test_matches_gguf_quantize(rng, type_name):
    x = np.concatenate([awkward_rows(rng), rng.standard_normal((4, 128)).astype(np.float32) * 40])
    expected = np.ascontiguousarray(quantize(x, QType[type_name])).view(np.uint8).reshape(x.shape[0], -1)
    assert np.array_equal(quantize_rows(x, QType[type_name]), expected)


@pytest.mark.parametrize("type_name", sorted(ROUND_TRIP_BUDGET))
def test_round_trip(rng, type_name):
    qtype = QType[type_name]
    x = rng.standard_normal((16, 256)).astype(np.float32)
    blocks = quantize_rows(x, qtype)
    assert blocks.shape == (16, row_bytes(qtype, 256))
    back = dequantize_rows(blocks, qtype, 256)
    assert np.array_equal(back.view(np.uint32), dequantize(blocks, qtype).reshape(16, 256).view(np.uint32))
    relative_rms = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
    assert relative_rms <= ROUND_TRIP_BUDGET[type_name]


def test_writes_into_kv_cache_rows(rng):
    cache = np.zeros((10, row_bytes(QType.Q8_0, 64)), dtype=np.uint8)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    quantize_rows(x, QType.Q8_0, out=cache[4:7])
    assert np.array_equal(cache[4:7], quantize_rows(x, QType.Q8_0))
    assert not cache[:4].any() and not cache[7:].any()
    one_row = quantize_rows(x[0], QType.Q8_0)
    assert one_row.shape == (1, cache.shape[1])


def test_rejects_unsupported_type_and_bad_out(rng):
    x = rng.standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="cannot quantize to Q4_K"):
        quantize_rows(x, QType.Q4_K)
    with pytest.raises(ValueError, match="out must be"):
        quantize_rows(x, QType.Q8_0, out=np.zeros((2, 10), np.uint8))
