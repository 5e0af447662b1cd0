"""A prefill ubatch's expert products in one region (kernels.cpu.moe_gemm) against one product
per expert.

- expert_gemms: bit for bit one `qmatmul` per expert and token for the experts of the fused
  one-token kernel, one `qgemm` per expert for the others (what `qmatmul` itself runs from
  qgemm.PREFILL_MIN_TOKENS tokens), for all 12 integer types, skewed spans (1 .. 37 tokens,
  partial tiles and partial groups of tokens), one and two matrices, 1 and 2 threads;
- expert_product: the same numbers for one expert alone, and within float32 noise of the
  exact product of the dequantized weights and the quantized activations (llama.cpp's formula);
- the plan: every row of every expert's matrix once, for exactly that expert's rows of x, in
  parts of about equal cost.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from ggml_weights import random_weight
from gguf.constants import GGMLQuantizationType as QType

from kernels.cpu import dequantize_rows, qmatmul
from kernels.cpu.formats import read_only
from kernels.cpu.moe_gemm import (
    END,
    EXPERT,
    FIRST,
    FUSED,
    FUSED_MAX_TOKENS,
    MATRIX,
    N_ROWS,
    ROW0,
    EXPERT_GEMM_TYPES,
    balanced_bounds,
    expert_gemms,
    expert_product,
    plan_tiles,
)
from kernels.cpu.qgemm import qgemm
from kernels.cpu.qgemm_ir import ROWS
from kernels.cpu.qmatmul import Q8_K_INPUT_TYPES, QuantizedActivations

TYPE_NAMES = sorted(t.name for t in EXPERT_GEMM_TYPES)
N_EXPERT = 6
COUNTS = [1, 5, 37, 2, 1, 9, 3]            # tokens per span: skewed, around the tile's token groups
EXPERT_ORDER = [4, 0, 5, 2, 1, 3, 0]


def n_cols_of(type_name: str) -> int:
    return 512 if QType[type_name] in Q8_K_INPUT_TYPES else 96


def experts(rng, type_name: str, n_rows: int, n_cols: int) -> np.ndarray:
    return read_only(np.stack([random_weight(rng, type_name, n_rows, n_cols) for _ in range(N_EXPERT)]))


def spans_of(counts, order) -> np.ndarray:
    ends = np.cumsum(counts)
    return np.stack([order, ends - np.asarray(counts), ends], axis=1).astype(np.int64)


def one_product_per_expert(x, spans, w, qtype, n_cols) -> np.ndarray:
    """The reference: qmatmul per token (fused one-token kernel) or qgemm per expert."""
    out = np.empty((len(x), w.shape[1]), dtype=np.float32)
    for e, a, b in spans:
        if b - a <= FUSED_MAX_TOKENS:
            for t in range(a, b):
                out[t:t + 1] = qmatmul(x[t:t + 1], w[e], qtype, n_cols)
        else:
            qgemm(QuantizedActivations.for_type(x[a:b], qtype), w[e], qtype, n_cols, out[a:b])
    return out


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(previous)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_expert_gemms_equal_one_product_per_expert(rng, type_name, threads):
    qtype, n_cols = QType[type_name], n_cols_of(type_name)
    gate = experts(rng, type_name, 2 * ROWS + 5, n_cols)
    up = experts(rng, type_name, ROWS - 3, n_cols)
    spans = spans_of(COUNTS, EXPERT_ORDER)
    x = (rng.standard_normal((spans[-1, 2], n_cols)) * 0.1).astype(np.float32)
    outs = [np.full((len(x), w.shape[1]), np.nan, dtype=np.float32) for w in (gate, up)]
    expert_gemms(x, spans, [gate, up], int(qtype), outs)
    for w, got in zip((gate, up), outs):
        expected = one_product_per_expert(x, spans, w, qtype, n_cols)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_a_subset_of_the_rows_leaves_the_others_alone(rng):
    """Only the spans given are written: the grouped caller owns the rest of out."""
    w = experts(rng, "Q4_K", ROWS, 256)
    spans = spans_of([3, 4, 2], [1, 2, 3])
    x = rng.standard_normal((9, 256)).astype(np.float32)
    out = np.full((9, ROWS), 7.0, dtype=np.float32)
    expert_gemms(x, spans[[0, 2]], [w], int(QType.Q4_K), [out])
    assert (out[3:7] == 7.0).all()
    assert np.array_equal(out[:3], one_product_per_expert(x, spans[:1], w, QType.Q4_K, 256)[:3])


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q8_0", "Q5_0"])   # not Q8_1: its sums are f16
@pytest.mark.parametrize("n_tokens", [1, 2, 5])
def test_expert_product_is_llama_cpps_formula(rng, type_name, n_tokens):
    """Within float32 noise of the float product of the dequantized weights and the activations
    as quantized (an independent reference), and equal to expert_gemms for one span."""
    qtype, n_cols = QType[type_name], n_cols_of(type_name)
    w = experts(rng, type_name, ROWS + 7, n_cols)
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    got = expert_product(x, w[2], int(qtype), n_cols)
    xa = QuantizedActivations.for_type(x, qtype)
    block = 256 if qtype in Q8_K_INPUT_TYPES else 32
    x_rounded = (xa.q.reshape(n_tokens, -1, block) * xa.d[:, :, None]).reshape(n_tokens, n_cols)
    weights = dequantize_rows(w[2], int(qtype), n_cols).astype(np.float64)
    exact = x_rounded.astype(np.float64) @ weights.T
    assert (np.abs(got - exact) <= 2e-6 * (np.abs(x_rounded) @ np.abs(weights.T)) + 1e-30).all()
    out = np.empty_like(got)
    expert_gemms(x, spans_of([n_tokens], [2]), [w], int(qtype), [out])
    assert np.array_equal(out.view(np.uint32), got.view(np.uint32))


def test_types_without_an_integer_gemm_are_refused(rng):
    w = experts(rng, "F16", 4, 64)
    with pytest.raises(ValueError, match="F16 has no integer GEMM"):
        expert_gemms(np.zeros((2, 64), np.float32), spans_of([2], [0]), [w], int(QType.F16),
                     [np.empty((2, 4), np.float32)])


@pytest.mark.parametrize("n_parts", [1, 2, 3, 7])
def test_the_plan_covers_every_row_once_in_balanced_parts(n_parts):
    spans = spans_of([1, 6, 2, 30, 1], [4, 0, 2, 1, 3])
    n_rows = np.array([200, 130], dtype=np.int64)
    units, cost = plan_tiles(spans, n_rows, 1)
    bounds = balanced_bounds(cost, n_parts)
    for m in range(2):
        for e, a, b in spans:
            mine = units[(units[:, MATRIX] == m) & (units[:, EXPERT] == e)]
            assert (mine[:, FIRST] == a).all() and (mine[:, END] == b).all()
            assert (mine[:, FUSED] == (b - a == 1)).all()
            covered = np.zeros(n_rows[m], dtype=np.int64)
            for u in mine:
                covered[u[ROW0]:u[ROW0] + u[N_ROWS]] += 1
                assert u[FUSED] or u[ROW0] % ROWS == 0
            assert (covered == 1).all()
    assert bounds[0] == 0 and bounds[-1] == len(units) and (np.diff(bounds) >= 0).all()
    parts = [cost[bounds[p]:bounds[p + 1]].sum() for p in range(n_parts)]
    assert max(parts) <= cost.sum() / n_parts + cost.max()
