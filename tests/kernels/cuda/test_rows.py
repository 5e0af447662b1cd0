"""Embedding lookup, dequantization and the prefill matmul against gguf's dequantizer."""
from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize

from kernels.cuda import ops


def _n_cols(fmt) -> int:
    return 512 if fmt.block_values == 256 else 96 if fmt.block_values == 32 else 75


@pytest.mark.parametrize("type_name", list(ops.FORMATS))
def test_dequantize_rows_is_bit_exact(rt, make_weight, type_name):
    n_cols = _n_cols(ops.FORMATS[type_name])
    w = make_weight(type_name, 5, n_cols)
    got = rt.download(ops.dequantize_rows(rt, rt.upload(w), type_name, n_cols))
    np.testing.assert_array_equal(got, dequantize(w, QType[type_name]).astype(np.float32))


@pytest.mark.parametrize("type_name", ["F16", "Q4_K", "Q6_K", "Q8_0"])
def test_get_rows_picks_rows_in_order_with_repeats(rt, make_weight, type_name):
    n_cols = _n_cols(ops.FORMATS[type_name])
    w = make_weight(type_name, 9, n_cols)
    ids = np.array([8, 0, 3, 3], np.int64)
    got = rt.download(ops.get_rows(rt, rt.upload(w), rt.upload(ids), type_name, n_cols))
    np.testing.assert_array_equal(got, dequantize(w, QType[type_name]).astype(np.float32)[ids])


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_K", "BF16"])
def test_prefill_matmul_over_several_tiles(rt, rng, make_weight, type_name):
    n_cols = _n_cols(ops.FORMATS[type_name])
    w = make_weight(type_name, 11, n_cols)
    x = rng.standard_normal((20, n_cols)).astype(np.float32)
    got = rt.download(ops.matmul_prefill(rt, rt.upload(x), rt.upload(w), type_name, n_cols, tile_rows=4))
    expected = x.astype(np.float64) @ dequantize(w, QType[type_name]).astype(np.float64).T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
