"""Cache attention rounded as llama.cpp's CPU backend rounds it (kernels.cpu.attention FLASH and
PLAIN, and the rule engine.backends.kv_store.attention_rounding), bit for bit against NumPy
references that round in the same order.

Queries and keys are multiples of 1/8 and the scale a power of two, so every score is exact
whatever the summation order; values are multiples of 1/8 as well, so a probability (an f16) times
a value is exact in f32. The references take the kernel's float32 exponential (`exp32`, the same
libm call) so that the comparison is about the rounding of the sums, not about two exp
implementations."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from numba import njit

from engine.backends.kv_store import FA_TILE_QUERIES, HostKVLayer, attention_rounding
from engine.backends.protocol import AttentionStep, KVLayout
from engine.arch.base import AttentionKind
from kernels.cpu.attention import EXACT, FLASH, FULL, PLAIN, SLIDING, attend_cache, f16_round

RNG = np.random.default_rng(11)
N_CELLS, N_HEAD, N_HEAD_KV, D_K, D_V = 40, 4, 2, 64, 32
KQ_SCALE = 0.125


@njit(cache=True)
def exp32(x):
    return np.exp(np.float32(x))


def eighths(shape, limit: int = 16) -> np.ndarray:
    return (RNG.integers(-limit, limit + 1, size=shape) / 8).astype(np.float32)


def f16(x) -> np.float32:
    return np.float32(np.float16(x))


def visible_cells(cell_pos, q_pos, window):
    seen = (cell_pos >= 0) & (cell_pos <= q_pos)
    return seen & (q_pos - cell_pos < window) if window else seen


def flash_reference(q, keys, values, cell_pos, q_pos, window):
    """ggml's one-chunk flash attention over an F16 V: the value sum in f16, rounded per element
    after each rescale and each fused multiply-add."""
    group = N_HEAD // N_HEAD_KV
    out = np.zeros((len(q), N_HEAD, D_V), dtype=np.float32)
    for t in range(len(q)):
        for h in range(N_HEAD):
            g = h // group
            m, s = np.float32(-np.inf), np.float32(0)
            acc = np.zeros(D_V, dtype=np.float16)
            for c in np.flatnonzero(visible_cells(cell_pos, q_pos[t], window)):
                score = np.float32(keys[c, g * D_K:(g + 1) * D_K] @ q[t, h]) * np.float32(KQ_SCALE)
                v = values[c, g * D_V:(g + 1) * D_V].astype(np.float64)
                if score > m:
                    shrink = exp32(m - score)
                    m = score
                    acc = (acc.astype(np.float32) * shrink).astype(np.float16)
                    acc = (v + acc.astype(np.float64)).astype(np.float32).astype(np.float16)
                    s = s * shrink + np.float32(1)
                else:
                    p = exp32(score - m)
                    acc = (v * np.float64(p) + acc.astype(np.float64)).astype(np.float32).astype(np.float16)
                    s = s + p
            out[t, h] = acc.astype(np.float32) * (np.float32(1) / s)
    return out.reshape(len(q), -1)


def plain_reference(q, keys, values, cell_pos, q_pos, window):
    """ggml's mul_mat, soft_max (exponentials summed in double, scaled by the f32 inverse) and
    mul_mat with the probabilities in f16."""
    group = N_HEAD // N_HEAD_KV
    out = np.zeros((len(q), N_HEAD, D_V), dtype=np.float32)
    for t in range(len(q)):
        cells = np.flatnonzero(visible_cells(cell_pos, q_pos[t], window))
        for h in range(N_HEAD):
            g = h // group
            scores = (keys[cells, g * D_K:(g + 1) * D_K] @ q[t, h]).astype(np.float32) * np.float32(KQ_SCALE)
            e = [exp32(score - scores.max()) for score in scores]
            total = 0.0
            for x in e:
                total += float(x)
            inverse = np.float32(1.0 / total)
            acc = np.zeros(D_V, dtype=np.float32)
            for c, x in zip(cells, e):
                acc = acc + f16(x * inverse) * values[c, g * D_V:(g + 1) * D_V]
            out[t, h] = acc
    return out.reshape(len(q), -1)


def cache(n_tokens: int, window: int):
    keys, values = eighths((N_CELLS, N_HEAD_KV * D_K)), eighths((N_CELLS, N_HEAD_KV * D_V), 24)
    cell_pos = RNG.permutation(N_CELLS).astype(np.int64)
    cell_pos[[5, 9]] = -1
    q_pos = np.arange(N_CELLS - n_tokens, N_CELLS, dtype=np.int64)
    return eighths((n_tokens, N_HEAD, D_K)), keys, values, cell_pos, q_pos


def attend(q, keys, values, cell_pos, q_pos, window, rounding):
    out = np.empty((len(q), N_HEAD * D_V), dtype=np.float32)
    attend_cache(q, keys.astype(np.float16).view(np.uint8), int(T.F16), values.astype(np.float16).view(np.uint8),
                 int(T.F16), N_HEAD_KV, cell_pos, q_pos, SLIDING if window else FULL, window, KQ_SCALE, rounding, out)
    return out


@pytest.mark.parametrize("n_tokens", [1, 3, 7])         # 7: the parallel form
@pytest.mark.parametrize("window", [0, 12])
@pytest.mark.parametrize("rounding, reference", [(FLASH, flash_reference), (PLAIN, plain_reference)],
                         ids=["flash sums values in f16", "plain rounds normalised probabilities to f16"])
def test_rounding_equals_its_reference(n_tokens, window, rounding, reference):
    q, keys, values, cell_pos, q_pos = cache(n_tokens, window)
    found = attend(q, keys, values, cell_pos, q_pos, window, rounding)
    np.testing.assert_array_equal(found, reference(q, keys, values, cell_pos, q_pos, window))
    exact = attend(q, keys, values, cell_pos, q_pos, window, EXACT)
    assert not np.array_equal(found, exact) and np.abs(found - exact).max() < 2e-2 * np.abs(exact).max()


def layout(type_k="f16", type_v="f16", activations="llama.cpp", flash_attn=True) -> KVLayout:
    return KVLayout(N_CELLS, N_HEAD_KV * D_K, N_HEAD_KV * D_V, type_k, type_v, activations, flash_attn)


@pytest.mark.parametrize("kv,flash_attn,n_tokens,expected", [
    (("f16", "f16"), True, 1, FLASH), (("f16", "f16"), True, FA_TILE_QUERIES - 1, FLASH),
    (("f16", "f16"), True, FA_TILE_QUERIES, EXACT),          # ggml's f32 tiled kernel
    (("f32", "f32"), True, 1, EXACT), (("q8_0", "f16"), True, 512, FLASH), (("q8_0", "q8_0"), True, 1, EXACT),
    (("bf16", "bf16"), True, 512, FLASH), (("f16", "f16"), False, 512, PLAIN), (("f32", "f32"), False, 512, EXACT),
    (("q8_0", "f16"), False, 1, PLAIN)])
def test_rounding_follows_llama_cpp_kernel_choice(kv, flash_attn, n_tokens, expected):
    assert attention_rounding(layout(*kv, flash_attn=flash_attn), n_tokens) == expected
    assert attention_rounding(layout(*kv, activations="f32", flash_attn=flash_attn), n_tokens) == EXACT


@pytest.mark.parametrize("flash_attn", [True, False])
def test_cache_layer_rounds_queries_to_the_key_type(flash_attn):
    q, keys, values, cell_pos, q_pos = cache(3, 0)
    q = q + RNG.standard_normal(q.shape).astype(np.float32) * 1e-3      # not exact in f16
    kv = HostKVLayer(layout(flash_attn=flash_attn))
    cells = np.arange(N_CELLS)
    kv.store(cells, cell_pos, keys, values)
    assert kv.attends_by_rows(20) and kv.attends_by_rows(FA_TILE_QUERIES) != flash_attn
    found = kv.attend_rows(AttentionStep(cells, N_CELLS, AttentionKind.FULL, 0), q_pos, q, N_HEAD_KV, KQ_SCALE)
    expected = attend(q.astype(np.float16).astype(np.float32), keys, values, cell_pos, q_pos, 0,
                      FLASH if flash_attn else PLAIN)
    np.testing.assert_array_equal(found, expected)


@njit(cache=True)
def f16_round_all(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = f16_round(x[i])
    return out


def test_f16_round_is_the_conversion_to_f16_and_back():
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    finite = every_half[np.isfinite(every_half)]
    neighbours = np.concatenate([np.nextafter(finite, np.float32(np.inf)), np.nextafter(finite, np.float32(-np.inf))])
    midpoints = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)     # ties, both parities
    x = np.concatenate([every_half, neighbours, midpoints, RNG.standard_normal(1 << 16).astype(np.float32) * 1e3,
                        np.float32([65519.99, 65520, 1e6, -1e6, 5.9e-8, 3e-8, 2.9e-8, 0.0, -0.0])])
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(f16_round_all(x).view(np.uint32), expected.view(np.uint32))


def test_a_long_ubatch_without_flash_attention_rounds_probabilities_between_the_products():
    n_tokens = 9
    q, keys, values, cell_pos, q_pos = cache(n_tokens, 0)
    kv = HostKVLayer(layout(flash_attn=False))
    kv.store(np.arange(N_CELLS), cell_pos, keys, values)
    found = kv.attend_rows(AttentionStep(np.arange(N_CELLS), N_CELLS, AttentionKind.FULL, 0), q_pos, q, N_HEAD_KV,
                           KQ_SCALE)
    group, expected = N_HEAD // N_HEAD_KV, np.zeros((n_tokens, N_HEAD, D_V))
    for t in range(n_tokens):
        seen = visible_cells(cell_pos, q_pos[t], 0)
        for h in range(N_HEAD):
            g = h // group
            scores = (keys[seen, g * D_K:(g + 1) * D_K] @ q[t, h]) * np.float32(KQ_SCALE)
            e = np.exp(scores - scores.max())
            probs = (e / e.sum()).astype(np.float16).astype(np.float64)
            expected[t, h] = probs @ values[seen, g * D_V:(g + 1) * D_V]
    expected = expected.reshape(n_tokens, -1)
    assert np.abs(found - expected).max() < 1e-5 * np.abs(expected).max()
    exact = attend(q, keys, values, cell_pos, q_pos, 0, EXACT)
    assert np.abs(found - exact).max() > 1e-4 * np.abs(exact).max()
