"""The fused decode kernels (kernels.cpu.blockdot) bit for bit against their NumPy twin.

- the unpackers, which give the reference its integer weights, against gguf's dequantization;
- every type's row dot (with the K-quants' mins), in every isa form this CPU runs (the generic IR fallback included),
  bit-identical to `row_dot_reference` on awkward rows: all nibbles and high bits set, all
  zero (zero sub-block scales), random; activations at +-127 and random.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_weights import random_weight
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize
from numba import njit

from kernels.cpu import blockdot, isa, unpack
from kernels.cpu.decode_kquants import k_scale_min
from kernels.cpu.formats import row_bytes
from kernels.cpu.qmatmul import GROUPED_ROWS_MAX_BYTES, qmatmul

TYPE_NAMES = sorted(blockdot.LAYOUTS)
_UNPACKERS = {
    "Q4_0": unpack.unpack_q4_0, "Q4_1": unpack.unpack_q4_1, "Q5_0": unpack.unpack_q5_0,
    "Q5_1": unpack.unpack_q5_1, "IQ4_NL": unpack.unpack_iq4_nl, "Q2_K": unpack.unpack_q2_k,
    "Q3_K": unpack.unpack_q3_k, "Q4_K": unpack.unpack_q4_k, "Q5_K": unpack.unpack_q5_k,
    "Q6_K": unpack.unpack_q6_k, "IQ4_XS": unpack.unpack_iq4_xs,
}


def integer_row(type_name: str, w: np.ndarray, r: int) -> np.ndarray:
    """Row r's integer weights with the sub-block scales multiplied in (int64)."""
    block_bytes, block_elements, _ = blockdot.LAYOUTS[type_name]
    n_cols = w.shape[1] // block_bytes * block_elements
    if type_name == "Q8_0":
        return w[r].reshape(-1, block_bytes)[:, 2:].view(np.int8).reshape(-1).astype(np.int64)
    tile = np.zeros((1, n_cols), np.int16)
    _UNPACKERS[type_name](w, r, n_cols, 32, tile, 0)
    return tile[0].astype(np.int64)


def block_scales(type_name: str, w: np.ndarray, r: int, field: str = "d") -> np.ndarray:
    """float32 per block: the f16 `d` (or the min factor `dmin` / `m`) of row r."""
    block_bytes, _, d_offset = blockdot.LAYOUTS[type_name]
    offset = d_offset if field == "d" else blockdot.MIN_OFFSETS.get(type_name, 2)
    blocks = w[r].reshape(-1, block_bytes)
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16)[:, 0].astype(np.float32)


def min_values(type_name: str, w: np.ndarray, r: int) -> np.ndarray:
    """The integer min of each element's sub-block (0 for types without mins)."""
    block_bytes, block_elements, _ = blockdot.LAYOUTS[type_name]
    n_blocks = w.shape[1] // block_bytes
    if type_name in ("Q4_K", "Q5_K"):
        mins = [k_scale_min(w, r, b * block_bytes + 4, j)[1] for b in range(n_blocks) for j in range(8)]
        return np.repeat(np.array(mins, np.float64), 32)
    if type_name == "Q2_K":
        return np.repeat(w[r].reshape(n_blocks, block_bytes)[:, :16].astype(np.float64) // 16, 16).reshape(-1)
    if type_name in ("Q4_1", "Q5_1"):
        return -np.ones(n_blocks * block_elements)      # value = d * q + m
    return np.zeros(n_blocks * block_elements)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_integer_rows_are_ggml_values(rng, type_name):
    """d * integers - dmin * mins equals gguf's dequantized row: the reference's inputs are right."""
    _, block_elements, _ = blockdot.LAYOUTS[type_name]
    w = random_weight(rng, type_name, 3, 2 * max(block_elements, 256))
    expected = dequantize(w, QType[type_name]).reshape(3, -1).astype(np.float64)
    for r in range(3):
        d = np.repeat(block_scales(type_name, w, r).astype(np.float64), block_elements)
        values = d * integer_row(type_name, w, r)
        if type_name not in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "Q3_K", "Q6_K", "IQ4_XS"):
            dmin = np.repeat(block_scales(type_name, w, r, "dmin").astype(np.float64), block_elements)
            values -= dmin * min_values(type_name, w, r)
        np.testing.assert_allclose(values, expected[r], rtol=1e-6, atol=1e-6 * np.abs(expected[r]).max())


def awkward_weights(rng, type_name: str, n_cols: int) -> np.ndarray:
    """Rows: every bit set but those of the f16 `d` and `dmin` / `m`, every bit clear but
    theirs, then random blocks."""
    block_bytes, _, d_offset = blockdot.LAYOUTS[type_name]
    w = random_weight(rng, type_name, 4, n_cols)
    blocks = w.reshape(4, -1, block_bytes)
    keep = np.zeros(block_bytes, bool)
    keep[d_offset:d_offset + 2] = True
    min_offset = blockdot.MIN_OFFSETS.get(type_name, 2 if type_name in blockdot.SUM_MIN_TYPES else None)
    if min_offset is not None:
        keep[min_offset:min_offset + 2] = True
    blocks[0][:, ~keep] = 0xFF
    blocks[1][:, ~keep] = 0
    return w


def awkward_activations(rng, n_cols: int) -> np.ndarray:
    x = rng.integers(-127, 128, (4, n_cols)).astype(np.int8)
    x[0], x[1] = 127, -127
    x[2, ::2], x[2, 1::2] = -127, 127
    return x


_KERNELS: dict = {}


def row_dot(type_name: str, form: str):
    """An njit caller of the type's kernel in `form` (compiled once per test session)."""
    key = (type_name, form)
    if key not in _KERNELS:
        kernel = blockdot.row_dot_intrinsic(type_name, form)
        _KERNELS[key] = njit(lambda w, r, x, dx, sx, n_blocks: kernel(w, r, x, dx, sx, n_blocks))
    return _KERNELS[key]


def row_dots(type_name: str, form: str):
    """An njit caller of the type's kernel in `form` on the tuple of rows (3, 0, 2, 1)."""
    key = (type_name, form, "rows")
    if key not in _KERNELS:
        kernel = blockdot.row_dot_intrinsic(type_name, form)
        _KERNELS[key] = njit(lambda w, x, dx, sx, n_blocks: kernel(w, (3, 0, 2, 1), x, dx, sx, n_blocks))
    return _KERNELS[key]


@pytest.mark.parametrize("form", isa.HOST_FORMS)
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_row_dot_is_bit_exact(rng, type_name, form):
    """One row per call, and four rows at once (in an order of their own), each bit-identical."""
    _, block_elements, _ = blockdot.LAYOUTS[type_name]
    n_blocks = 3
    n_cols = n_blocks * block_elements
    w = awkward_weights(rng, type_name, n_cols)
    x = awkward_activations(rng, n_cols)
    dx = rng.standard_normal(n_blocks).astype(np.float32)
    sx = rng.standard_normal(n_blocks).astype(np.float32)
    kernel = row_dot(type_name, form)
    together = [dict(zip((3, 0, 2, 1), row_dots(type_name, form)(w, x[t], dx, sx, n_blocks))) for t in range(4)]
    for r in range(w.shape[0]):
        mins = {}
        if type_name in blockdot.MIN_OFFSETS:
            mins = {"min_values": min_values(type_name, w, r), "dmin": block_scales(type_name, w, r, "dmin")}
        if type_name in blockdot.SUM_MIN_TYPES:
            mins = {"m": block_scales(type_name, w, r, "dmin"), "sx": sx}
        for t in range(x.shape[0]):
            expected = blockdot.row_dot_reference(integer_row(type_name, w, r), block_scales(type_name, w, r),
                                                  x[t], dx, **mins)
            result = np.float32(kernel(w, r, x[t], dx, sx, n_blocks))
            assert result.view(np.uint32) == expected.view(np.uint32), f"row {r}, activations {t}"
            result = np.float32(together[t][r])
            assert result.view(np.uint32) == expected.view(np.uint32), f"row {r} of four, activations {t}"


def test_no_blocks_is_zero(rng):
    w = random_weight(rng, "Q4_K", 2, 256)
    ones = np.ones(1, np.float32)
    assert row_dot("Q4_K", isa.ISA)(w, 1, np.zeros(256, np.int8), ones, ones, 0) == 0


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="no fused block dot for Q8_1"):
        blockdot.row_dot_intrinsic("Q8_1")


@pytest.mark.parametrize("type_name", ["Q8_0", "Q6_K"])
def test_streamed_and_grouped_rows_agree(rng, type_name):
    """A weight over GROUPED_ROWS_MAX_BYTES is decoded one row per call, a small one four rows per
    call (and the rows left over one by one): the same rows give the same bits either way."""
    qtype = QType[type_name]
    n_cols = 512
    n_rows = GROUPED_ROWS_MAX_BYTES // row_bytes(qtype, n_cols) + 8
    w = random_weight(rng, type_name, n_rows, n_cols)
    x = rng.standard_normal((1, n_cols)).astype(np.float32)
    streamed = qmatmul(x, w, qtype, n_cols)
    grouped = qmatmul(x, w[:203], qtype, n_cols)
    assert np.array_equal(streamed[:, :203].view(np.uint32), grouped.view(np.uint32))
