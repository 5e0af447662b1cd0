"""Attention of a few query tokens over a KV cache kept in its storage type.

    attend_cache(q, k_store, k_type, v_store, v_type, cell_pos, q_pos, mask_kind, window,
                 kq_scale, out)

One pass over the cells with an online softmax (a running maximum, sum and weighted value
sum per query head, as llama.cpp's CPU flash attention keeps them): each visible cell's key
and value rows are decoded once into a scratch row (bit-exact with `dequantize_rows`) and
used by every query head that reads them, so a step neither decodes the whole cache nor
allocates anything the size of it. Cells a query may not see (empty, in its future, outside
its sliding window or chunk) are skipped before they are decoded.

Storage: uint8 rows (cells, row_bytes) of F32, F16, BF16 or a `quantize_rows` block type,
all kv heads of a cell in one row. q (T, n_head, d_k) float32, grouped-query heads (query
head h reads kv head h // (n_head / n_head_kv)); out (T, n_head * d_v) float32.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from numba import njit

from kernels.cpu.decode import decode_row
from kernels.cpu.tile_matmul import SUM_FASTMATH

FULL, SLIDING, CHUNKED = 0, 1, 2    # which cached positions a query sees (llama_hparams::is_masked_swa)
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
def attend_cache(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window, kq_scale, out):
    """out[t] = softmax(kq_scale * q[t] K^T over the cells q_pos[t] sees) V, per query head."""
    n_tokens, n_head, d_k = q.shape
    d_v = out.shape[1] // n_head
    group = n_head // n_head_kv
    key = np.empty((1, n_head_kv * d_k), dtype=np.float32)
    value = np.empty((1, n_head_kv * d_v), dtype=np.float32)
    running_max = np.empty(n_head, dtype=np.float32)
    running_sum = np.empty(n_head, dtype=np.float32)
    acc = np.empty((n_head, d_v), dtype=np.float32)
    scale = np.float32(kq_scale)
    for t in range(n_tokens):
        running_max[:] = -np.inf
        running_sum[:] = 0.0
        acc[:] = 0.0
        for c in range(cell_pos.shape[0]):
            if not _visible(q_pos[t], cell_pos[c], mask_kind, window):
                continue
            decode_row(k_type, k_store, c, n_head_kv * d_k, _LANES, key, 0)
            decode_row(v_type, v_store, c, n_head_kv * d_v, _LANES, value, 0)
            for h in range(n_head):
                g = h // group
                score = _dot(q[t, h], key[0], g * d_k, d_k) * scale
                if score > running_max[h]:      # a new maximum: rescale what was summed so far
                    shrink = np.exp(running_max[h] - score)
                    running_max[h] = score
                    running_sum[h] = running_sum[h] * shrink + np.float32(1.0)
                    _scale_add(acc, h, shrink, np.float32(1.0), value[0], g * d_v, d_v)
                else:
                    p = np.exp(score - running_max[h])
                    running_sum[h] += p
                    _scale_add(acc, h, np.float32(1.0), p, value[0], g * d_v, d_v)
        for h in range(n_head):
            inverse = np.float32(1.0) / running_sum[h]
            for i in range(d_v):
                out[t, h * d_v + i] = acc[h, i] * inverse
