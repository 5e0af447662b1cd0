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

Tiles are spread over Numba's threads; a tile (ROWS rows: 32 KiB at 1024 columns) stays in L1/L2
while the activations (n_tokens x n_cols bytes, L2) stream past it TOKENS tokens at a time.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from numba import get_num_threads, njit, prange

from kernels.cpu import isa, unpack
from kernels.cpu.decode import checked_weight
from kernels.cpu.decode_basic import read_f16
from kernels.cpu.decode_kquants import k_scale_min, q3_k_scale
from kernels.cpu.formats import as_ggml_type
from kernels.cpu.qgemm_ir import ROWS, SATURATING_FORMS, TOKENS, make_tile_block
from kernels.cpu.unpack import IQ4_NL_INTS

_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(QType[n]) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(QType[n]) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
_IQ4_NL, _IQ4_XS = int(QType.IQ4_NL), int(QType.IQ4_XS)

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


# --- decoding a row to unsigned bytes, integer scales and mins, float block scales --------------

@njit(cache=True, nogil=True)
def _decode_32(type_code, w, r, n_cols, v8, i, offset, u, d, dm):
    """The 32-element types through qmatmul's unpackers (values - offset as int8), shifted."""
    if type_code == _Q8_0:
        for c in range(n_cols):
            v8[i, c] = np.int8(w[r, (c >> 5) * 34 + 2 + (c & 31)])
    elif type_code == _Q4_0:
        unpack.unpack_q4_0(w, r, n_cols, 32, v8, i)
    elif type_code == _Q5_0:
        unpack.unpack_q5_0(w, r, n_cols, 32, v8, i)
    elif type_code == _IQ4_NL:
        unpack.unpack_iq4_nl(w, r, n_cols, 32, v8, i)
    elif type_code == _Q4_1:
        unpack.unpack_q4_1(w, r, n_cols, 32, v8, i)
    else:
        unpack.unpack_q5_1(w, r, n_cols, 32, v8, i)
    for c in range(n_cols):
        u[i, c] = np.uint8(np.int32(v8[i, c]) + offset)
    block_bytes = _block_bytes_32(type_code)
    for b in range(n_cols // 32):
        d[i, b] = read_f16(w, r, b * block_bytes)
        if type_code == _Q4_1 or type_code == _Q5_1:
            dm[i, b] = read_f16(w, r, b * block_bytes + 2)


@njit(cache=True, nogil=True)
def _block_bytes_32(type_code):
    if type_code == _Q8_0:
        return 34
    if type_code == _Q5_0:
        return 22
    if type_code == _Q4_1:
        return 20
    if type_code == _Q5_1:
        return 24
    return 18   # Q4_0, IQ4_NL


# Q4_K 144 bytes: d | dmin | scales[12] | qs[128]; Q5_K 176: d | dmin | scales[12] | qh[32] | qs[128].
# Sub-block j (32 elements) is nibble j % 2 of qs[32 * (j // 2) + l] (+ 16 * bit j of qh[l]).
@njit(cache=True, nogil=True)
def _decode_q45_k(w, r, n_cols, fifth_bit, i, u, sc, mn, d, dm):
    block_bytes = 176 if fifth_bit else 144
    q_start = 48 if fifth_bit else 16
    for b in range(n_cols // 256):
        offset = b * block_bytes
        d[i, b] = read_f16(w, r, offset)
        dm[i, b] = -read_f16(w, r, offset + 2)
        for j in range(8):
            scale, minimum = k_scale_min(w, r, offset + 4, j)
            sc[i, b * 8 + j] = scale
            mn[i, b * 8 + j] = minimum
            q_offset = offset + q_start + (j >> 1) * 32
            shift = 4 * (j & 1)
            e = b * 256 + j * 32
            for l in range(32):
                q = (w[r, q_offset + l] >> shift) & 15
                if fifth_bit:
                    q |= ((w[r, offset + 16 + l] >> j) & 1) << 4
                u[i, e + l] = np.uint8(q)


# Q6_K 210 bytes: ql[128] | qh[64] | scales int8[16] | d; element 128a + 32s + l has the low
# nibble s // 2 of ql[64a + 32(s % 2) + l] and bits 2s.. of qh[32a + l]; q - 32, group e // 16.
@njit(cache=True, nogil=True)
def _decode_q6_k(w, r, n_cols, i, u, sc, d):
    for b in range(n_cols // 256):
        offset = b * 210
        d[i, b] = read_f16(w, r, offset + 208)
        for g in range(16):
            scale = np.int32(w[r, offset + 192 + g])
            sc[i, b * 16 + g] = scale - ((scale & 128) << 1)
        for a in range(2):
            for s in range(4):
                low_offset = offset + a * 64 + (s & 1) * 32
                high_offset = offset + 128 + a * 32
                shift = 4 * (s >> 1)
                e = b * 256 + a * 128 + s * 32
                for l in range(32):
                    low = (w[r, low_offset + l] >> shift) & 15
                    high = (w[r, high_offset + l] >> (2 * s)) & 3
                    u[i, e + l] = np.uint8(low | (high << 4))


# Q3_K 110 bytes: hmask[32] | qs[64] | scales[12] | d; element 128h + 32s + l has low bits
# (qs[32h + l] >> 2s) & 3 and high bit (hmask[l] >> 4h + s) & 1; value low - 4 + 4 * high.
@njit(cache=True, nogil=True)
def _decode_q3_k(w, r, n_cols, i, u, sc, d):
    for b in range(n_cols // 256):
        offset = b * 110
        d[i, b] = read_f16(w, r, offset + 108)
        for g in range(16):
            sc[i, b * 16 + g] = q3_k_scale(w, r, offset + 96, g)
        for h in range(2):
            for s in range(4):
                e = b * 256 + h * 128 + s * 32
                for l in range(32):
                    low = (w[r, offset + 32 + h * 32 + l] >> (2 * s)) & 3
                    high = (w[r, offset + l] >> (h * 4 + s)) & 1
                    u[i, e + l] = np.uint8(low | (high << 2))


# Q2_K 84 bytes: scales[16] | qs[64] | d | dmin; element 128h + 32s + l is (qs[32h + l] >> 2s) & 3;
# group e // 16 has the multiplier in the low nibble of scales[g], the min in the high one.
@njit(cache=True, nogil=True)
def _decode_q2_k(w, r, n_cols, i, u, sc, mn, d, dm):
    for b in range(n_cols // 256):
        offset = b * 84
        d[i, b] = read_f16(w, r, offset + 80)
        dm[i, b] = -read_f16(w, r, offset + 82)
        for g in range(16):
            packed = np.int32(w[r, offset + g])
            sc[i, b * 16 + g] = packed & 15
            mn[i, b * 16 + g] = packed >> 4
        for h in range(2):
            for s in range(4):
                e = b * 256 + h * 128 + s * 32
                for l in range(32):
                    u[i, e + l] = np.uint8((w[r, offset + 16 + h * 32 + l] >> (2 * s)) & 3)


# IQ4_XS 136 bytes: d | scales_h u16 | scales_l[4] | qs[128]; sub-block ib (32) has the scale
# (nibble ib % 2 of scales_l[ib // 2] | bits 2ib.. of scales_h << 4) - 32 and values
# IQ4_NL_INTS of the low nibbles of qs[16ib + l], then of the high ones.
@njit(cache=True, nogil=True)
def _decode_iq4_xs(w, r, n_cols, i, u, sc, d):
    for b in range(n_cols // 256):
        offset = b * 136
        d[i, b] = read_f16(w, r, offset)
        scales_high = np.int32(w[r, offset + 2]) | (np.int32(w[r, offset + 3]) << 8)
        for ib in range(8):
            low = (np.int32(w[r, offset + 4 + (ib >> 1)]) >> (4 * (ib & 1))) & 15
            sc[i, b * 8 + ib] = (low | (((scales_high >> (2 * ib)) & 3) << 4)) - 32
            e = b * 256 + ib * 32
            for l in range(16):
                q = w[r, offset + 8 + ib * 16 + l]
                u[i, e + l] = np.uint8(np.int32(IQ4_NL_INTS[q & 15]) + 128)
                u[i, e + 16 + l] = np.uint8(np.int32(IQ4_NL_INTS[q >> 4]) + 128)


@njit(cache=True, nogil=True)
def _decode_row(type_code, w, r, n_cols, offset, v8, i, u, sc, mn, d, dm):
    """Row r of W into row i of the scratch: u (unsigned bytes), sc, mn, d, dm (-dmin, or m)."""
    if type_code == _Q4_K or type_code == _Q5_K:
        _decode_q45_k(w, r, n_cols, type_code == _Q5_K, i, u, sc, mn, d, dm)
    elif type_code == _Q6_K:
        _decode_q6_k(w, r, n_cols, i, u, sc, d)
    elif type_code == _Q3_K:
        _decode_q3_k(w, r, n_cols, i, u, sc, d)
    elif type_code == _Q2_K:
        _decode_q2_k(w, r, n_cols, i, u, sc, mn, d, dm)
    elif type_code == _IQ4_XS:
        _decode_iq4_xs(w, r, n_cols, i, u, sc, d)
    else:
        _decode_32(type_code, w, r, n_cols, v8, i, offset, u, d, dm)


@njit(cache=True, nogil=True)
def decode_rows(w, type_code, n_cols, offset, n_sub, block):
    """Rows of W as the GEMM sees them: u uint8 (n_rows, n_cols), sc and mn int32
    (n_rows, n_cols // (block // n_sub)), d and dm float32 (n_rows, n_cols // block)."""
    n_rows = w.shape[0]
    n_subs, n_blocks = n_cols // block * n_sub, n_cols // block
    v8 = np.empty((n_rows, n_cols), dtype=np.int8)
    u = np.empty((n_rows, n_cols), dtype=np.uint8)
    sc = np.ones((n_rows, n_subs), dtype=np.int32)
    mn = np.zeros((n_rows, n_subs), dtype=np.int32)
    d = np.zeros((n_rows, n_blocks), dtype=np.float32)
    dm = np.zeros((n_rows, n_blocks), dtype=np.float32)
    for r in range(n_rows):
        _decode_row(type_code, w, r, n_cols, offset, v8, r, u, sc, mn, d, dm)
    return u, sc, mn, d, dm


# --- the tile: ROWS decoded rows, interleaved 4 columns at a time ----------------------------

@njit(cache=True, nogil=True)
def _fill_tile(type_code, w, row0, n_cols, offset, scratch, tile):
    """Rows row0 .. row0 + ROWS - 1 of W (zero rows past the end) into the tile's layout:
    tq: for each 4 columns, ROWS x 4 bytes; tsc, tmn: per sub-block ROWS ints; td, tdm: per
    block ROWS floats."""
    v8, u, sc, mn, d, dm = scratch
    tq, tsc, tmn, td, tdm = tile
    n_rows = min(ROWS, w.shape[0] - row0)
    for i in range(n_rows):
        _decode_row(type_code, w, row0 + i, n_cols, offset, v8, i, u, sc, mn, d, dm)
    for i in range(n_rows, ROWS):
        u[i, :] = 0
        sc[i, :] = 0
        mn[i, :] = 0
        d[i, :] = 0.0
        dm[i, :] = 0.0
    words = u.view(np.uint32)
    tile_words = tq.view(np.uint32)
    for k in range(n_cols // 4):
        for i in range(ROWS):
            tile_words[k * ROWS + i] = words[i, k]
    for s in range(sc.shape[1]):
        for i in range(ROWS):
            tsc[s * ROWS + i] = sc[i, s]
            tmn[s * ROWS + i] = mn[i, s]
    for b in range(d.shape[1]):
        for i in range(ROWS):
            td[b * ROWS + i] = d[i, b]
            tdm[b * ROWS + i] = dm[i, b]


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
def _tile_products(family, tile, xq, xsub, dx, sx, n_blocks, row0, n_valid_rows, out, spill):
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


@njit(cache=True, nogil=True)
def _new_tile(n_cols, n_subs, n_blocks):
    scratch = (np.empty((ROWS, n_cols), dtype=np.int8), np.empty((ROWS, n_cols), dtype=np.uint8),
               np.ones((ROWS, n_subs), dtype=np.int32), np.zeros((ROWS, n_subs), dtype=np.int32),
               np.zeros((ROWS, n_blocks), dtype=np.float32), np.zeros((ROWS, n_blocks), dtype=np.float32))
    tile = (np.empty(ROWS * n_cols, dtype=np.uint8), np.empty(ROWS * n_subs, dtype=np.int32),
            np.empty(ROWS * n_subs, dtype=np.int32), np.empty(ROWS * n_blocks, dtype=np.float32),
            np.empty(ROWS * n_blocks, dtype=np.float32))
    return scratch, tile


@njit(cache=True, nogil=True, parallel=True)
def qgemm_kernel(family, type_code, offset, n_sub, block, w, n_cols, xq, xsub, dx, sx, out, n_chunks):
    """out = x @ W.T; the tiles of W in n_chunks contiguous runs spread over the threads."""
    n_rows = w.shape[0]
    n_tiles = (n_rows + ROWS - 1) // ROWS
    n_blocks = n_cols // block
    for c in prange(n_chunks):
        scratch, tile = _new_tile(n_cols, n_blocks * n_sub, n_blocks)
        spill = np.empty((TOKENS, ROWS), dtype=np.float32)
        for k in range(c * n_tiles // n_chunks, (c + 1) * n_tiles // n_chunks):
            row0 = k * ROWS
            _fill_tile(type_code, w, row0, n_cols, offset, scratch, tile)
            _tile_products(family, tile, xq, xsub, dx, sx, n_blocks, row0, min(ROWS, n_rows - row0), out, spill)


@njit(cache=True, nogil=True, parallel=True)
def subblock_sums(xq, sub_block, multiplier, out):
    """out[t, s] = multiplier * (sum of xq[t] over sub-block s): what a weight offset costs,
    or what integer mins multiply."""
    for t in prange(xq.shape[0]):
        for s in range(out.shape[1]):
            total = 0
            for e in range(s * sub_block, (s + 1) * sub_block):
                total += np.int32(xq[t, e])
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
    family, offset, _, n_sub, block = type_layout(qtype)
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
    qgemm_kernel(family, int(qtype), offset, n_sub, block, w, n_cols, xa.q, xsub, xa.d, sx, out, n_chunks)
    return out


PREFILL_MIN_TOKENS = 2


def prefill_is_faster(ggml_type: int | QType, n_tokens: int) -> bool:
    """Whether qgemm beats the float tile path (`kernels.cpu.matmul` on the same rounded
    inputs, rounding included) for n_tokens tokens: measured on an AVX512-VNNI Xeon."""
    return n_tokens >= PREFILL_MIN_TOKENS and as_ggml_type(ggml_type) in _TYPES
