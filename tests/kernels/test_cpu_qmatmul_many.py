"""qmatmul_many, several one-token products in one parallel region, against one qmatmul per
product: bit for bit, for every integer type (each beside a product of another input type), row
counts that split unevenly into work items and into the fused kernels' 4-row steps, on one
thread and on two; and the activations' min sums against their NumPy formula."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from ggml_weights import random_weight
from gguf.constants import GGMLQuantizationType as QType

from kernels.cpu import INTEGER_TYPES, QuantizedActivations, qmatmul
from kernels.cpu.qmatmul import qmatmul_many

INTEGER_TYPE_NAMES = sorted(t.name for t in INTEGER_TYPES)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(previous)


def one_per_product(x: np.ndarray, ws, types, n_cols: int) -> np.ndarray:
    return np.concatenate([qmatmul(x, w, t, n_cols) for w, t in zip(ws, types)], axis=1)


@pytest.mark.parametrize("type_name", INTEGER_TYPE_NAMES)
def test_products_side_by_side_equal_one_qmatmul_each(rng, threads, type_name):
    n_cols = 512
    other = "Q4_K" if QType[type_name] not in (QType.Q4_K,) else "Q5_0"
    types = [QType[type_name], QType[other], QType[type_name]]
    # odd row counts: shares of unequal length, and rows beyond the last step of 4
    n_rows = [533, 1, 7]
    ws = [random_weight(rng, t.name, n, n_cols) for t, n in zip(types, n_rows)]
    x = rng.standard_normal((1, n_cols)).astype(np.float32)
    xs = [QuantizedActivations.for_type(x, t) for t in types]
    result = qmatmul_many(xs, ws, types, n_cols)
    expected = one_per_product(x, ws, types, n_cols)
    assert result.shape == (1, sum(n_rows))
    assert np.array_equal(result.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("n_rows", [1, 3, 5, 65])
def test_small_products_on_the_calling_thread(rng, threads, n_rows):
    """Below the pool's threshold the same work items run on the calling thread."""
    types = [QType.Q8_0, QType.Q6_K]
    ws = [random_weight(rng, t.name, n_rows, 256) for t in types]
    x = rng.standard_normal((1, 256)).astype(np.float32)
    xs = [QuantizedActivations.for_type(x, t) for t in types]
    result = qmatmul_many(xs, ws, types, 256)
    assert np.array_equal(result.view(np.uint32), one_per_product(x, ws, types, 256).view(np.uint32))


def test_activations_of_another_input_type_are_refused(rng):
    x = rng.standard_normal((1, 256)).astype(np.float32)
    w = random_weight(rng, "Q4_K", 4, 256)
    with pytest.raises(ValueError, match="not one token quantized for Q4_K"):
        qmatmul_many([QuantizedActivations.for_type(x, QType.Q8_0)], [w], [QType.Q4_K], 256)


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_min_sums_are_d_times_block_sums(rng, n_tokens):
    """Q8_K's min sums, d * bsum per 16 values, as the NumPy product of the same float32 values."""
    xa = QuantizedActivations.for_type(rng.standard_normal((n_tokens, 512)).astype(np.float32), QType.Q4_K)
    expected = xa.sums * np.repeat(xa.d, 16, axis=1)
    assert np.array_equal(xa.min_sums.view(np.uint32), expected.view(np.uint32))
    assert not xa.q.flags.writeable and not xa.min_sums.flags.writeable
