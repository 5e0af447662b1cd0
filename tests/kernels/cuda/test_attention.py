"""KV cache writes and attention against NumPy: f32/f16/q8_0 caches read inside the kernel, GQA,
flash-decoding splits, prefill, sliding-window and chunked masks, empty cells, MLA's V-from-K."""
from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize, quantize

from kernels.cuda import ops


def decoded_cache(rt, cache, type_name: str, n_values: int) -> np.ndarray:
    """What the cache holds, decoded in NumPy (gguf's dequantizer for q8_0)."""
    raw = rt.download(cache)
    if type_name == "f32":
        return raw.view(np.float32).astype(np.float64)
    if type_name == "f16":
        return raw.view(np.float16).astype(np.float64)
    return dequantize(raw, QType[type_name.upper()]).reshape(len(raw), n_values).astype(np.float64)


def reference_attention(q, keys, values, cell_pos, q_pos, kq_scale, kind="full", window=0):
    n_tokens, n_head, d_k = q.shape
    n_head_kv = keys.shape[1]
    group = n_head // n_head_kv
    qp, kp = q_pos[:, None], cell_pos[None, :]
    mask = (kp >= 0) & (kp <= qp)
    if kind == "sliding":
        mask &= qp - kp < window
    if kind == "chunked":
        mask &= kp >= (qp // window) * window
    out = np.zeros((n_tokens, n_head, values.shape[-1]))
    for h in range(n_head):
        scores = kq_scale * q[:, h].astype(np.float64) @ keys[:, h // group].T
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(1, keepdims=True))
        out[:, h] = (p / p.sum(1, keepdims=True)) @ values[:, h // group]
    return out.reshape(n_tokens, -1)


def fill_cache(rt, rng, n_cells, n_filled, n_head_kv, d, type_name, positions):
    rows = rng.standard_normal((n_filled, n_head_kv * d)).astype(np.float32)
    cache = rt.zeros((n_cells, ops.cache_row_bytes(type_name, n_head_kv * d)), np.uint8)
    cells = rt.upload(np.arange(n_filled, dtype=np.int64))
    if type_name in ops.STORED_ON_DEVICE:
        ops.store_rows(rt, rt.upload(rows), cache, cells, type_name)
    else:                           # quantized on the host, as the backend does for these types
        ops.scatter_rows(rt, rt.upload(quantize(rows, QType[type_name.upper()])), cache, cells)
    return cache, decoded_cache(rt, cache, type_name, n_head_kv * d)[:n_filled].reshape(n_filled, n_head_kv, d)


@pytest.mark.parametrize("type_k, type_v", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q8_0"), ("f16", "q8_0")])
@pytest.mark.parametrize("n_tokens, n_filled, cells_per_split", [(1, 300, 128), (3, 77, None), (12, 40, None)])
def test_attention_matches_reference(rt, rng, type_k, type_v, n_tokens, n_filled, cells_per_split):
    n_head, n_head_kv, d_k, d_v = 4, 2, 64, 32
    cell_pos = np.arange(n_filled, dtype=np.int64)
    cell_pos[5] = -1                                      # an empty cell in the middle
    q_pos = np.arange(n_filled - n_tokens, n_filled, dtype=np.int64)
    k_cache, keys = fill_cache(rt, rng, n_filled + 7, n_filled, n_head_kv, d_k, type_k, cell_pos)
    v_cache, values = fill_cache(rt, rng, n_filled + 7, n_filled, n_head_kv, d_v, type_v, cell_pos)
    q = rng.standard_normal((n_tokens, n_head, d_k)).astype(np.float32)
    pos = np.full(n_filled + 7, -1, np.int64)
    pos[:n_filled] = cell_pos
    got = rt.download(ops.attention(rt, rt.upload(q), k_cache, v_cache, rt.upload(pos), rt.upload(q_pos), n_filled,
                                    n_head_kv, type_k, type_v, 0.125, cells_per_split=cells_per_split))
    expected = reference_attention(q, keys, values, cell_pos, q_pos, 0.125)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("type_k, type_v", [("f16", "f16"), ("q8_0", "q4_0")])
@pytest.mark.parametrize("n_tokens, n_filled, d", [(20, 45, 64), (9, 9, 80)])
def test_tiled_prefill_matches_reference(rt, rng, type_k, type_v, n_tokens, n_filled, d):
    """Query rows in tiles sharing decoded key tiles: a tail tile, a head size that is not a power of two."""
    n_head, n_head_kv = 6, 2
    cell_pos = np.arange(n_filled, dtype=np.int64)
    q_pos = np.arange(n_filled - n_tokens, n_filled, dtype=np.int64)
    k_cache, keys = fill_cache(rt, rng, n_filled, n_filled, n_head_kv, d, type_k, cell_pos)
    v_cache, values = fill_cache(rt, rng, n_filled, n_filled, n_head_kv, d, type_v, cell_pos)
    q = rng.standard_normal((n_tokens, n_head, d)).astype(np.float32)
    got = rt.download(ops.attention(rt, rt.upload(q), k_cache, v_cache, rt.upload(cell_pos), rt.upload(q_pos), n_filled,
                                    n_head_kv, type_k, type_v, 0.125, tiled=True))
    np.testing.assert_allclose(got, reference_attention(q, keys, values, cell_pos, q_pos, 0.125), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("kind, window", [("sliding", 5), ("chunked", 8)])
def test_sliding_and_chunked_masks(rt, rng, kind, window, tiled):
    n_filled, n_tokens = 30, 6
    cell_pos = np.arange(n_filled, dtype=np.int64)
    q_pos = cell_pos[-n_tokens:].copy()
    k_cache, keys = fill_cache(rt, rng, n_filled, n_filled, 1, 32, "f16", cell_pos)
    v_cache, values = fill_cache(rt, rng, n_filled, n_filled, 1, 32, "f16", cell_pos)
    q = rng.standard_normal((n_tokens, 2, 32)).astype(np.float32)
    got = rt.download(ops.attention(rt, rt.upload(q), k_cache, v_cache, rt.upload(cell_pos), rt.upload(q_pos),
                                    n_filled, 1, "f16", "f16", 0.2, kind=kind, window=window,
                                    cells_per_split=None if tiled else 8, tiled=tiled))
    expected = reference_attention(q, keys, values, cell_pos, q_pos, 0.2, kind, window)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def test_mla_values_are_the_start_of_each_key(rt, rng):
    n_filled, d_k, d_v = 20, 96, 64
    cell_pos = np.arange(n_filled, dtype=np.int64)
    k_cache, keys = fill_cache(rt, rng, n_filled, n_filled, 1, d_k, "f16", cell_pos)
    q = rng.standard_normal((2, 3, d_k)).astype(np.float32)
    q_pos = np.array([18, 19], np.int64)
    got = rt.download(ops.attention(rt, rt.upload(q), k_cache, None, rt.upload(cell_pos), rt.upload(q_pos), n_filled,
                                    1, "f16", "f16", 0.1, v_from_k=d_v))
    expected = reference_attention(q, keys, keys[..., :d_v], cell_pos, q_pos, 0.1)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def test_q8_0_cache_rows_match_gguf_quantization(rt, rng):
    rows = rng.standard_normal((5, 96)).astype(np.float32)
    cache = rt.zeros((8, ops.cache_row_bytes("q8_0", 96)), np.uint8)
    ops.store_rows(rt, rt.upload(rows), cache, rt.upload(np.array([7, 0, 3, 2, 6], np.int64)), "q8_0")
    got = rt.download(cache)[[7, 0, 3, 2, 6]].reshape(5, 3, 34)
    expected = quantize(rows, QType.Q8_0).reshape(5, 3, 34)
    np.testing.assert_array_equal(got[..., :2], expected[..., :2])                   # the f16 scales
    q_diff = got[..., 2:].view(np.int8).astype(int) - expected[..., 2:].view(np.int8)
    assert np.abs(q_diff).max() <= 1 and (q_diff != 0).mean() < 0.01                # ties may round apart


def test_positions_and_forget(rt):
    cell_pos = rt.upload(np.full(6, -1, np.int64))
    ops.store_positions(rt, cell_pos, rt.upload(np.array([0, 1, 2, 4], np.int64)), rt.upload(np.array([10, 11, 12, 13], np.int64)))
    ops.forget_cells(rt, cell_pos, 12)
    np.testing.assert_array_equal(rt.download(cell_pos), [10, 11, -1, -1, -1, -1])
