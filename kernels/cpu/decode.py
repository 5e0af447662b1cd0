"""Decoding ggml rows to float32: the per-type dispatch, the row kernel, `dequantize_rows`.

The fast types are decoded by the Numba row decoders of `decode_basic` and `decode_kquants`;
every other type that `gguf.quants` can dequantize is decoded by it, a few rows at a time.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize as gguf_dequantize
from numba import njit, prange

from kernels.cpu import decode_basic as basic
from kernels.cpu import decode_kquants as kquants
from kernels.cpu.formats import FAST_TYPES, as_ggml_type, read_only, row_bytes
from kernels.cpu.tile_matmul import tile_matmul

LANES = 32  # see decode_basic: the inner-loop width, handed to the kernels at run time
DEQUANTIZE_ROWS_PER_CHUNK = 16
_NO_ACTIVATIONS = read_only(np.zeros((0, 0), dtype=np.float32))

_F32, _F16, _BF16 = int(QType.F32), int(QType.F16), int(QType.BF16)
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(QType[n]) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(QType[n]) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
_IQ4_NL, _IQ4_XS = int(QType.IQ4_NL), int(QType.IQ4_XS)


@njit(cache=True, nogil=True)
def decode_row(type_code, w, r, n_cols, lanes, out, o):
    """Decode row r of w (ggml type type_code, one of FAST_TYPES) into out[o]."""
    if type_code == _Q8_0:
        basic.decode_q8_0(w, r, n_cols, lanes, out, o)
    elif type_code == _Q4_K:
        kquants.decode_q4_k(w, r, n_cols, lanes, out, o)
    elif type_code == _Q6_K:
        kquants.decode_q6_k(w, r, n_cols, lanes, out, o)
    elif type_code == _Q5_0:
        basic.decode_q5_0(w, r, n_cols, lanes, out, o)
    elif type_code == _Q4_0:
        basic.decode_q4_0(w, r, n_cols, lanes, out, o)
    elif type_code == _Q5_K:
        kquants.decode_q5_k(w, r, n_cols, lanes, out, o)
    elif type_code == _F16:
        basic.decode_f16(w, r, n_cols, lanes, out, o)
    elif type_code == _F32:
        basic.decode_f32(w, r, n_cols, lanes, out, o)
    elif type_code == _BF16:
        basic.decode_bf16(w, r, n_cols, lanes, out, o)
    elif type_code == _Q4_1:
        basic.decode_q4_1(w, r, n_cols, lanes, out, o)
    elif type_code == _Q5_1:
        basic.decode_q5_1(w, r, n_cols, lanes, out, o)
    elif type_code == _Q2_K:
        kquants.decode_q2_k(w, r, n_cols, lanes, out, o)
    elif type_code == _Q3_K:
        kquants.decode_q3_k(w, r, n_cols, lanes, out, o)
    elif type_code == _IQ4_NL:
        basic.decode_iq4_nl(w, r, n_cols, lanes, out, o)
    elif type_code == _IQ4_XS:
        kquants.decode_iq4_xs(w, r, n_cols, lanes, out, o)


@njit(cache=True, nogil=True)
def _consecutive(rows, start, n):
    for i in range(1, n):
        if rows[start + i] != rows[start] + i:
            return False
    return True


@njit(cache=True, nogil=True, parallel=True)
def row_kernel(x, w, rows, decode_only, type_code, n_cols, lanes, rows_per_chunk, out, col0):
    """Decode rows w[rows] and either store them or multiply them with x.

    decode_only: out[i] = row rows[i] of W. Otherwise out[:, col0 + i] = x @ W[rows[i]],
    each chunk of rows_per_chunk rows decoded once into a float32 tile that stays in cache.
    One kernel serves both uses because compiling a kernel re-optimises every decoder it
    calls: a second kernel would double the first-run compile time.
    """
    n_out_rows = rows.shape[0]
    n_chunks = (n_out_rows + rows_per_chunk - 1) // rows_per_chunk
    for c in prange(n_chunks):
        start = c * rows_per_chunk
        n_tile_rows = min(rows_per_chunk, n_out_rows - start)
        if decode_only:
            for i in range(n_tile_rows):
                decode_row(type_code, w, rows[start + i], n_cols, lanes, out, start + i)
        elif type_code == _F32 and _consecutive(rows, start, n_tile_rows):
            # F32 rows are a float32 tile already: multiplied where they lie, not copied first
            first = rows[start]
            tile_matmul(x, w.view(np.float32)[first:first + n_tile_rows], n_tile_rows, out, col0 + start)
        else:
            tile = np.empty((rows_per_chunk, n_cols), dtype=np.float32)
            for i in range(n_tile_rows):
                decode_row(type_code, w, rows[start + i], n_cols, lanes, tile, i)
            tile_matmul(x, tile, n_tile_rows, out, col0 + start)


@njit(cache=True, nogil=True)
def decode_rows_serial(w, rows, type_code, n_cols, lanes, out):
    """out[i] = row rows[i] of W, on the calling thread (a few rows: embedding lookups)."""
    for i in range(rows.shape[0]):
        decode_row(type_code, w, rows[i], n_cols, lanes, out, i)


SERIAL_ROWS = 8             # rows decoded without waking the thread pool


_ROW_BYTES: dict = {}


def _row_bytes(ggml_type: int | QType, n_cols: int) -> int:
    """row_bytes, remembered per (type, n_cols): the check runs on every product."""
    key = (int(ggml_type), n_cols)
    size = _ROW_BYTES.get(key)
    if size is None:
        size = _ROW_BYTES[key] = row_bytes(ggml_type, n_cols)
    return size


def checked_weight(w_bytes: np.ndarray, ggml_type: int | QType, n_cols: int) -> np.ndarray:
    """w_bytes as the 2-D, C-ordered, read-only uint8 array the kernels take.

    Raises ValueError when its shape does not hold whole rows of n_cols elements of ggml_type.
    The view is read-only so that every caller reaches the same compiled kernel.
    """
    w = w_bytes
    if (type(w) is np.ndarray and w.dtype == np.uint8 and w.ndim == 2 and not w.flags.writeable
            and w.flags.c_contiguous and w.shape[1] == _row_bytes(ggml_type, n_cols)):
        return w        # a memory-mapped weight as it is stored: nothing to convert
    w = np.asarray(w_bytes)
    if w.dtype != np.uint8:
        w = w.view(np.uint8) if w.flags.c_contiguous else np.ascontiguousarray(w).view(np.uint8)
    if w.ndim == 1:
        w = w.reshape(1, -1)
    expected = row_bytes(ggml_type, n_cols)
    if w.ndim != 2 or w.shape[1] != expected:
        raise ValueError(
            f"weight bytes of shape {w.shape} do not hold rows of {n_cols} "
            f"{as_ggml_type(ggml_type).name} elements ({expected} bytes each)"
        )
    return read_only(np.ascontiguousarray(w))


def dequantize_rows(
    w_bytes: np.ndarray,
    ggml_type: int | QType,
    n_cols: int,
    rows: np.ndarray | list[int] | None = None,
) -> np.ndarray:
    """Rows of a ggml weight as float32 (len(rows), n_cols); all rows when rows is None.

    Bit-exact with `gguf.quants.dequantize` of the same rows. Used for embedding lookups
    (token_embd rows of the input tokens) and for reading quantized KV cache rows back.
    """
    qtype = as_ggml_type(ggml_type)
    w = checked_weight(w_bytes, qtype, n_cols)
    n_rows = w.shape[0]
    if rows is None:
        row_ids = np.arange(n_rows, dtype=np.int64)
    else:
        row_ids = np.asarray(rows, dtype=np.int64).ravel()
    if row_ids.size and (row_ids.min() < 0 or row_ids.max() >= n_rows):
        raise IndexError(f"row index out of range for a weight of {n_rows} rows")
    if qtype not in FAST_TYPES:
        return gguf_dequantize(w[row_ids], qtype).reshape(row_ids.size, n_cols)
    out = np.empty((row_ids.size, n_cols), dtype=np.float32)
    if row_ids.size <= SERIAL_ROWS:
        decode_rows_serial(w, read_only(row_ids), int(qtype), n_cols, LANES, out)
        return out
    row_kernel(
        _NO_ACTIVATIONS, w, read_only(row_ids), True, int(qtype), n_cols, LANES, DEQUANTIZE_ROWS_PER_CHUNK, out, 0
    )
    return out
