"""Attention of query tokens over a KV cache kept in its storage type.

    attend_cache(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window,
                 kq_scale, rounding, out)

One pass over the cells with an online softmax (a running maximum, sum and weighted value
sum per query head, as llama.cpp's CPU flash attention keeps them): each visible cell's key
and value rows are decoded once into a scratch row (bit-exact with `dequantize_rows`) and
used by every query head that reads them, so a step neither decodes the whole cache nor
allocates anything the size of it. Cells a query may not see (empty, in its future, outside
its sliding window or chunk) are skipped before they are decoded.

`rounding` picks how the sums are rounded (queries arrive already rounded to the key's dot type):
  EXACT  float32 running sums.
  FLASH  llama.cpp's CPU flash attention of a few queries (ggml's one-chunk kernel): an F16 V's
         running value sum is held in f16, each rescale and each multiply-add (one f32 fused
         multiply-add) rounded to f16 per element, divided by the sum at the end in f32.
  PLAIN  llama.cpp's CPU attention without flash attention (mul_mat, soft_max, mul_mat): two
         passes, the scores of all cells first, then probabilities normalised (the exponentials
         summed in double) and rounded to V's dot type (f16 or bf16) before the V product.

Storage: uint8 rows (cells, row_bytes) of F32, F16, BF16 or a `quantize_rows` block type,
all kv heads of a cell in one row. q (T, n_head, d_k) float32, grouped-query heads (query
head h reads kv head h // (n_head / n_head_kv)); out (T, n_head * d_v) float32. More than
PARALLEL_MIN_TOKENS queries run in parallel over the queries.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from numba import njit, prange

from kernels.cpu.decode import decode_row
from kernels.cpu.formats import f32_to_bf16_bits
from kernels.cpu.tile_matmul import SUM_FASTMATH

FULL, SLIDING, CHUNKED = 0, 1, 2    # which cached positions a query sees (llama_hparams::is_masked_swa)
EXACT, FLASH, PLAIN = 0, 1, 2       # how the sums are rounded (see the module docstring)
PARALLEL_MIN_TOKENS = 5             # a decode step's few queries stay on the calling thread
_LANES = 32

_F32, _F16, _BF16 = int(QType.F32), int(QType.F16), int(QType.BF16)
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(QType[n]) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
_IQ4_NL = int(QType.IQ4_NL)
CACHE_TYPES = frozenset((_F32, _F16, _BF16, _Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _IQ4_NL))


@njit(cache=True, nogil=True, inline="always")
def _visible(q, k, mask_kind, window):
    if k < 0 or k > q:
        return False
    if mask_kind == SLIDING:
        return q - k < window
    if mask_kind == CHUNKED:
        return k >= (q // window) * window
    return True


@njit(cache=True, nogil=True, inline="always")
def f16_round(x):
    """x rounded to the nearest float16 (ties to even), as a float32: the same value as a
    conversion to f16 and back, in selects that vectorise (the FLASH sum rounds every element)."""
    bits = np.float32(x).view(np.uint32)
    sign = bits & np.uint32(0x80000000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    normal = (magnitude + np.uint32(0xFFF) + ((magnitude >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    # below 2**-14 the f16 step is 2**-24, the step of 0.5: adding 0.5 rounds, taking it off is exact
    tiny = np.float32(np.uint32(magnitude).view(np.float32) + np.float32(0.5) - np.float32(0.5)).view(np.uint32)
    rounded = tiny if magnitude < np.uint32(0x38800000) else normal
    rounded = np.uint32(0x7F800000) if magnitude >= np.uint32(0x477FF000) else rounded    # 65520 and up: inf
    rounded = magnitude if magnitude > np.uint32(0x7F800000) else rounded                 # NaN stays NaN
    return np.uint32(rounded | sign).view(np.float32)


@njit(cache=True, nogil=True, inline="always")
def _bf16(x):
    return np.uint32(np.uint32(f32_to_bf16_bits(x)) << np.uint32(16)).view(np.float32)


@njit(cache=True, nogil=True, fastmath=SUM_FASTMATH)
def _dot(a, b, b0, n):
    total = np.float32(0.0)
    for i in range(n):
        total += a[i] * b[b0 + i]
    return total


@njit(cache=True, nogil=True, fastmath=SUM_FASTMATH)
def _scale_add(acc, h, scale, weight, v, v0, n):
    """acc[h] = acc[h] * scale + weight * v[v0:v0 + n]."""
    for i in range(n):
        acc[h, i] = acc[h, i] * scale + weight * v[v0 + i]


@njit(cache=True, nogil=True)
def _scale_f16(acc, h, scale, n):
    """acc[h] = f16(acc[h] * scale) per element (ggml_vec_scale_f16)."""
    for i in range(n):
        acc[h, i] = f16_round(acc[h, i] * scale)


@njit(cache=True, nogil=True)
def _mad_f16(acc, h, weight, v, v0, n):
    """acc[h] = f16(fma(v, weight, acc[h])) per element (ggml_vec_mad_f16): the product of an f16
    value and an f32 weight is exact in double, so one double sum rounded to f32 is the fused
    multiply-add."""
    w = np.float64(weight)
    for i in range(n):
        acc[h, i] = f16_round(np.float32(np.float64(v[v0 + i]) * w + np.float64(acc[h, i])))


@njit(cache=True, nogil=True)
def _online_query(t, q, k_store, k_type, v_store, v_type, group, cell_pos, q_pos, mask_kind, window, scale,
                  f16_sum, key, value, running_max, running_sum, acc, out):
    """out[t] by one pass with an online softmax; f16_sum: the value sum held in f16 (FLASH)."""
    n_head, d_k = q.shape[1], q.shape[2]
    d_v = acc.shape[1]
    running_max[:] = -np.inf
    running_sum[:] = 0.0
    acc[:] = 0.0
    for c in range(cell_pos.shape[0]):
        if not _visible(q_pos[t], cell_pos[c], mask_kind, window):
            continue
        decode_row(k_type, k_store, c, key.shape[1], _LANES, key, 0)
        decode_row(v_type, v_store, c, value.shape[1], _LANES, value, 0)
        for h in range(n_head):
            g = h // group
            score = _dot(q[t, h], key[0], g * d_k, d_k) * scale
            if score > running_max[h]:      # a new maximum: rescale what was summed so far
                shrink = np.exp(running_max[h] - score)
                running_max[h] = score
                running_sum[h] = running_sum[h] * shrink + np.float32(1.0)
                if f16_sum:
                    _scale_f16(acc, h, shrink, d_v)
                    _mad_f16(acc, h, np.float32(1.0), value[0], g * d_v, d_v)
                else:
                    _scale_add(acc, h, shrink, np.float32(1.0), value[0], g * d_v, d_v)
            else:
                p = np.exp(score - running_max[h])
                running_sum[h] += p
                if f16_sum:
                    _mad_f16(acc, h, p, value[0], g * d_v, d_v)
                else:
                    _scale_add(acc, h, np.float32(1.0), p, value[0], g * d_v, d_v)
    for h in range(n_head):
        inverse = np.float32(1.0) / running_sum[h]
        for i in range(d_v):
            out[t, h * d_v + i] = acc[h, i] * inverse


@njit(cache=True, nogil=True, fastmath=SUM_FASTMATH)
def _add_scaled(acc, h, weight, v, v0, n):
    for i in range(n):
        acc[h, i] += weight * v[v0 + i]


@njit(cache=True, nogil=True)
def _plain_query(t, q, k_store, k_type, v_store, v_type, group, cell_pos, q_pos, mask_kind, window, scale,
                 key, value, scores, acc, out):
    """out[t] as llama.cpp computes it without flash attention: all scores, a softmax normalised
    in f32 by the double sum of its exponentials, the probabilities rounded to V's dot type."""
    n_head, d_k = q.shape[1], q.shape[2]
    d_v = acc.shape[1]
    scores[:] = -np.inf
    for c in range(cell_pos.shape[0]):
        if _visible(q_pos[t], cell_pos[c], mask_kind, window):
            decode_row(k_type, k_store, c, key.shape[1], _LANES, key, 0)
            for h in range(n_head):
                scores[c, h] = _dot(q[t, h], key[0], (h // group) * d_k, d_k) * scale
    for h in range(n_head):
        largest = np.float32(-np.inf)
        for c in range(cell_pos.shape[0]):
            largest = max(largest, scores[c, h])
        total = 0.0
        for c in range(cell_pos.shape[0]):
            e = np.exp(scores[c, h] - largest)
            scores[c, h] = e
            total += np.float64(e)
        inverse = np.float32(1.0 / total)
        for c in range(cell_pos.shape[0]):
            p = scores[c, h] * inverse
            scores[c, h] = f16_round(p) if v_type == _F16 else (_bf16(p) if v_type == _BF16 else p)
    acc[:] = 0.0
    for c in range(cell_pos.shape[0]):
        if not _visible(q_pos[t], cell_pos[c], mask_kind, window):
            continue
        decode_row(v_type, v_store, c, value.shape[1], _LANES, value, 0)
        for h in range(n_head):
            _add_scaled(acc, h, scores[c, h], value[0], (h // group) * d_v, d_v)
    for h in range(n_head):
        for i in range(d_v):
            out[t, h * d_v + i] = acc[h, i]


@njit(cache=True, nogil=True)
def _attend_queries(t0, t1, q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window,
                    kq_scale, rounding, out):
    """out[t0:t1], with scratch rows of its own."""
    n_head, d_k = q.shape[1], q.shape[2]
    d_v = out.shape[1] // n_head
    group = n_head // n_head_kv
    key = np.empty((1, n_head_kv * d_k), dtype=np.float32)
    value = np.empty((1, n_head_kv * d_v), dtype=np.float32)
    acc = np.empty((n_head, d_v), dtype=np.float32)
    scale = np.float32(kq_scale)
    if rounding == PLAIN:
        scores = np.empty((cell_pos.shape[0], n_head), dtype=np.float32)
        for t in range(t0, t1):
            _plain_query(t, q, k_store, k_type, v_store, v_type, group, cell_pos, q_pos, mask_kind, window, scale,
                         key, value, scores, acc, out)
        return
    f16_sum = rounding == FLASH and v_type == _F16
    running_max = np.empty(n_head, dtype=np.float32)
    running_sum = np.empty(n_head, dtype=np.float32)
    for t in range(t0, t1):
        _online_query(t, q, k_store, k_type, v_store, v_type, group, cell_pos, q_pos, mask_kind, window, scale,
                      f16_sum, key, value, running_max, running_sum, acc, out)


@njit(cache=True, nogil=True, parallel=True)
def _attend_parallel(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window, kq_scale,
                     rounding, out):
    n_tokens = q.shape[0]
    for t in prange(n_tokens):
        _attend_queries(t, t + 1, q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind,
                        window, kq_scale, rounding, out)


def attend_cache(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window, kq_scale,
                 rounding, out):
    """out[t] = softmax(kq_scale * q[t] K^T over the cells q_pos[t] sees) V, per query head."""
    if q.shape[0] < PARALLEL_MIN_TOKENS:
        _attend_queries(0, q.shape[0], q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind,
                        window, kq_scale, rounding, out)
    else:
        _attend_parallel(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window,
                         kq_scale, rounding, out)
