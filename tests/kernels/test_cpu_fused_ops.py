"""The decode step's small kernels and cache attention against NumPy float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

from kernels.cpu import quantize_rows
from kernels.cpu.attention import CHUNKED, EXACT, FULL, SLIDING, attend_cache
from kernels.cpu.fused_ops import GELU, GELU_F16, SILU, add_rms_norm_rows, glu_rows, q8_0_round_rows, rms_norm_rows, rope_rows

RNG = np.random.default_rng(3)


def rel(found, expected) -> float:
    return float(np.max(np.abs(found - expected)) / np.max(np.abs(expected)))


def rms_norm_reference(x, w):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1.0 if w is None else w)


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_rows(weighted):
    x = RNG.standard_normal((3, 640)).astype(np.float32) * 40
    w = RNG.standard_normal(640).astype(np.float32) if weighted else None
    out = np.empty_like(x)
    rms_norm_rows(x, np.zeros(0, np.float32) if w is None else w, 1e-6, out)
    assert rel(out, rms_norm_reference(x, w)) < 1e-6


def test_add_rms_norm_rows():
    residual, y = RNG.standard_normal((2, 96)).astype(np.float32), RNG.standard_normal((2, 96)).astype(np.float32)
    w = RNG.standard_normal(96).astype(np.float32)
    out = np.empty_like(y)
    add_rms_norm_rows(residual, y, w, 1e-6, out)
    assert rel(out, residual + rms_norm_reference(y, w)) < 1e-6


def test_gelu_f16_is_llama_cpps_table_at_the_input_rounded_to_f16():
    """GGML_GELU_FP16: the input rounded to f16, ggml_gelu_f32 of that value (float32, whose
    1 + tanh cancels in the negative tail exactly as llama.cpp's does) rounded to f16, times up;
    0 from -10 down and the input itself from 10 up."""
    gate = np.concatenate([RNG.standard_normal(4000).astype(np.float32) * 4,
                           np.float32([-10.0, -9.999, 9.999, 10.0, 11.0, -11.0, 0.0, -0.0, 65504.0, np.inf, -np.inf,
                                       1e-8, -3.0e-6])])[None, :]
    up = RNG.standard_normal(gate.shape).astype(np.float32)
    out = np.empty_like(gate)
    glu_rows(gate, up, GELU_F16, out)
    with np.errstate(all="ignore"):
        table = np.empty(gate.shape, dtype=np.float16)
        for i, x in enumerate(gate[0]):
            h = np.float32(np.float16(x))
            inner = np.float32(0.7978845608028654) * h * (np.float32(1) + np.float32(0.044715) * h * h)
            table[0, i] = np.float16(np.float32(0.5) * h * (np.float32(1) + np.tanh(inner)))
    act = np.where(gate <= -10, np.float32(0), np.where(gate >= 10, gate, table.astype(np.float32)))
    assert np.array_equal(out, (act * up).astype(np.float32), equal_nan=True)
    assert out[0, -13] == 0.0 and out[0, -10] == np.float32(10.0) * up[0, -10]        # -10 and 10 exactly
    assert np.array_equal(out[0, 4000:4002], table[0, 4000:4002].astype(np.float32) * up[0, 4000:4002])
    exact = np.empty_like(gate)
    glu_rows(gate, up, GELU, exact)
    assert not np.array_equal(exact, out)          # the table's rounding is visible: it is not GELU


def test_llama_cpp_activations_take_the_gelu_table_and_f32_the_exact_gelu():
    from engine.arch.layers import geglu, swiglu
    from engine.backends.cpu import CpuBackend
    gate = RNG.standard_normal((3, 64)).astype(np.float32) * 3
    up = RNG.standard_normal((3, 64)).astype(np.float32)
    for activations, kind in (("llama.cpp", GELU_F16), ("f32", GELU)):
        expected = np.empty_like(gate)
        glu_rows(gate, up, kind, expected)
        assert np.array_equal(CpuBackend(activations).glu(gate, up, geglu), expected)
        glu_rows(gate, up, SILU, expected)
        assert np.array_equal(CpuBackend(activations).glu(gate, up, swiglu), expected)


@pytest.mark.parametrize("kind", [SILU, GELU])
def test_glu_rows(kind):
    gate = RNG.standard_normal((2, 300)).astype(np.float32) * 4
    up = RNG.standard_normal((2, 300)).astype(np.float32)
    g = gate.astype(np.float64)
    if kind == SILU:
        act = g / (1 + np.exp(-g))
    else:
        act = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    out = np.empty_like(gate)
    glu_rows(gate, up, kind, out)
    assert rel(out, act * up) < 1e-6


@pytest.mark.parametrize("neox", [True, False])
def test_rope_rows_rotates_pairs_and_keeps_the_tail(neox):
    n_tokens, n_head, head_dim, n_dims = 3, 2, 20, 16      # 4 dims past the rotated ones
    x = RNG.standard_normal((n_tokens, n_head, head_dim)).astype(np.float32)
    angles = RNG.uniform(-3, 3, (n_tokens, n_dims // 2))
    out = np.empty_like(x)
    rope_rows(x, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), neox, np.float32(0.5), out)
    expected = x.astype(np.float64).copy()
    for i in range(n_dims // 2):
        a, b = (i, i + n_dims // 2) if neox else (2 * i, 2 * i + 1)
        c, s = np.cos(angles[:, i])[:, None], np.sin(angles[:, i])[:, None]
        expected[..., a] = x[..., a] * c - x[..., b] * s
        expected[..., b] = x[..., a] * s + x[..., b] * c
    assert rel(out, 0.5 * expected) < 1e-6


def test_q8_0_rounding_is_the_q8_0_round_trip():
    """Each block of 32 as quantize_row_q8_0 stores it (int8 values, f16 scale), read back; the
    reference is gguf's own Q8_0 dequantizer over scales and values computed here."""
    x = RNG.standard_normal((2, 128)).astype(np.float32) * np.float32(3)
    x[1, :32] = 0                                                   # an all-zero block
    x[0, :4] = [127.0, 2.5, 3.5, -2.5]                               # scale 1: ties round to even
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv).astype(np.int8)
    d = (amax / np.float32(127)).astype(np.float16)
    raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1)
    expected = dequantize(raw, T.Q8_0).reshape(x.shape)
    out = np.empty_like(x)
    q8_0_round_rows(x, out)
    assert np.array_equal(out, expected)


# --- attention over a stored cache -----------------------------------------------------------------


def stored(rows: np.ndarray, qtype: T) -> np.ndarray:
    """(bytes the cache stores, the values they read back as)."""
    data = quantize_rows(rows, int(qtype))
    return data, dequantize(data, qtype).reshape(rows.shape).astype(np.float64)


def reference(q, keys, values, cell_pos, q_pos, mask_kind, window, kq_scale):
    n_tokens, n_head, d_k = q.shape
    n_head_kv = keys.shape[1] // d_k
    d_v = values.shape[1] // n_head_kv
    out = np.zeros((n_tokens, n_head, d_v))
    for t in range(n_tokens):
        seen = (cell_pos >= 0) & (cell_pos <= q_pos[t])
        if mask_kind == SLIDING:
            seen &= q_pos[t] - cell_pos < window
        elif mask_kind == CHUNKED:
            seen &= cell_pos >= (q_pos[t] // window) * window
        for h in range(n_head):
            g = h // (n_head // n_head_kv)
            scores = kq_scale * keys[seen, g * d_k:(g + 1) * d_k] @ q[t, h]
            p = np.exp(scores - scores.max())
            out[t, h] = p @ values[seen, g * d_v:(g + 1) * d_v] / p.sum()
    return out.reshape(n_tokens, -1)


@pytest.mark.parametrize("type_k,type_v", [(T.F32, T.F16), (T.F16, T.BF16), (T.Q8_0, T.Q4_0), (T.Q4_1, T.Q5_0),
                                           (T.Q5_1, T.IQ4_NL)], ids=lambda t: t.name)
@pytest.mark.parametrize("mask_kind,window", [(FULL, 0), (SLIDING, 5), (CHUNKED, 8)])
def test_attend_cache_over_every_cache_type_and_mask(type_k, type_v, mask_kind, window):
    n_cells, n_head, n_head_kv, d_k, d_v = 24, 6, 2, 64, 32
    keys, key_values = stored(RNG.standard_normal((n_cells, n_head_kv * d_k)).astype(np.float32), type_k)
    values, value_values = stored(RNG.standard_normal((n_cells, n_head_kv * d_v)).astype(np.float32), type_v)
    cell_pos = RNG.permutation(n_cells).astype(np.int64)
    cell_pos[[3, 7]] = -1                                           # empty cells
    q_pos = np.array([20, 22], dtype=np.int64)
    q = RNG.standard_normal((2, n_head, d_k)).astype(np.float32)
    out = np.empty((2, n_head * d_v), dtype=np.float32)
    attend_cache(q, keys, int(type_k), values, int(type_v), n_head_kv, cell_pos, q_pos, mask_kind, window, 0.125,
                 EXACT, out)
    expected = reference(q.astype(np.float64), key_values, value_values, cell_pos, q_pos, mask_kind, window, 0.125)
    assert np.sum((out - expected) ** 2) / np.sum(expected ** 2) < 1e-10
