"""kernels.cpu.attention over every row form it reads (F32, F16, BF16 rows in place, a block
type through decode_row), bit for bit against NumPy references that round in the kernel's
order: its dot product's fixed summation order, its fused multiply-adds (emulated in double:
the product of two float32 is exact there) and the same float32 exponential.

Unlike tests/kernels/test_cpu_attention_rounding.py, the values are not chosen to make the sums
exact, so the order of every sum is part of what is checked. And the cache layer's store of one
token (a decode step's path) writes what its store of a ubatch writes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize
from numba import njit

from engine.backends.kv_store import HostKVLayer
from engine.backends.protocol import KVLayout
from kernels.cpu import quantize_rows
from kernels.cpu.attention import EXACT, FLASH, FULL, PLAIN, SLIDING, _dot, attend_cache

RNG = np.random.default_rng(5)
N_CELLS, N_HEAD, N_HEAD_KV, D_K, D_V = 37, 4, 2, 80, 48       # 80 = 64 + 2 * 8: two of the dot loops
KQ_SCALE = np.float32(0.1)


@njit(cache=True)
def exp32(x):
    return np.exp(np.float32(x))


@njit(cache=True)
def dot_in_order(a, b):
    """_dot's documented order, written out."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    n = a.shape[0]
    n32, n8 = n // 32 * 32, n // 8 * 8
    fma = lambda x, y, z: np.float32(x * y + np.float64(z))      # noqa: E731
    total = np.float32(0)
    if n32:
        accs = np.zeros((4, 8), dtype=np.float32)
        for i in range(0, n32, 32):
            for u in range(4):
                for lane in range(8):
                    accs[u, lane] = fma(a[i + 8 * u + lane], b[i + 8 * u + lane], accs[u, lane])
        total = lane_sum((accs[0] + accs[1]) + (accs[2] + accs[3]))
    if n8 > n32:
        acc = np.zeros(8, dtype=np.float32)
        acc[0] = total
        for i in range(n32, n8, 8):
            for lane in range(8):
                acc[lane] = fma(a[i + lane], b[i + lane], acc[lane])
        total = lane_sum(acc)
    for i in range(n8, n):
        total = fma(a[i], b[i], total)
    return total


@njit(cache=True)
def lane_sum(v):
    halves = v[:4] + v[4:]
    return (halves[0] + halves[2]) + (halves[1] + halves[3])


def fma32(a, b, c):
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def bf16(x):
    """x rounded to the nearest bfloat16 (ties to even), as ggml rounds it."""
    bits = np.uint64(np.float32(x).view(np.uint32))
    return np.uint32(((bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16))
                     << np.uint64(16)).view(np.float32)


@njit(cache=True)
def kernel_dot(a, a0, b, b0, n):
    return _dot(a, a0, b, b0, n)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 13, 31, 32, 40, 63, 64, 72, 100, 256, 259])
def test_dot_sums_in_its_documented_order(n):
    a = RNG.standard_normal(n + 5).astype(np.float32) * 10
    b = RNG.standard_normal(n + 9).astype(np.float32)
    found, expected = np.float32(kernel_dot(a, 5, b, 9, n)), np.float32(dot_in_order(a[5:5 + n], b[9:9 + n]))
    assert found.view(np.uint32) == expected.view(np.uint32)


def test_a_strided_query_is_refused_by_name():
    q, keys, _, values, _, cell_pos, q_pos = cache(2, T.F16, T.F16)
    out = np.empty((2, N_HEAD * D_V), dtype=np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        attend_cache(q[:, :, ::-1], keys, int(T.F16), values, int(T.F16), N_HEAD_KV, cell_pos, q_pos, FULL, 0,
                     KQ_SCALE, EXACT, out)


def stored(values: np.ndarray, ggml_type: T) -> tuple[np.ndarray, np.ndarray]:
    """(the uint8 rows the kernel reads, the float32 values they hold)."""
    if ggml_type == T.F32:
        return values.view(np.uint8), values
    if ggml_type == T.F16:
        halves = values.astype(np.float16)
        return halves.view(np.uint8), halves.astype(np.float32)
    if ggml_type == T.BF16:
        bits = (values.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        return bits.view(np.uint8), (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    rows = quantize_rows(values, int(ggml_type))
    return rows, dequantize(rows, ggml_type).reshape(values.shape)


def online_reference(q, keys, values, cell_pos, q_pos, window, f16_sum):
    """The online softmax with the kernel's roundings: EXACT's float32 value sum, or FLASH's f16
    one over an F16 V (rounded after each rescale and each fused multiply-add)."""
    group = N_HEAD // N_HEAD_KV
    out = np.zeros((len(q), N_HEAD, D_V), dtype=np.float32)
    for t in range(len(q)):
        seen = (cell_pos >= 0) & (cell_pos <= q_pos[t]) & ((q_pos[t] - cell_pos < window) if window else True)
        for h in range(N_HEAD):
            g = h // group
            m, s, acc = np.float32(-np.inf), np.float32(0), np.zeros(D_V, dtype=np.float32)
            for c in np.flatnonzero(seen):
                score = np.float32(dot_in_order(q[t, h], keys[c, g * D_K:(g + 1) * D_K])) * KQ_SCALE
                v = values[c, g * D_V:(g + 1) * D_V]
                if score > m:
                    shrink = exp32(m - score)
                    m, s = score, s * shrink + np.float32(1)
                    acc = f16(v + f16(acc * shrink)) if f16_sum else fma32(acc, shrink, v)
                else:
                    p = exp32(score - m)
                    s = s + p
                    acc = f16(fma32(v, p, acc)) if f16_sum else fma32(p, v, acc)
            out[t, h] = acc * (np.float32(1) / s)
    return out.reshape(len(q), -1)


def plain_reference(q, keys, values, cell_pos, q_pos, window, round_probs):
    """Scores, a softmax normalised by the double sum of its exponentials, probabilities
    rounded by round_probs, the value sum by fused multiply-adds in cell order."""
    group = N_HEAD // N_HEAD_KV
    out = np.zeros((len(q), N_HEAD, D_V), dtype=np.float32)
    for t in range(len(q)):
        seen = (cell_pos >= 0) & (cell_pos <= q_pos[t]) & ((q_pos[t] - cell_pos < window) if window else True)
        cells = np.flatnonzero(seen)
        for h in range(N_HEAD):
            g = h // group
            scores = np.float32([dot_in_order(q[t, h], keys[c, g * D_K:(g + 1) * D_K]) for c in cells]) * KQ_SCALE
            e = [exp32(x - scores.max()) for x in scores]
            inverse = np.float32(1.0 / sum(float(x) for x in e))
            acc = np.zeros(D_V, dtype=np.float32)
            for c, x in zip(cells, e):
                acc = fma32(round_probs(x * inverse), values[c, g * D_V:(g + 1) * D_V], acc)
            out[t, h] = acc
    return out.reshape(len(q), -1)


def cache(n_tokens, k_type, v_type):
    keys, k_values = stored(RNG.standard_normal((N_CELLS, N_HEAD_KV * D_K)).astype(np.float32), k_type)
    values, v_values = stored(RNG.standard_normal((N_CELLS, N_HEAD_KV * D_V)).astype(np.float32) * 3, v_type)
    cell_pos = RNG.permutation(N_CELLS).astype(np.int64)
    cell_pos[[4, 11]] = -1
    q = RNG.standard_normal((n_tokens, N_HEAD, D_K)).astype(np.float32)
    q_pos = np.arange(N_CELLS - n_tokens, N_CELLS, dtype=np.int64)
    return q, keys, k_values, values, v_values, cell_pos, q_pos


ROW_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0]


@pytest.mark.parametrize("n_tokens", [1, 6])             # 6: the parallel form
@pytest.mark.parametrize("window", [0, 9])
@pytest.mark.parametrize("k_type", ROW_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("v_type", ROW_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rounding", [EXACT, FLASH, PLAIN], ids=["exact", "flash", "plain"])
def test_every_row_form_equals_the_reference(n_tokens, window, k_type, v_type, rounding):
    q, keys, k_values, values, v_values, cell_pos, q_pos = cache(n_tokens, k_type, v_type)
    out = np.empty((n_tokens, N_HEAD * D_V), dtype=np.float32)
    attend_cache(q, keys, int(k_type), values, int(v_type), N_HEAD_KV, cell_pos, q_pos,
                 SLIDING if window else FULL, window, KQ_SCALE, rounding, out)
    if rounding == PLAIN:
        round_probs = {T.F16: f16, T.BF16: bf16}.get(v_type, lambda p: p)
        expected = plain_reference(q, k_values, v_values, cell_pos, q_pos, window, round_probs)
    else:
        expected = online_reference(q, k_values, v_values, cell_pos, q_pos, window,
                                    rounding == FLASH and v_type == T.F16)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("type_k, type_v", [("f16", "f16"), ("f32", "q8_0"), ("q4_0", "bf16")])
def test_a_decode_step_stores_what_a_ubatch_stores(type_k, type_v):
    layout = KVLayout(N_CELLS, N_HEAD_KV * 64, N_HEAD_KV * 32, type_k, type_v, "llama.cpp", True)
    by_token, by_ubatch = HostKVLayer(layout), HostKVLayer(layout)
    cells, positions = RNG.permutation(N_CELLS)[:9], np.arange(9, dtype=np.int64) + 100
    k = RNG.standard_normal((9, N_HEAD_KV, 64)).astype(np.float32)
    v = RNG.standard_normal((9, N_HEAD_KV, 32)).astype(np.float32)
    for i in range(9):
        by_token.store(cells[i:i + 1], positions[i:i + 1], k[i:i + 1], v[i:i + 1])
    by_ubatch.store(cells, positions, k, v)
    for stored_by_token, stored_by_ubatch in [(by_token.k_bytes, by_ubatch.k_bytes), (by_token.v_bytes, by_ubatch.v_bytes),
                                              (by_token.cell_pos, by_ubatch.cell_pos)]:
        np.testing.assert_array_equal(stored_by_token, stored_by_ubatch)
    assert (by_token.cell_pos[cells] == positions).all()
    keys, values, _ = by_token.view(N_CELLS)
    expected_keys = (k.reshape(9, -1).astype(np.float16).astype(np.float32) if type_k == "f16" else
                     k.reshape(9, -1) if type_k == "f32" else dequantize(quantize_rows(k.reshape(9, -1), int(T.Q4_0)), T.Q4_0))
    np.testing.assert_array_equal(keys[cells], expected_keys)
