"""Prefill products x @ W.T as integer GEMMs on quantized activations, as llama.cpp computes them.

    qgemm(xa, w_bytes, ggml_type, n_cols, out) -> out, float32 (n_tokens, n_rows)
    prefill_is_faster(ggml_type, n_tokens) -> bool

xa is `qmatmul.QuantizedActivations` for the type's input (Q8_0 for the 32-element types, Q8_K
for the K-quants and IQ4_XS), quantized once per matmul. W stays in its ggml blocks; a tile of
ROWS rows at a time is decoded once into unsigned bytes (each value plus the type's offset),
integer sub-block scales and mins, and float block scales, and reused for every token:

    value = d * sc_j * (u - offset) - dmin * mn_j        (K-quants; sc_j = 1 and no mins in
                                                          the 32-element types; Q4_1/Q5_1 add m)

Per block and (row, token) the integer part is exact: I = sum_j sc_j * (D_j - offset * X_j),
D_j the bytes' dot product over sub-block j, X_j the activations' integer sum there (so the
unsigned-by-signed multiply-add of AVX512-VNNI applies to every type), then
acc = acc + float(I) * (d_w * d_x) (+ float(sum_j mn_j X_j) * (-dmin_w * d_x), or + m_w * s_x),
in that order (`qgemm_ir` has the register block and its diagram of the tile).

Tiles are spread over Numba's threads; a tile (ROWS = 48 rows: 30 KiB at 640 columns, 96 KiB at
2048) stays in L1/L2 while the activations (n_tokens x n_cols bytes, L2) stream past it TOKENS
tokens at a time. 3 x 16 rows by 4 tokens per register block measured fastest on an AVX512-VNNI
Xeon (1 thread, 512 tokens: Q5_0 2048 x 640 3.7 ms against 4.6 ms for 2 x 4 and 7.2 for 1 x 8).
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from numba import get_num_threads, njit, prange

from kernels.cpu import isa
from kernels.cpu.decode import checked_weight
from kernels.cpu.formats import as_ggml_type
from kernels.cpu.qgemm_ir import ROWS, SATURATING_FORMS, TOKENS, make_tile_block
from kernels.cpu.qgemm_tile import fill_tile, new_tile

# Families of types that share a register block: (sub-block elements, sub-blocks per block,
# weight offset, integer sub-block scales, mins: 0 none / 1 integer per sub-block / 2 Q4_1's m,
# bytes above 128).
_FAMILIES = (
    (32, 1, True, False, 0, False),     # 0: Q4_0 Q5_0
    (32, 1, False, False, 2, False),    # 1: Q4_1 Q5_1
    (32, 8, False, True, 1, False),     # 2: Q4_K Q5_K
    (32, 8, True, True, 0, True),       # 3: IQ4_XS
    (16, 16, True, True, 0, False),     # 4: Q6_K Q3_K
    (16, 16, False, True, 1, False),    # 5: Q2_K
    (32, 1, True, False, 0, True),      # 6: Q8_0 IQ4_NL (family 0 where the form allows)
)
WIDE_FORM = "generic" if isa.ISA in SATURATING_FORMS else isa.ISA
_BLOCK_0, _BLOCK_1, _BLOCK_2, _BLOCK_3, _BLOCK_4, _BLOCK_5, _BLOCK_6 = (
    make_tile_block(*f[:5], WIDE_FORM if f[5] else isa.ISA) for f in _FAMILIES)
_WIDE = 6 if WIDE_FORM != isa.ISA else 0

# type -> (family, offset added to each value to make it an unsigned byte)
_TYPES = {
    QType.Q4_0: (0, 8), QType.Q5_0: (0, 16), QType.Q8_0: (_WIDE, 128), QType.IQ4_NL: (_WIDE, 128),
    QType.Q4_1: (1, 0), QType.Q5_1: (1, 0),
    QType.Q4_K: (2, 0), QType.Q5_K: (2, 0),
    QType.IQ4_XS: (3, 128),
    QType.Q6_K: (4, 32), QType.Q3_K: (4, 4),
    QType.Q2_K: (5, 0),
}
QGEMM_TYPES = frozenset(_TYPES)


def type_layout(ggml_type: int | QType) -> tuple[int, int, int, int, int]:
    """(family, offset, sub-block elements, sub-blocks per block, block elements) of a type."""
    family, offset = _TYPES[as_ggml_type(ggml_type)]
    sub_block, n_sub = _FAMILIES[family][:2]
    return family, offset, sub_block, n_sub, sub_block * n_sub


# --- the products of one tile ----------------------------------------------------------------

@njit(cache=True, nogil=True)
def _tile_block(family, tile, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0):
    tq, tsc, tmn, td, tdm = tile
    if family == 0:
        _BLOCK_0(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)
    elif family == 1:
        _BLOCK_1(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)
    elif family == 2:
        _BLOCK_2(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)
    elif family == 3:
        _BLOCK_3(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)
    elif family == 4:
        _BLOCK_4(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)
    elif family == 5:
        _BLOCK_5(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)
    elif _WIDE == 6:   # a constant: the branch is compiled only where family 6 is used
        _BLOCK_6(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)


@njit(cache=True, nogil=True)
def tile_products(family, tile, xq, xsub, dx, sx, n_blocks, row0, n_valid_rows, out, spill):
    """out[:, row0:row0 + n_valid_rows] for every token, TOKENS at a time; a partial group of
    tokens or of rows goes through `spill` (TOKENS, ROWS) first."""
    n_tokens = xq.shape[0]
    for t0 in range(0, n_tokens, TOKENS):
        if t0 + TOKENS <= n_tokens and n_valid_rows == ROWS:
            _tile_block(family, tile, xq, xsub, dx, sx, t0, n_blocks, out, t0, row0)
        else:
            _tile_block(family, tile, xq, xsub, dx, sx, t0, n_blocks, spill, 0, 0)
            for i in range(min(TOKENS, n_tokens - t0)):
                for c in range(n_valid_rows):
                    out[t0 + i, row0 + c] = spill[i, c]


@njit(cache=True, nogil=True, parallel=True)
def qgemm_kernel(family, type_code, n_sub, block, w, n_cols, xq, xsub, dx, sx, out, n_chunks):
    """out = x @ W.T; the tiles of W in n_chunks contiguous runs spread over the threads."""
    n_rows = w.shape[0]
    n_tiles = (n_rows + ROWS - 1) // ROWS
    n_blocks = n_cols // block
    for c in prange(n_chunks):
        tile = new_tile(n_cols, n_blocks * n_sub, n_blocks)
        spill = np.empty((TOKENS, ROWS), dtype=np.float32)
        for k in range(c * n_tiles // n_chunks, (c + 1) * n_tiles // n_chunks):
            row0 = k * ROWS
            fill_tile(type_code, w, row0, n_cols, tile)
            tile_products(family, tile, xq, xsub, dx, sx, n_blocks, row0, min(ROWS, n_rows - row0), out, spill)


@njit(cache=True, nogil=True)
def subblock_sums(xq, sub_block, multiplier, out):
    """out[t, s] = multiplier * (sum of xq[t] over sub-block s): what a weight offset costs,
    or what integer mins multiply. One thread: a few microseconds per token, less than a
    parallel region costs."""
    for t in range(xq.shape[0]):
        row = xq[t]
        for s in range(out.shape[1]):
            total = np.int32(0)
            for value in row[s * sub_block:(s + 1) * sub_block]:   # no index checks: vectorised
                total += np.int32(value)
            out[t, s] = multiplier * total


_NO_SUMS = np.zeros((1, 1), dtype=np.int32)


def activation_terms(xa, ggml_type: int | QType) -> tuple[np.ndarray, np.ndarray]:
    """(xsub, sx) of `qgemm_ir`: per sub-block offset * X (or X for integer mins), and Q8_1's s."""
    family, offset, sub_block, _, _ = type_layout(ggml_type)
    has_offset, min_kind = _FAMILIES[family][2], _FAMILIES[family][4]
    xsub = _NO_SUMS
    if has_offset or min_kind == 1:
        n_tokens, n_cols = xa.q.shape
        xsub = np.empty((n_tokens, n_cols // sub_block), dtype=np.int32)
        subblock_sums(xa.q, sub_block, offset if has_offset else 1, xsub)
    return xsub, (xa.sums if min_kind == 2 else xa.d)


def qgemm(xa, w_bytes: np.ndarray, ggml_type: int | QType, n_cols: int, out: np.ndarray) -> np.ndarray:
    """out[:] = x @ W.T (float32 (n_tokens, n_rows), C order) for W of a type in QGEMM_TYPES and
    xa the `QuantizedActivations` of x for that type."""
    qtype = as_ggml_type(ggml_type)
    if qtype not in _TYPES:
        raise ValueError(f"{qtype.name} has no integer GEMM")
    w = checked_weight(w_bytes, qtype, n_cols)
    family, _, _, n_sub, block = type_layout(qtype)
    if xa.k_blocks != (block == 256) or xa.q.shape[1] != n_cols:
        raise ValueError(f"activations quantized for another input type than {qtype.name}'s")
    shape = (xa.q.shape[0], w.shape[0])
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-ordered float32 array of shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        return out
    xsub, sx = activation_terms(xa, qtype)
    n_tiles = -(-shape[1] // ROWS)
    n_chunks = min(n_tiles, 4 * get_num_threads())
    qgemm_kernel(family, int(qtype), n_sub, block, w, n_cols, xa.q, xsub, xa.d, sx, out, n_chunks)
    return out


# Below this, decoding the tiles (about 0.3-0.5 ns per weight) costs more than the GEMM saves:
# on an AVX512-VNNI Xeon, 1 thread, qgemm (quantization included) against the float path
# (rounding included) was slower up to 8 tokens, even at 16 and 1.3-1.4x faster at 32.
PREFILL_MIN_TOKENS = 32


def prefill_is_faster(ggml_type: int | QType, n_tokens: int) -> bool:
    """Whether qgemm beats the float tile path (`kernels.cpu.matmul` on the same rounded
    inputs, rounding included) for n_tokens tokens: measured on an AVX512-VNNI Xeon."""
    return n_tokens >= PREFILL_MIN_TOKENS and as_ggml_type(ggml_type) in _TYPES
