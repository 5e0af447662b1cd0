"""A decode step's routed experts in one call (kernels.cpu.moe.decode_experts) against one
product per expert: bit for bit qmatmul of each expert's gate and up on its row, the activation
of `fused_ops.glu_rows`, and qmatmul of the down, over the integer weight types (Q8_K and
Q8_0 / Q8_1 inputs), gate/up and down of different input types, and several thread counts;
and the cases it leaves to the grouped products (float paths, unknown activations, gate and
up of two types, experts of several rows)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from ggml_weights import random_weight
from gguf.constants import GGMLQuantizationType as QType

from kernels.cpu import INTEGER_TYPES, qmatmul
from kernels.cpu.formats import read_only
from kernels.cpu.fused_ops import GELU, SILU, glu_rows
from kernels.cpu.moe import grouped_experts

N_EMBD, N_FF, N_EXPERT = 512, 768, 6


def experts(rng, type_name, n_rows, n_cols):
    data = np.stack([random_weight(rng, type_name, n_rows, n_cols) for _ in range(N_EXPERT)])
    return read_only(data), int(QType[type_name])


def one_product_per_expert(x, ids, gate, up, down, kind):
    outs = []
    for r, e in enumerate(ids):
        g = qmatmul(x[r:r + 1], gate[0][e], gate[1], N_EMBD)
        u = qmatmul(x[r:r + 1], up[0][e], up[1], N_EMBD)
        hidden = np.empty_like(g)
        glu_rows(g, u, kind, hidden)
        outs.append(qmatmul(hidden, down[0][e], down[1], N_FF))
    return np.concatenate(outs)


def integer_everywhere(ggml_type, n_tokens):
    return QType(ggml_type) in INTEGER_TYPES


def not_this_activation(gate, up):
    raise AssertionError("the decode step of known kinds takes glu_rows's activation")


@pytest.mark.parametrize("types", [("Q4_K", "Q6_K"), ("Q8_0", "Q4_0"), ("Q4_1", "Q5_K"), ("IQ4_XS", "Q5_1")],
                         ids="-".join)
@pytest.mark.parametrize("kind", [SILU, GELU])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_decode_step_equals_one_product_per_expert(rng, types, kind, n_threads):
    gate, up = experts(rng, types[0], N_FF, N_EMBD), experts(rng, types[0], N_FF, N_EMBD)
    down = experts(rng, types[1], N_EMBD, N_FF)
    ids = [4, 0, 5, 2]                      # one row each, a decode step's experts in any order
    spans = [(e, r, r + 1) for r, e in enumerate(ids)]
    x = (rng.standard_normal((len(ids), N_EMBD)) * 0.05).astype(np.float32)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
    try:
        got = grouped_experts(x, spans, gate, up, down, not_this_activation, None, integer_everywhere, glu_kind=kind)
    finally:
        numba.set_num_threads(previous)
    expected = one_product_per_expert(x, ids, gate, up, down, kind)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def glu_of(kind):
    def activation(gate, up):
        out = np.empty_like(gate)
        glu_rows(gate, up, kind, out)
        return out
    return activation


@pytest.mark.parametrize("case", ["float path", "two gate types", "several rows"])
def test_other_steps_take_the_grouped_products_with_glu_rows(rng, case):
    gate = experts(rng, "Q4_K", N_FF, N_EMBD)
    up = experts(rng, "Q8_0" if case == "two gate types" else "Q4_K", N_FF, N_EMBD)
    down = experts(rng, "Q6_K", N_EMBD, N_FF)
    spans = [(1, 0, 2), (3, 2, 3)] if case == "several rows" else [(1, 0, 1), (3, 1, 2)]
    x = (rng.standard_normal((spans[-1][2], N_EMBD)) * 0.05).astype(np.float32)
    integer_for = (lambda t, n: False) if case == "float path" else integer_everywhere
    got = grouped_experts(x, spans, gate, up, down, not_this_activation, lambda rows, t: rows, integer_for,
                          glu_kind=GELU)
    expected = grouped_experts(x, spans, gate, up, down, glu_of(GELU), lambda rows, t: rows, integer_for)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
