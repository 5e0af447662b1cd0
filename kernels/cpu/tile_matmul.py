"""Register-blocked float32 products of activations with a tile of decoded weight rows.

`tile_matmul(x, tile, n_tile_rows, out, col0)` writes x @ tile[:n_tile_rows].T into
out[:, col0:col0 + n_tile_rows]. The inner products run 4 tokens by 4 rows at a time, so every
weight value loaded serves 4 tokens and every activation value 4 rows. Accumulation is
float32; fastmath lets LLVM vectorise the sums (reassociating them) and fuse multiply-adds,
which changes only the rounding of the sums, never the weight values.
"""

from __future__ import annotations

import numpy as np
from numba import njit

SUM_FASTMATH = {"reassoc", "contract", "nsz"}


@njit(cache=True, nogil=True)
def _store_4(out, t, col, a0, a1, a2, a3):
    out[t, col] = a0
    out[t, col + 1] = a1
    out[t, col + 2] = a2
    out[t, col + 3] = a3


@njit(cache=True, nogil=True, fastmath=SUM_FASTMATH)
def _dot_4x4(x, t, tile, i, n_cols, out, col):
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    for k in range(n_cols):
        x0, x1, x2, x3 = x[t, k], x[t + 1, k], x[t + 2, k], x[t + 3, k]
        w0, w1, w2, w3 = tile[i, k], tile[i + 1, k], tile[i + 2, k], tile[i + 3, k]
        a00 += x0 * w0
        a01 += x0 * w1
        a02 += x0 * w2
        a03 += x0 * w3
        a10 += x1 * w0
        a11 += x1 * w1
        a12 += x1 * w2
        a13 += x1 * w3
        a20 += x2 * w0
        a21 += x2 * w1
        a22 += x2 * w2
        a23 += x2 * w3
        a30 += x3 * w0
        a31 += x3 * w1
        a32 += x3 * w2
        a33 += x3 * w3
    _store_4(out, t, col, a00, a01, a02, a03)
    _store_4(out, t + 1, col, a10, a11, a12, a13)
    _store_4(out, t + 2, col, a20, a21, a22, a23)
    _store_4(out, t + 3, col, a30, a31, a32, a33)


@njit(cache=True, nogil=True, fastmath=SUM_FASTMATH)
def _dot_1x4(x, t, tile, i, n_cols, out, col):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(n_cols):
        xk = x[t, k]
        a0 += xk * tile[i, k]
        a1 += xk * tile[i + 1, k]
        a2 += xk * tile[i + 2, k]
        a3 += xk * tile[i + 3, k]
    _store_4(out, t, col, a0, a1, a2, a3)


@njit(cache=True, nogil=True, fastmath=SUM_FASTMATH)
def _dot_4x1(x, t, tile, i, n_cols, out, col):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(n_cols):
        wk = tile[i, k]
        a0 += x[t, k] * wk
        a1 += x[t + 1, k] * wk
        a2 += x[t + 2, k] * wk
        a3 += x[t + 3, k] * wk
    out[t, col], out[t + 1, col], out[t + 2, col], out[t + 3, col] = a0, a1, a2, a3


@njit(cache=True, nogil=True, fastmath=SUM_FASTMATH)
def _dot_1x1(x, t, tile, i, n_cols, out, col):
    acc = np.float32(0.0)
    for k in range(n_cols):
        acc += x[t, k] * tile[i, k]
    out[t, col] = acc


@njit(cache=True, nogil=True)
def tile_matmul(x, tile, n_tile_rows, out, col0):
    """out[:, col0:col0 + n_tile_rows] = x @ tile[:n_tile_rows].T (float32 accumulation)."""
    n_tokens, n_cols = x.shape
    n_row_quads = n_tile_rows // 4 * 4
    n_token_quads = n_tokens // 4 * 4
    for t in range(0, n_token_quads, 4):  # the tile stays in cache while x streams once
        for i in range(0, n_row_quads, 4):
            _dot_4x4(x, t, tile, i, n_cols, out, col0 + i)
        for i in range(n_row_quads, n_tile_rows):
            _dot_4x1(x, t, tile, i, n_cols, out, col0 + i)
    for t in range(n_token_quads, n_tokens):
        for i in range(0, n_row_quads, 4):
            _dot_1x4(x, t, tile, i, n_cols, out, col0 + i)
        for i in range(n_row_quads, n_tile_rows):
            _dot_1x1(x, t, tile, i, n_cols, out, col0 + i)
