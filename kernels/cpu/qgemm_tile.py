"""Weight rows decoded straight into the tile layout of the prefill GEMM (`qgemm`).

A tile holds ROWS rows (`qgemm_ir`):

    tw   uint32 (n_cols // 4, ROWS): word (k, i) = the unsigned bytes of row i, columns 4k .. 4k+3
    tsc  int32 (n_sub_blocks, ROWS): integer sub-block scales (1 in the 32-element types)
    tmn  int32 (n_sub_blocks, ROWS): integer sub-block mins (Q2_K, Q4_K, Q5_K)
    td   float32 (n_blocks, ROWS):   the block scale d
    tdm  float32 (n_blocks, ROWS):   -dmin (K-quants with mins) or m (Q4_1, Q5_1)

Each byte is the weight's integer value plus the type's offset (8 for Q4_0, 16 Q5_0, 128 Q8_0,
IQ4_NL and IQ4_XS, 32 Q6_K, 4 Q3_K; 0 for the rest), so every type's values are unsigned bytes.
Four elements at a time: the packed bits of 4 consecutive elements sit in the same bit positions
of 4 consecutive bytes of a ggml block, so one 32-bit load, a shift and a mask give a tile word
(Q5_0/Q5_1's fifth bits come from a 16-entry table that spreads 4 bits to bit 4 of 4 bytes).
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import IQ4_NL
from numba import njit, types
from numba.extending import intrinsic

from kernels.cpu import isa
from kernels.cpu.decode_basic import read_f16
from kernels.cpu.formats import block_bytes as bytes_per_block
from kernels.cpu.decode_kquants import k_scale_min, q3_k_scale
from kernels.cpu.qgemm_ir import ROWS

_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(QType[n]) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(QType[n]) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
_IQ4_NL, _IQ4_XS = int(QType.IQ4_NL), int(QType.IQ4_XS)

_LOW_NIBBLES, _LOW_PAIRS, _LOW_BITS = 0x0F0F0F0F, 0x03030303, 0x01010101
# bit m of n moved to bit 4 of byte m
_FIFTH_BITS = np.array([sum(((n >> m) & 1) << (8 * m + 4) for m in range(4)) for n in range(16)], dtype=np.int64)
# IQ4_NL's values plus 128, as bytes
_IQ4_BYTES = np.array([v + 128 for v in IQ4_NL.kvalues], dtype=np.int64)


@intrinsic
def _word(typingctx, w, r, offset):
    """The little-endian 32-bit word at byte offset of row r (of uint8 rows), one unaligned
    load: an index expression per byte would cost Numba's negative-index checks on each."""
    def codegen(context, builder, signature, args):
        row = isa.row_pointer(context, builder, signature.args[0], args[0], args[1])
        word = isa.load_scalar(builder, builder.gep(row, [args[2]]), isa.i32)
        return builder.zext(word, isa.i64)

    return types.int64(w, r, offset), codegen


@njit(cache=True, nogil=True, inline="always")
def _iq4_word(q):
    """4 nibbles (bits 0-3 of each byte of q) through IQ4_NL's table, as unsigned bytes."""
    return (_IQ4_BYTES[q & 15] | (_IQ4_BYTES[(q >> 8) & 15] << 8) | (_IQ4_BYTES[(q >> 16) & 15] << 16)
            | (_IQ4_BYTES[(q >> 24) & 15] << 24))


# 32-element blocks: d | [m] | [qh u32] | qs[16]; element j < 16 the low nibble of qs[j], 16 + j
# the high one (Q8_0: d | qs[32] signed bytes).
@njit(cache=True, nogil=True)
def _fill_32(type_code, w, r, n_cols, tw, i, td, tdm):
    has_min = type_code == _Q4_1 or type_code == _Q5_1
    has_fifth = type_code == _Q5_0 or type_code == _Q5_1
    block_bytes = bytes_per_block(type_code)
    qh_offset = 4 if has_min else 2
    qs_offset = qh_offset + (4 if has_fifth else 0)
    for b in range(n_cols // 32):
        o = b * block_bytes
        td[b, i] = read_f16(w, r, o)
        if has_min:
            tdm[b, i] = read_f16(w, r, o + 2)
        words = tw[b * 8: b * 8 + 8]
        if type_code == _Q8_0:
            for k in range(8):
                words[k, i] = _word(w, r, o + 2 + 4 * k) ^ 0x80808080
            continue
        qh = _word(w, r, o + qh_offset) if has_fifth else 0
        for k in range(4):
            q = _word(w, r, o + qs_offset + 4 * k)
            if type_code == _IQ4_NL:
                words[k, i] = _iq4_word(q)
                words[k + 4, i] = _iq4_word(q >> 4)
            else:
                words[k, i] = (q & _LOW_NIBBLES) | _FIFTH_BITS[(qh >> (4 * k)) & 15]
                words[k + 4, i] = ((q >> 4) & _LOW_NIBBLES) | _FIFTH_BITS[(qh >> (16 + 4 * k)) & 15]


# Q4_K 144 bytes: d | dmin | scales[12] | qs[128]; Q5_K 176: d | dmin | scales[12] | qh[32] | qs[128].
# Sub-block j (32 elements) is nibble j % 2 of qs[32 * (j // 2) + l] (+ 16 * bit j of qh[l]).
@njit(cache=True, nogil=True)
def _fill_q45_k(w, r, n_cols, fifth_bit, tw, i, tsc, tmn, td, tdm):
    block_bytes = 176 if fifth_bit else 144
    qs_start = 48 if fifth_bit else 16
    for b in range(n_cols // 256):
        o = b * block_bytes
        td[b, i] = read_f16(w, r, o)
        tdm[b, i] = -read_f16(w, r, o + 2)
        for j in range(8):
            scale, minimum = k_scale_min(w, r, o + 4, j)
            tsc[b * 8 + j, i] = scale
            tmn[b * 8 + j, i] = minimum
            qs, shift = o + qs_start + (j >> 1) * 32, 4 * (j & 1)
            words = tw[b * 64 + j * 8: b * 64 + j * 8 + 8]
            for k in range(8):
                word = (_word(w, r, qs + 4 * k) >> shift) & _LOW_NIBBLES
                if fifth_bit:
                    word |= ((_word(w, r, o + 16 + 4 * k) >> j) & _LOW_BITS) << 4
                words[k, i] = word


# Q6_K 210 bytes: ql[128] | qh[64] | scales int8[16] | d; element 128a + 32s + l has the low
# nibble s // 2 of ql[64a + 32(s % 2) + l] and bits 2s.. of qh[32a + l]; offset 32, group e // 16.
@njit(cache=True, nogil=True)
def _fill_q6_k(w, r, n_cols, tw, i, tsc, td):
    for b in range(n_cols // 256):
        o = b * 210
        td[b, i] = read_f16(w, r, o + 208)
        for g in range(16):
            scale = np.int32(w[r, o + 192 + g])
            tsc[b * 16 + g, i] = scale - ((scale & 128) << 1)
        for a in range(2):
            for s in range(4):
                low, high = o + a * 64 + (s & 1) * 32, o + 128 + a * 32
                words = tw[b * 64 + a * 32 + s * 8: b * 64 + a * 32 + s * 8 + 8]
                for k in range(8):
                    words[k, i] = (((_word(w, r, low + 4 * k) >> (4 * (s >> 1))) & _LOW_NIBBLES)
                                   | (((_word(w, r, high + 4 * k) >> (2 * s)) & _LOW_PAIRS) << 4))


# Q3_K 110 bytes: hmask[32] | qs[64] | scales[12] | d; element 128h + 32s + l has low bits
# (qs[32h + l] >> 2s) & 3 and high bit (hmask[l] >> 4h + s) & 1: value low + 4 * high - 4.
@njit(cache=True, nogil=True)
def _fill_q3_k(w, r, n_cols, tw, i, tsc, td):
    for b in range(n_cols // 256):
        o = b * 110
        td[b, i] = read_f16(w, r, o + 108)
        for g in range(16):
            tsc[b * 16 + g, i] = q3_k_scale(w, r, o + 96, g)
        for h in range(2):
            for s in range(4):
                words = tw[b * 64 + h * 32 + s * 8: b * 64 + h * 32 + s * 8 + 8]
                for k in range(8):
                    words[k, i] = (((_word(w, r, o + 32 + h * 32 + 4 * k) >> (2 * s)) & _LOW_PAIRS)
                                   | (((_word(w, r, o + 4 * k) >> (4 * h + s)) & _LOW_BITS) << 2))


# Q2_K 84 bytes: scales[16] | qs[64] | d | dmin; element 128h + 32s + l is (qs[32h + l] >> 2s) & 3;
# group e // 16 has the multiplier in the low nibble of scales[g], the min in the high one.
@njit(cache=True, nogil=True)
def _fill_q2_k(w, r, n_cols, tw, i, tsc, tmn, td, tdm):
    for b in range(n_cols // 256):
        o = b * 84
        td[b, i] = read_f16(w, r, o + 80)
        tdm[b, i] = -read_f16(w, r, o + 82)
        for g in range(16):
            packed = np.int32(w[r, o + g])
            tsc[b * 16 + g, i] = packed & 15
            tmn[b * 16 + g, i] = packed >> 4
        for h in range(2):
            for s in range(4):
                words = tw[b * 64 + h * 32 + s * 8: b * 64 + h * 32 + s * 8 + 8]
                for k in range(8):
                    words[k, i] = (_word(w, r, o + 16 + h * 32 + 4 * k) >> (2 * s)) & _LOW_PAIRS


# IQ4_XS 136 bytes: d | scales_h u16 | scales_l[4] | qs[128]; sub-block ib (32) has the scale
# (nibble ib % 2 of scales_l[ib // 2] | bits 2ib.. of scales_h << 4) - 32 and values
# IQ4_NL's of the low nibbles of qs[16ib + l], then of the high ones.
@njit(cache=True, nogil=True)
def _fill_iq4_xs(w, r, n_cols, tw, i, tsc, td):
    for b in range(n_cols // 256):
        o = b * 136
        td[b, i] = read_f16(w, r, o)
        scales_high = np.int32(w[r, o + 2]) | (np.int32(w[r, o + 3]) << 8)
        for ib in range(8):
            low = (np.int32(w[r, o + 4 + (ib >> 1)]) >> (4 * (ib & 1))) & 15
            tsc[b * 8 + ib, i] = (low | (((scales_high >> (2 * ib)) & 3) << 4)) - 32
            words = tw[b * 64 + ib * 8: b * 64 + ib * 8 + 8]
            for k in range(4):
                q = _word(w, r, o + 8 + ib * 16 + 4 * k)
                words[k, i] = _iq4_word(q)
                words[k + 4, i] = _iq4_word(q >> 4)


@njit(cache=True, nogil=True)
def _fill_row(type_code, w, r, n_cols, tw, i, tsc, tmn, td, tdm):
    """Row r of W into lane i of the tile."""
    if type_code == _Q4_K or type_code == _Q5_K:
        _fill_q45_k(w, r, n_cols, type_code == _Q5_K, tw, i, tsc, tmn, td, tdm)
    elif type_code == _Q6_K:
        _fill_q6_k(w, r, n_cols, tw, i, tsc, td)
    elif type_code == _Q3_K:
        _fill_q3_k(w, r, n_cols, tw, i, tsc, td)
    elif type_code == _Q2_K:
        _fill_q2_k(w, r, n_cols, tw, i, tsc, tmn, td, tdm)
    elif type_code == _IQ4_XS:
        _fill_iq4_xs(w, r, n_cols, tw, i, tsc, td)
    else:
        _fill_32(type_code, w, r, n_cols, tw, i, td, tdm)


@njit(cache=True, nogil=True)
def new_tile(n_cols, n_subs, n_blocks):
    """(tw, tsc, tmn, td, tdm) for one tile; sub-block scales 1 and mins 0 until filled."""
    return (np.zeros((n_cols // 4, ROWS), dtype=np.uint32), np.ones((n_subs, ROWS), dtype=np.int32),
            np.zeros((n_subs, ROWS), dtype=np.int32), np.zeros((n_blocks, ROWS), dtype=np.float32),
            np.zeros((n_blocks, ROWS), dtype=np.float32))


@njit(cache=True, nogil=True)
def fill_tile(type_code, w, row0, n_cols, tile):
    """Rows row0 .. row0 + ROWS - 1 of W into the tile; lanes past the last row become zero
    weights (their results are not stored)."""
    tw, tsc, tmn, td, tdm = tile
    n_rows = min(ROWS, w.shape[0] - row0)
    for i in range(n_rows):
        _fill_row(type_code, w, row0 + i, n_cols, tw, i, tsc, tmn, td, tdm)
    for i in range(n_rows, ROWS):
        tw[:, i] = 0
        td[:, i] = 0.0
        tdm[:, i] = 0.0


def decode_rows(w: np.ndarray, ggml_type: int | QType, n_cols: int, n_sub: int, block: int):
    """The rows of W as the GEMM sees them, rows first: u uint8 (n_rows, n_cols), sc and mn
    int32 (n_rows, n_sub_blocks), d and dm float32 (n_rows, n_blocks)."""
    n_rows, n_blocks = w.shape[0], n_cols // block
    parts = []
    for row0 in range(0, n_rows, ROWS):
        tile = new_tile(n_cols, n_blocks * n_sub, n_blocks)
        fill_tile(int(ggml_type), w, row0, n_cols, tile)
        tw, tsc, tmn, td, tdm = tile
        u = tw.view(np.uint8).reshape(n_cols // 4, ROWS, 4).transpose(1, 0, 2).reshape(ROWS, n_cols)
        parts.append((u, tsc.T, tmn.T, td.T, tdm.T))
    return tuple(np.concatenate([p[k] for p in parts])[:n_rows] for k in range(5))
