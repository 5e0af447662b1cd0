"""The grouped routed experts (kernels.cpu.moe) against one product per expert.

- the plan: every row of every expert's matrix is computed once, for exactly that expert's
  rows of x, in units of the per-expert products' chunk sizes, and the parts balance their cost;
- grouped_experts: bit for bit the composition of one product per expert and matrix
  (qmatmul where `integer_for` says so, `moe_gemm.expert_product` for several tokens, else
  matmul on the `rounded` input) with the activation
  applied in between, over the weight types and shapes of decode (one row per expert) and
  prefill (unequal experts), with gate and up of one type and of two, and with the integer
  product for one-token experts only (llama.cpp's choice here) or for every expert.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_weights import random_weight
from gguf.constants import GGMLQuantizationType as QType

from kernels.cpu import INTEGER_TYPES, integer_path_is_faster, matmul, qmatmul
from kernels.cpu.formats import read_only
from kernels.cpu.matmul import rows_per_chunk as float_rows_per_chunk
from kernels.cpu.moe import (
    END,
    EXPERT,
    FIRST,
    INTEGER,
    MATRIX,
    N_ROWS,
    ROW0,
    UNPACK_COST_TOKENS,
    grouped_experts,
    plan_units,
)
from kernels.cpu.moe_gemm import expert_product

N_EMBD, N_FF, N_EXPERT = 512, 768, 5


def experts(rng, type_name: str, n_rows: int, n_cols: int) -> tuple[np.ndarray, int]:
    data = np.stack([random_weight(rng, type_name, n_rows, n_cols) for _ in range(N_EXPERT)])
    return read_only(data), int(QType[type_name])


def silu_gate(gate, up):
    with np.errstate(over="ignore"):
        return gate / (1.0 + np.exp(-gate)) * up


def f16_rounded(x, ggml_type):
    """A per-row rounding standing in for llama.cpp's, so that the float units' input is checked."""
    return x.astype(np.float16).astype(np.float32)


def llama_cpp_paths(ggml_type, n_tokens):
    return integer_path_is_faster(ggml_type, n_tokens)


def one_product_per_expert(x, spans, gate, up, down, rounded, integer_for):
    def product(rows, w, ggml_type):
        if integer_for(ggml_type, len(rows)) and len(rows) > 1:    # a prefill ubatch's integer GEMMs
            return expert_product(rows, w, ggml_type, rows.shape[1])
        if integer_for(ggml_type, len(rows)):
            return qmatmul(rows, w, ggml_type, rows.shape[1])
        return matmul(rounded(rows, ggml_type), w, ggml_type, rows.shape[1])

    outs = []
    for e, a, b in spans:
        rows = x[a:b]
        hidden = silu_gate(product(rows, gate[0][e], gate[1]), product(rows, up[0][e], up[1]))
        outs.append(product(hidden, down[0][e], down[1]))
    return np.concatenate(outs)


def spans_of(counts, experts_in_order):
    spans, first = [], 0
    for e, n in zip(experts_in_order, counts):
        spans.append((e, first, first + n))
        first += n
    return spans


SHAPES = {"decode": [1, 1, 1, 1], "prefill": [3, 1, 9, 2, 4]}
TYPES = [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q8_0", "Q4_0"), ("IQ4_XS", "IQ4_XS", "Q5_K"),
         ("Q4_1", "Q5_1", "IQ4_NL"), ("Q2_K", "Q3_K", "Q5_0"), ("F16", "BF16", "F32")]


@pytest.mark.parametrize("types", TYPES, ids="-".join)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("paths", ["llama.cpp", "integer", "f32"])
def test_grouped_experts_equal_one_product_per_expert(rng, types, shape, paths):
    gate = experts(rng, types[0], N_FF, N_EMBD)
    up = experts(rng, types[1], N_FF, N_EMBD)
    down = experts(rng, types[2], N_EMBD, N_FF)
    spans = spans_of(SHAPES[shape], [3, 0, 4, 1, 2])
    x = (rng.standard_normal((spans[-1][2], N_EMBD)) * 0.05).astype(np.float32)
    if paths == "llama.cpp":
        rounded, integer_for = f16_rounded, llama_cpp_paths
    elif paths == "integer":        # experts of several tokens too: qmatmul picks their kernel
        rounded, integer_for = f16_rounded, (lambda t, n: QType(t) in INTEGER_TYPES)
    else:
        rounded, integer_for = (lambda rows, t: rows), (lambda t, n: False)
    got = grouped_experts(x, spans, gate, up, down, silu_gate, rounded, integer_for)
    expected = one_product_per_expert(x, spans, gate, up, down, rounded, integer_for)
    assert got.shape == (len(x), N_EMBD)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("n_parts", [1, 2, 3, 7])
def test_the_plan_covers_every_row_once_in_balanced_parts(n_parts):
    counts = np.array([1, 6, 2, 30, 1], dtype=np.int64)
    bounds_of_spans = np.cumsum(np.concatenate([[0], counts]))
    spans = np.stack([bounds_of_spans[:-1], bounds_of_spans[1:]], axis=1)
    experts_ = np.array([[4, 0, 2, 1, 3], [4, 0, 2, 1, 3]], dtype=np.int64)
    integer = np.array([[1, 0, 0, 0, 1], [1, 0, 0, 0, 1]], dtype=np.int64)
    n_rows = np.array([200, 130], dtype=np.int64)
    units, bounds = plan_units(spans, experts_, integer, n_rows, 64, 16, n_parts)
    for m in range(2):
        for s in range(5):
            mine = units[(units[:, MATRIX] == m) & (units[:, EXPERT] == experts_[m, s])]
            assert (mine[:, FIRST] == spans[s, 0]).all() and (mine[:, END] == spans[s, 1]).all()
            assert (mine[:, INTEGER] == integer[m, s]).all()
            covered = np.zeros(n_rows[m], dtype=np.int64)
            for u in mine:
                covered[u[ROW0]:u[ROW0] + u[N_ROWS]] += 1
                assert u[ROW0] % (64 if integer[m, s] else 16) == 0
            assert (covered == 1).all()
    assert bounds[0] == 0 and bounds[-1] == len(units) and (np.diff(bounds) >= 0).all()
    cost = units[:, N_ROWS] * (units[:, END] - units[:, FIRST] + UNPACK_COST_TOKENS)
    parts = [cost[bounds[p]:bounds[p + 1]].sum() for p in range(n_parts)]
    assert max(parts) <= cost.sum() / n_parts + cost.max()


def test_float_units_use_the_float_products_chunks():
    """Bit-equality with kernels.cpu.matmul rests on decoding the same tiles: its chunk size."""
    spans = np.array([[0, 5]], dtype=np.int64)
    units, _ = plan_units(spans, np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64),
                          np.array([100], np.int64), 64, float_rows_per_chunk(768), 2)
    assert (units[:-1, N_ROWS] == float_rows_per_chunk(768)).all()


def test_weight_bytes_of_the_wrong_width_are_refused(rng):
    gate = experts(rng, "Q4_K", N_FF, N_EMBD)
    down = experts(rng, "Q4_K", N_EMBD, 256)        # rows of 256, but the hidden width is N_FF
    x = rng.standard_normal((2, N_EMBD)).astype(np.float32)
    with pytest.raises(ValueError, match="do not hold rows of 768 Q4_K elements"):
        grouped_experts(x, [(0, 0, 2)], gate, gate, down, silu_gate, f16_rounded, llama_cpp_paths)
