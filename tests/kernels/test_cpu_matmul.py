"""matmul and dequantize_rows against gguf.quants.dequantize, over every type and shape.

One test body per op over ggml type x shape (test-backend-ops style). The reference is
x @ dequantize(W).T in float64; the kernels decode W exactly and accumulate in float32, so
the error budget is float32 summation noise: normalised MSE 1e-10 (a single wrong weight in a
row of 768 already costs ~1e-3).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize

from kernels.cpu import FAST_TYPES, dequantize_rows, matmul, row_bytes

FAST_TYPE_NAMES = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
]
SLOW_TYPE_NAMES = [
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
    "TQ1_0", "TQ2_0", "MXFP4", "NVFP4",
]
ALL_TYPE_NAMES = FAST_TYPE_NAMES + SLOW_TYPE_NAMES

NMSE_BUDGET = 1e-10
N_TOKENS = [1, 3, 37]
N_ROWS = [1, 7, 64]
N_BLOCKS = [1, 3]  # one block only, and a few (F32/F16/BF16 "blocks" of 32 elements)


def n_cols_for(type_name: str, n_blocks: int) -> int:
    block_size = GGML_QUANT_SIZES[QType[type_name]][0]
    return max(block_size, 32) * n_blocks


def reference_matmul(x: np.ndarray, w: np.ndarray, type_name: str) -> np.ndarray:
    weights = dequantize(w, QType[type_name]).reshape(w.shape[0], -1)
    return x.astype(np.float64) @ weights.astype(np.float64).T


def nmse(result: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sum((result - reference) ** 2) / max(np.sum(reference**2), 1e-300))


def assert_bit_exact(result: np.ndarray, reference: np.ndarray) -> None:
    assert result.dtype == np.float32 and result.shape == reference.shape
    same = (result.view(np.uint32) == reference.view(np.uint32)) | (np.isnan(result) & np.isnan(reference))
    assert same.all(), f"{(~same).sum()} of {same.size} values differ"


def test_every_type_gguf_dequantizes_is_covered():
    dequantizable = {QType.F32, QType.F16}
    for qtype in GGML_QUANT_SIZES:
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            continue
        dequantizable.add(qtype)
    assert {t.name for t in dequantizable} <= set(ALL_TYPE_NAMES)
    assert {QType[name] for name in FAST_TYPE_NAMES} == set(FAST_TYPES)


@pytest.mark.parametrize("n_blocks", N_BLOCKS)
@pytest.mark.parametrize("n_rows", N_ROWS)
@pytest.mark.parametrize("type_name", ALL_TYPE_NAMES)
def test_matmul_matches_dequantized_reference(make_weight, rng, type_name, n_rows, n_blocks):
    n_cols = n_cols_for(type_name, n_blocks)
    w = make_weight(type_name, n_rows, n_cols)
    assert w.shape == (n_rows, row_bytes(QType[type_name], n_cols))
    for n_tokens in N_TOKENS:
        x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
        y = matmul(x, w, QType[type_name], n_cols)
        assert y.dtype == np.float32 and y.shape == (n_tokens, n_rows)
        assert nmse(y, reference_matmul(x, w, type_name)) < NMSE_BUDGET, n_tokens


@pytest.mark.parametrize("type_name", ALL_TYPE_NAMES)
def test_dequantize_rows_is_bit_exact(make_weight, type_name):
    n_cols = n_cols_for(type_name, 3)
    w = make_weight(type_name, 9, n_cols)
    reference = dequantize(w, QType[type_name]).reshape(9, n_cols)
    assert_bit_exact(dequantize_rows(w, QType[type_name], n_cols), reference)
    rows = [8, 0, 4, 0]
    assert_bit_exact(dequantize_rows(w, int(QType[type_name]), n_cols, rows=rows), reference[rows])


def test_matmul_on_read_only_bytes_and_out_parameter(make_weight, rng):
    n_rows, n_cols = 20, 256
    w = make_weight("Q4_K", n_rows, n_cols)
    w.flags.writeable = False
    x = rng.standard_normal((5, n_cols)).astype(np.float32)
    out = np.full((5, n_rows), np.nan, dtype=np.float32)
    result = matmul(x, w, QType.Q4_K, n_cols, out=out)
    assert result is out
    assert nmse(out, reference_matmul(x, w, "Q4_K")) < NMSE_BUDGET


def test_single_token_vector(make_weight, rng):
    w = make_weight("Q8_0", 10, 64)
    x = rng.standard_normal(64).astype(np.float32)
    y = matmul(x, w, QType.Q8_0, 64)
    assert y.shape == (10,)
    assert nmse(y, reference_matmul(x[None], w, "Q8_0")[0]) < NMSE_BUDGET


def test_expert_slices_of_a_3d_tensor(make_weight, rng):
    n_expert, n_rows, n_cols = 4, 12, 256
    experts = make_weight("Q6_K", n_expert * n_rows, n_cols).reshape(n_expert, n_rows, -1)
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    for e in (0, 3):
        assert nmse(matmul(x, experts[e], QType.Q6_K, n_cols), reference_matmul(x, experts[e], "Q6_K")) < NMSE_BUDGET
    part = experts[2, 5:9]
    assert nmse(matmul(x, part, QType.Q6_K, n_cols), reference_matmul(x, part, "Q6_K")) < NMSE_BUDGET


def test_result_does_not_depend_on_thread_count(make_weight, rng):
    w = make_weight("Q5_0", 300, 640)
    x = rng.standard_normal((6, 640)).astype(np.float32)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one_thread = matmul(x, w, QType.Q5_0, 640)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        all_threads = matmul(x, w, QType.Q5_0, 640)
    finally:
        numba.set_num_threads(previous)
    assert_bit_exact(one_thread, all_threads)


def test_rejects_mismatched_shapes(make_weight, rng):
    w = make_weight("Q4_0", 4, 64)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="block"):
        matmul(x[:, :48], w, QType.Q4_0, 48)
    with pytest.raises(ValueError, match="rows of 96"):
        matmul(x, w, QType.Q4_0, 96)
    with pytest.raises(ValueError, match="columns"):
        matmul(x[:, :32], w, QType.Q4_0, 64)
    with pytest.raises(ValueError, match="out must be"):
        matmul(x, w, QType.Q4_0, 64, out=np.empty((4, 2), np.float32))
    with pytest.raises(IndexError):
        dequantize_rows(w, QType.Q4_0, 64, rows=[4])


@pytest.mark.parametrize("n_tokens", [1, 3, 6])
def test_f32_rows_multiplied_in_place_equal_a_decoded_tile(rng, n_tokens):
    """F32 rows are multiplied where they lie; BF16 rows of the same values are decoded into a
    tile first: the same products, bit for bit (over several chunks and a partial one)."""
    n_rows, n_cols = 133, 512
    bf16 = (rng.standard_normal((n_rows, n_cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    f32 = (bf16.astype(np.uint32) << 16).view(np.float32)
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    in_place = matmul(x, f32.view(np.uint8), QType.F32, n_cols)
    decoded = matmul(x, bf16.view(np.uint8), QType.BF16, n_cols)
    assert_bit_exact(in_place, decoded)
