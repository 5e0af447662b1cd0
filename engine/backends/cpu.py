"""The CPU backend: the op set over NumPy float32 activations and weights kept in their GGUF
encoding.

Quantized matmuls go to the Numba kernels of `kernels.cpu` when that package provides them;
otherwise rows are decoded with `gguf.quants.dequantize` one tile at a time, so that no weight
is ever held dequantized in full. F32 weights are used in place and F16 weights are widened a
tile at a time.
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from engine import layers
from engine.backends import Weight

try:    # the Numba kernels, once they are built
    from kernels.cpu import dequantize_rows as kernel_dequantize_rows
    from kernels.cpu import matmul as kernel_matmul
except ImportError:
    kernel_matmul = kernel_dequantize_rows = None

F32 = int(GGMLQuantizationType.F32)
F16 = int(GGMLQuantizationType.F16)
BF16 = int(GGMLQuantizationType.BF16)
TILE_VALUES = 1 << 21       # weight values decoded at once by the fallback (8 MiB of float32)


def decode_rows(rows: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """float32 (n, n_cols) from the bytes (n, row_bytes) of n rows, in the fallback path."""
    if ggml_type == F32:
        return rows.view(np.float32).reshape(len(rows), n_cols)
    if ggml_type == F16:
        return rows.view(np.float16).astype(np.float32).reshape(len(rows), n_cols)
    if ggml_type == BF16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(len(rows), n_cols)
    return gguf_dequantize(np.ascontiguousarray(rows), GGMLQuantizationType(ggml_type)).reshape(len(rows), n_cols)


def dequantize_rows(data: np.ndarray, ggml_type: int, n_cols: int, rows=None) -> np.ndarray:
    """float32 (n, n_cols) of the chosen rows (all when rows is None) of 2-D weight bytes."""
    if kernel_dequantize_rows is not None:
        return kernel_dequantize_rows(data, ggml_type, n_cols, rows)
    picked = data if rows is None else data[np.asarray(rows)]
    return np.ascontiguousarray(decode_rows(picked, ggml_type, n_cols))


def matmul_bytes(x: np.ndarray, data: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """x (n_tokens, n_cols) @ W.T for weight bytes (n_rows, row_bytes) -> (n_tokens, n_rows)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kernel_matmul is not None:
        # F32 too: after a BLAS call OpenBLAS's spinning threads slow the next Numba kernels ~10x
        return kernel_matmul(x, data, ggml_type, n_cols)
    if ggml_type == F32:
        return x @ data.view(np.float32).reshape(len(data), n_cols).T
    n_rows = len(data)
    out = np.empty((len(x), n_rows), dtype=np.float32)
    tile = max(1, TILE_VALUES // n_cols)
    for r0 in range(0, n_rows, tile):
        r1 = min(n_rows, r0 + tile)
        out[:, r0:r1] = x @ decode_rows(data[r0:r1], ggml_type, n_cols).T
    return out


class CpuBackend:
    """Ops on host memory; activations are float32 NumPy arrays."""

    name = "cpu"

    @staticmethod
    def set_threads(n_threads: int) -> None:
        """Threads the Numba kernels use when called from this thread (-t); 0 leaves the default."""
        if n_threads > 0:
            import numba
            numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))

    # --- ops that read weights --------------------------------------------------------------

    def matmul(self, x: np.ndarray, w: Weight) -> np.ndarray:
        """x (..., n_cols) @ W.T -> (..., n_rows)."""
        lead = x.shape[:-1]
        y = matmul_bytes(x.reshape(-1, w.n_cols), w.data, w.ggml_type, w.n_cols)
        return y.reshape(*lead, w.n_rows)

    def expert_matmul(self, x: np.ndarray, w: Weight, expert: int, rows: slice | None = None) -> np.ndarray:
        """x (n_tokens, n_cols) @ W[expert][rows].T: reads only that expert's bytes (only those
        rows, when a range is given)."""
        data = w.data[expert] if rows is None else w.data[expert, rows]
        return matmul_bytes(x, data, w.ggml_type, w.n_cols)

    def head_matmul(self, x: np.ndarray, w: Weight) -> np.ndarray:
        """x (n_tokens, n_head, n_cols) with W (n_head, n_rows, n_cols) -> (n_tokens, n_head, n_rows),
        each head through its own matrix."""
        n_head, n_rows, _ = w.shape
        out = np.empty((x.shape[0], n_head, n_rows), dtype=np.float32)
        heads_per_tile = max(1, TILE_VALUES // (n_rows * w.n_cols))
        for h0 in range(0, n_head, heads_per_tile):
            h1 = min(n_head, h0 + heads_per_tile)
            rows = w.data[h0:h1].reshape((h1 - h0) * n_rows, -1)
            mats = dequantize_rows(rows, w.ggml_type, w.n_cols).reshape(h1 - h0, n_rows, w.n_cols)
            # (heads, n_tokens, n_cols) @ (heads, n_cols, n_rows)
            out[:, h0:h1] = (x[:, h0:h1].transpose(1, 0, 2) @ mats.transpose(0, 2, 1)).transpose(1, 0, 2)
        return out

    def embedding(self, w: Weight, ids: np.ndarray) -> np.ndarray:
        # gather the few rows' bytes first: the decoder then never looks at the whole table
        return dequantize_rows(w.data[np.asarray(ids, dtype=np.int64)], w.ggml_type, w.n_cols)

    def dequantize(self, w: Weight) -> np.ndarray:
        """The whole tensor as float32, numpy-order shape: only for small tensors (norms, biases)."""
        rows = w.data.reshape(-1, w.data.shape[-1])
        return dequantize_rows(rows, w.ggml_type, w.n_cols).reshape(w.shape)

    # --- elementwise and attention ops (the math lives in engine.layers) --------------------

    rms_norm = staticmethod(layers.rms_norm)
    rope = staticmethod(layers.apply_rope)
    attention = staticmethod(layers.attention)
    swiglu = staticmethod(layers.swiglu)
    geglu = staticmethod(layers.geglu)

    @staticmethod
    def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    # --- transfers --------------------------------------------------------------------------

    @staticmethod
    def to_host(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def from_host(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)
