"""One layer's K/V storage in host memory, and attention over it.

Rows are stored in the cache type: NumPy floats for f32/f16, ggml blocks (bytes) for the rest,
quantized with the same block formats and rounding as llama.cpp's CPU cache. Each cell remembers
the position it holds (-1: empty), which is what the attention mask is built from. The CPU
backend uses this storage directly; the simulated GPU keeps it as its device memory and hands
out device arrays of what it reads.

A few queries (a decode step) attend straight over the stored rows in one kernel
(`kernels.cpu.attention`), which decodes each visible row once and allocates nothing the size of
the cache; a longer ubatch decodes the filled cells once and multiplies them as whole matrices.

With llama.cpp's activations (the layout's `activations`), attention rounds as llama.cpp's CPU
backend rounds it (`attention_rounding`), and every ubatch that rounds at all goes through the
kernel, which holds the rounded sums: with flash attention, queries in the key's dot type (f16,
bf16) and an f16 V summed in f16, except for the f32 tiled kernel that llama.cpp runs on ubatches
of FA_TILE_QUERIES tokens and more over an f32 or f16 cache; without, queries in the key's dot
type and probabilities in the value's (a longer ubatch as whole matrices, with the probabilities
rounded between the two products). Quantized keys get their Q8_0 queries from the model.
"""
from __future__ import annotations

import numpy as np

from engine.arch import layers
from engine.arch.base import AttentionKind
from engine.backends.protocol import AttentionStep, KVLayout
from engine.gguf import ggml_types
from kernels.cpu import dequantize_rows, quantize_rows
from kernels.cpu.attention import CHUNKED, EXACT, FLASH, FULL, PLAIN, SLIDING, attend_cache

FLOAT_DTYPES = {"f32": np.float32, "f16": np.float16}
MASK_KIND = {AttentionKind.FULL: FULL, AttentionKind.SLIDING: SLIDING, AttentionKind.CHUNKED: CHUNKED}
# queries that attend row by row over the stored cache; a longer ubatch decodes the cells once
# and multiplies whole matrices, which reuses each decoded row for all its queries
ROW_ATTENTION_MAX_TOKENS = 4
FA_TILE_QUERIES = 64        # ggml's CPU flash attention runs its f32 tiled kernel from this many queries
HALF_TYPES = ("f16", "bf16")


def attention_rounding(layout: KVLayout, n_tokens: int) -> int:
    """How llama.cpp's CPU backend rounds the attention of an n_tokens ubatch over this cache:
    EXACT where it rounds nothing that the cache type has not (or for activations "f32")."""
    if layout.activations != "llama.cpp":
        return EXACT
    if not layout.flash_attn:
        return PLAIN if layout.type_k in HALF_TYPES or layout.type_v in HALF_TYPES else EXACT
    tiled = n_tokens >= FA_TILE_QUERIES and layout.type_k == layout.type_v and layout.type_k in ("f32", "f16")
    return FLASH if not tiled and (layout.type_k in HALF_TYPES or layout.type_v == "f16") else EXACT


def half_rounded(x: np.ndarray, type_name: str) -> np.ndarray:
    """C-contiguous float32 x rounded to "f16" or "bf16" as ggml converts (nearest, ties to even),
    back as float32: what meets an f16/bf16 operand in ggml's CPU dot products (the vec_dot_type
    of those types is the type itself); unchanged for any other type name."""
    if type_name == "f16":
        return x.astype(np.float16).astype(np.float32)
    if type_name == "bf16":
        bits = x.view(np.uint32)
        odd = (bits >> np.uint32(16)) & np.uint32(1)
        rounded = ((bits.astype(np.uint64) + np.uint64(0x7FFF) + odd) >> np.uint64(16)).astype(np.uint32)
        return np.where(np.isnan(x), x, (rounded << np.uint32(16)).view(np.float32))
    return x


class RowCodec:
    """How one cache type stores rows."""

    def __init__(self, type_name: str):
        self.type_name = type_name
        self.dtype = FLOAT_DTYPES.get(type_name)
        self.type_id = ggml_types.type_id_by_name(type_name)

    def empty(self, cells: int, n_values: int) -> np.ndarray:
        if self.dtype is not None:
            return np.zeros((cells, n_values), dtype=self.dtype)
        return np.zeros((cells, ggml_types.kv_row_bytes(self.type_name, n_values)), dtype=np.uint8)

    def encode(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.dtype is not None else quantize_rows(np.ascontiguousarray(rows, np.float32), self.type_id)

    def decode(self, stored: np.ndarray, n_values: int) -> np.ndarray:
        if self.dtype is not None:
            return stored.astype(np.float32, copy=False)
        return dequantize_rows(stored, self.type_id, n_values)


def _as_run(cells: np.ndarray):
    """The cells as a slice where they are one ascending run (a decode step's one cell, a ubatch's
    unless a ring wraps): a slice assignment costs ~60 % of a fancy-indexed one; else the cells."""
    first, n = int(cells[0]), len(cells)
    if int(cells[-1]) - first == n - 1 and (n < 3 or bool(np.all(np.diff(cells) == 1))):
        return slice(first, first + n)
    return cells


class HostKVLayer:
    """K (cells, n_k) and V (cells, n_v) in the cache type, and the position of each cell."""

    def __init__(self, layout: KVLayout):
        self.layout = layout
        self.k_codec, self.v_codec = RowCodec(layout.type_k), RowCodec(layout.type_v)
        self.k = self.k_codec.empty(layout.n_cells, layout.n_k)
        self.v = self.v_codec.empty(layout.n_cells, layout.n_v) if layout.n_v else None   # MLA: V is part of K
        self.cell_pos = np.full(layout.n_cells, -1, dtype=np.int64)
        # the storage as the bytes the attention kernel decodes (views: no copy)
        self.k_bytes = self.k.view(np.uint8)
        self.v_bytes = None if self.v is None else self.v.view(np.uint8)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + (0 if self.v is None else self.v.nbytes)

    def store(self, cells: np.ndarray, positions: np.ndarray, k: np.ndarray, v: np.ndarray | None) -> None:
        """Write keys/values (n_tokens, ...) of host arrays into the given cells."""
        rows = _as_run(cells)
        self.k[rows] = self.k_codec.encode(k.reshape(len(cells), -1))
        if v is not None:
            self.v[rows] = self.v_codec.encode(v.reshape(len(cells), -1))
        self.cell_pos[rows] = positions

    def view(self, n_filled: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(keys, values, positions) of the first n_filled cells, keys and values as float32."""
        keys = self.k_codec.decode(self.k[:n_filled], self.layout.n_k)
        values = None if self.v is None else self.v_codec.decode(self.v[:n_filled], self.layout.n_v)
        return keys, values, self.cell_pos[:n_filled]

    def forget(self, n_past: int) -> None:
        self.cell_pos[self.cell_pos >= n_past] = -1

    def attends_by_rows(self, n_tokens: int) -> bool:
        """Whether `attend_rows` serves a ubatch of n_tokens (separate values, and a decode step or
        a ubatch that rounds as llama.cpp does)."""
        return self.v is not None and (n_tokens <= ROW_ATTENTION_MAX_TOKENS
                                       or attention_rounding(self.layout, n_tokens) != EXACT)

    def attend_rows(self, step: AttentionStep, positions: np.ndarray, q: np.ndarray, n_head_kv: int,
                    kq_scale: float) -> np.ndarray:
        """softmax(kq_scale * q K^T + mask) V (T, n_head * d_v) over the first step.n_filled cells,
        read in their storage type: q (T, n_head, d_k) float32 host array."""
        n_tokens, n_head, _ = q.shape
        out = np.empty((n_tokens, n_head * (self.layout.n_v // n_head_kv)), dtype=np.float32)
        n = step.n_filled
        rounding = attention_rounding(self.layout, n_tokens)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if rounding != EXACT:
            q = half_rounded(q, self.layout.type_k)
        if rounding == PLAIN and n_tokens > ROW_ATTENTION_MAX_TOKENS:     # whole matrices, as llama.cpp
            keys, values, key_pos = self.view(n)
            mask = layers.visible(positions, key_pos, step.kind, step.window)
            return layers.attention(q, keys.reshape(n, n_head_kv, -1), values.reshape(n, n_head_kv, -1), mask,
                                    kq_scale, lambda probs: half_rounded(probs, self.layout.type_v))
        attend_cache(q, self.k_bytes[:n], self.k_codec.type_id, self.v_bytes[:n], self.v_codec.type_id, n_head_kv,
                     self.cell_pos[:n], positions, MASK_KIND[step.kind], step.window, kq_scale, rounding, out)
        return out


def attend_cached(keys, values, key_pos, positions, step: AttentionStep, q, n_head_kv: int, kq_scale: float,
                  v_from_k: int):
    """Attention of q over decoded cache rows, all on one device: keys (N, n_k), values
    (N, n_v) or None (MLA: the first v_from_k values of each key), key_pos (N,)."""
    xp = layers.namespace(q)
    keys = xp.reshape(keys, (keys.shape[0], n_head_kv, -1))
    values = keys[..., :v_from_k] if values is None else xp.reshape(values, (values.shape[0], n_head_kv, -1))
    mask = layers.visible(positions, key_pos, step.kind, step.window)
    return layers.attention(q, keys, values, mask, kq_scale)
