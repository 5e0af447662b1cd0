"""y = x @ W.T with W kept in its ggml block format.

The rows of W are split into chunks spread over Numba's threads (`numba.set_num_threads`
decides how many). Each chunk's rows are decoded once, exactly (bit-exact with
`gguf.quants.dequantize`), into a float32 tile that stays in cache, and the tile is multiplied
with all tokens of x by a 4x4 register-blocked kernel with float32 accumulation. With one token
(decode) this streams the weight bytes once; with many tokens (prefill) each row is still
decoded only once.

Types outside `FAST_TYPES` (the IQ1/IQ2/IQ3 families, TQ*, MXFP4, ...) are decoded with
`gguf.quants.dequantize`, a tile of rows at a time, and multiplied by the same kernel.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize as gguf_dequantize

from kernels.cpu.decode import LANES, checked_weight, row_kernel
from kernels.cpu.formats import FAST_TYPES, as_ggml_type, read_only

_F32 = int(QType.F32)
TILE_BYTES = 128 * 1024  # decoded rows per chunk: about this many bytes of float32
SLOW_TILE_ELEMENTS = 1 << 20  # elements per gguf-dequantized tile of a slow type


def rows_per_chunk(n_cols: int) -> int:
    """Rows decoded together: a multiple of 4 whose float32 tile is about TILE_BYTES."""
    return max(4, min(256, TILE_BYTES // (4 * n_cols) // 4 * 4))


_all_row_ids = read_only(np.arange(0, dtype=np.int64))


def _first_row_ids(n_rows: int) -> np.ndarray:
    """0 .. n_rows-1, sliced from one growing array instead of a new arange per call."""
    global _all_row_ids
    if _all_row_ids.shape[0] < n_rows:
        _all_row_ids = read_only(np.arange(max(n_rows, 2 * _all_row_ids.shape[0]), dtype=np.int64))
    return _all_row_ids[:n_rows]


def _run_row_kernel(x: np.ndarray, w: np.ndarray, type_code: int, n_cols: int, out: np.ndarray, col0: int) -> None:
    """out[:, col0:col0 + n_rows] = x @ W.T for a weight of a FAST_TYPES type."""
    row_ids = _first_row_ids(w.shape[0])
    chunk = rows_per_chunk(n_cols)
    row_kernel(read_only(x), w, row_ids, False, type_code, n_cols, LANES, chunk, out, col0)


def _checked_activations(x: np.ndarray, n_cols: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_cols:
        raise ValueError(f"activations of shape {x.shape} do not have {n_cols} columns")
    return x


def _checked_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-ordered float32 array of shape {shape}, not {out.dtype} {out.shape}")
    return out


def matmul(
    x: np.ndarray,
    w_bytes: np.ndarray,
    ggml_type: int | QType,
    n_cols: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """x @ W.T as float32 (n_tokens, n_rows) for a ggml weight W of shape (n_rows, n_cols).

    x: float32 (n_tokens, n_cols), or one token as (n_cols,) giving an (n_rows,) result.
    w_bytes: uint8 (n_rows, row_bytes), W's rows in ggml's block format (a read-only view of a
    memory-mapped tensor is fine; nothing is copied). One expert of a 3-D `ffn_*_exps` tensor
    is w_bytes[e], itself such a block. out: optional preallocated C-ordered float32 result.
    """
    qtype = as_ggml_type(ggml_type)
    w = checked_weight(w_bytes, qtype, n_cols)
    x_in = np.asarray(x)
    single_token = x_in.ndim == 1
    x2 = _checked_activations(x_in.reshape(1, -1) if single_token else x_in, n_cols)
    n_rows = w.shape[0]
    out_checked = _checked_out(out, (n_rows,) if single_token else (x2.shape[0], n_rows))
    out2 = out_checked.reshape(1, -1) if single_token else out_checked
    if qtype in FAST_TYPES:
        _run_row_kernel(x2, w, int(qtype), n_cols, out2, 0)
    else:
        _matmul_slow_type(x2, w, qtype, n_cols, out2)
    return out_checked


def _matmul_slow_type(x: np.ndarray, w: np.ndarray, qtype: QType, n_cols: int, out: np.ndarray) -> None:
    """matmul for types without a Numba decoder: gguf decodes a tile of rows at a time."""
    tile_rows = max(1, SLOW_TILE_ELEMENTS // n_cols)
    for r0 in range(0, w.shape[0], tile_rows):
        tile = gguf_dequantize(w[r0 : r0 + tile_rows], qtype)
        tile_bytes = read_only(np.ascontiguousarray(tile, dtype=np.float32).view(np.uint8))
        _run_row_kernel(x, tile_bytes, _F32, n_cols, out, r0)
