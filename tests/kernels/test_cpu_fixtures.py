"""Every tensor of the reference GGUF fixtures decodes bit-exactly, and multiplies correctly.

GGUFReader gives `tensor.data` rows first: quantized tensors as uint8 (..., n_rows, row_bytes),
F32/F16 tensors as float32/float16 (..., n_rows, n_cols); `tensor.shape` is in ggml's ne order
(ne0 = n_cols first).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from kernels.cpu import dequantize_rows, matmul, row_bytes

FIXTURE_FILES = [
    "llama-dense/Q4_K_M.gguf",
    "llama-dense/Q6_K.gguf",
    "llama-dense/Q8_0.gguf",
    "llama-dense/Q4_0.gguf",
    "qwen3/Q5_K_M.gguf",
    "llama-moe/Q4_K_M.gguf",
]


def weight_bytes(tensor) -> tuple[np.ndarray, int]:
    """(uint8 (n_rows, row_bytes), n_cols) of a GGUFReader tensor; 3-D experts stacked as rows."""
    n_cols = int(tensor.shape[0])
    data = np.ascontiguousarray(tensor.data).view(np.uint8)
    return data.reshape(-1, row_bytes(tensor.tensor_type, n_cols)), n_cols


@pytest.mark.parametrize("relative_path", FIXTURE_FILES)
def test_fixture_tensors_decode_bit_exactly(fixtures_dir, relative_path):
    path = fixtures_dir / relative_path
    if not path.exists():
        pytest.skip(f"{path} not found")
    reader = GGUFReader(path)
    types_seen = set()
    rng = np.random.default_rng(5)
    for tensor in reader.tensors:
        w, n_cols = weight_bytes(tensor)
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(w.shape[0], n_cols)
        decoded = dequantize_rows(w, tensor.tensor_type, n_cols)
        assert np.array_equal(decoded.view(np.uint32), expected.view(np.uint32)), tensor.name
        types_seen.add(tensor.tensor_type.name)
        if w.shape[0] > 1:
            x = rng.standard_normal((2, n_cols)).astype(np.float32)
            reference = x.astype(np.float64) @ expected.astype(np.float64).T
            error = np.sum((matmul(x, w, tensor.tensor_type, n_cols) - reference) ** 2) / np.sum(reference**2)
            assert error < 1e-10, tensor.name
    assert len(types_seen) >= 2
