"""Weight rows unpacked to small integers for the integer dot products of `qmatmul`.

A row of a quantized weight is, per block, `d * (integer values)` (minus `dmin * min` for the
types with mins, which `qmatmul` reads from the row itself). The unpackers write the integer
values, with every sub-block scale that is itself an integer already multiplied in, so that
one int8 x int16 multiply-add per element and one float scale per block (`d`, read in place
from the row) give the row's dot product:

    32-element types (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL)  -> int8 tile row, one `d` per 32
    256-element types (Q2_K .. Q6_K, IQ4_XS)           -> int16 tile row: q * sub-block scale,
                                                          one `d` per 256

Q8_0 needs no unpacking (its int8 values are read in place). The values written are exactly
ggml's: `unpacked * d` (- `min * dmin`) equals `gguf.quants.dequantize` up to float rounding,
and the tests check the integers themselves against gguf's dequantized values. They are the
prefill path's tiles and the reference the fused decode kernels (`blockdot`) are tested with.

Same signature habits as the decoders (`decode_basic`): row r of w (uint8, rows first), `lanes`
is 32 but passed at run time so that the loops stay loops LLVM vectorises.
"""

from __future__ import annotations

import numpy as np
from gguf.quants import IQ4_NL
from numba import njit

from kernels.cpu.decode_kquants import k_scale_min, q3_k_scale

IQ4_NL_INTS = np.array(IQ4_NL.kvalues, dtype=np.int8)


@njit(cache=True, nogil=True)
def _read_u32(w, r, offset):
    value = np.int64(w[r, offset]) | (np.int64(w[r, offset + 1]) << 8)
    return value | (np.int64(w[r, offset + 2]) << 16) | (np.int64(w[r, offset + 3]) << 24)


# Q4_0, 18 bytes: d | qs[16]; element j the low nibble of qs[j], j + 16 its high one; q - 8.
@njit(cache=True, nogil=True)
def unpack_q4_0(w, r, n_cols, lanes, tile, i):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset, base = b * 18 + 2, b * 32
        for j in range(half):
            q = np.int32(w[r, offset + j])
            tile[i, base + j] = np.int8((q & 15) - 8)
            tile[i, base + half + j] = np.int8((q >> 4) - 8)


# Q4_1, 20 bytes: d | m | qs[16]; q in 0..15 (the min m is applied through the activation sums).
@njit(cache=True, nogil=True)
def unpack_q4_1(w, r, n_cols, lanes, tile, i):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset, base = b * 20 + 4, b * 32
        for j in range(half):
            q = np.int32(w[r, offset + j])
            tile[i, base + j] = np.int8(q & 15)
            tile[i, base + half + j] = np.int8(q >> 4)


# Q5_0, 22 bytes: d | qh u32 | qs[16]; bit j of qh is element j's fifth bit; q - 16.
@njit(cache=True, nogil=True)
def unpack_q5_0(w, r, n_cols, lanes, tile, i):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset, base = b * 22, b * 32
        qh = _read_u32(w, r, offset + 2)
        for j in range(half):
            q = np.int64(w[r, offset + 6 + j])
            tile[i, base + j] = np.int8(((q & 15) | (((qh >> j) & 1) << 4)) - 16)
            tile[i, base + half + j] = np.int8(((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16)


# Q5_1, 24 bytes: d | m | qh u32 | qs[16]; q in 0..31.
@njit(cache=True, nogil=True)
def unpack_q5_1(w, r, n_cols, lanes, tile, i):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset, base = b * 24, b * 32
        qh = _read_u32(w, r, offset + 4)
        for j in range(half):
            q = np.int64(w[r, offset + 8 + j])
            tile[i, base + j] = np.int8((q & 15) | (((qh >> j) & 1) << 4))
            tile[i, base + half + j] = np.int8((q >> 4) | (((qh >> (j + 16)) & 1) << 4))


# IQ4_NL, 18 bytes: d | qs[16], nibbles as Q4_0; value IQ4_NL_INTS[q].
@njit(cache=True, nogil=True)
def unpack_iq4_nl(w, r, n_cols, lanes, tile, i):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset, base = b * 18 + 2, b * 32
        for j in range(half):
            q = np.int32(w[r, offset + j])
            tile[i, base + j] = IQ4_NL_INTS[q & 15]
            tile[i, base + half + j] = IQ4_NL_INTS[q >> 4]


# Q4_K, 144 bytes: d | dmin | scales[12] | qs[128]; sub-block j (32 elements) is nibble j % 2 of
# qs[32 * (j // 2) ...]; value = d * scale_j * q - dmin * min_j.
@njit(cache=True, nogil=True)
def unpack_q4_k(w, r, n_cols, lanes, tile, i):
    for b in range(n_cols // 256):
        offset = b * 144
        for j in range(8):
            scale = k_scale_min(w, r, offset + 4, j)[0]
            q_offset = offset + 16 + (j >> 1) * 32
            nibble_shift = 4 * (j & 1)
            e = b * 256 + j * 32
            for l in range(lanes):
                q = (np.int32(w[r, q_offset + l]) >> nibble_shift) & 15
                tile[i, e + l] = np.int16(q * scale)


# Q5_K, 176 bytes: d | dmin | scales[12] | qh[32] | qs[128]; Q4_K with fifth bits (qh[l] >> j) & 1.
@njit(cache=True, nogil=True)
def unpack_q5_k(w, r, n_cols, lanes, tile, i):
    for b in range(n_cols // 256):
        offset = b * 176
        for j in range(8):
            scale = k_scale_min(w, r, offset + 4, j)[0]
            q_offset = offset + 48 + (j >> 1) * 32
            nibble_shift = 4 * (j & 1)
            e = b * 256 + j * 32
            for l in range(lanes):
                low = (np.int32(w[r, q_offset + l]) >> nibble_shift) & 15
                high = (np.int32(w[r, offset + 16 + l]) >> j) & 1
                tile[i, e + l] = np.int16((low | (high << 4)) * scale)


# Q6_K, 210 bytes: ql[128] | qh[64] | scales int8[16] | d; value = d * scale * (q - 32), the
# layout of decode_kquants.decode_q6_k.
@njit(cache=True, nogil=True)
def unpack_q6_k(w, r, n_cols, lanes, tile, i):
    half_lanes = lanes >> 1
    for b in range(n_cols // 256):
        offset = b * 210
        for a in range(2):
            for s in range(4):
                low_offset = offset + a * 64 + (s & 1) * 32
                high_offset = offset + 128 + a * 32
                nibble_shift = 4 * (s >> 1)
                for part in range(2):
                    group = a * 8 + s * 2 + part
                    scale = np.int32(w[r, offset + 192 + group])
                    scale -= (scale & 128) << 1  # the byte is signed
                    e = b * 256 + a * 128 + s * 32 + part * half_lanes
                    low_part = low_offset + part * half_lanes
                    high_part = high_offset + part * half_lanes
                    for l in range(half_lanes):
                        low = (np.int32(w[r, low_part + l]) >> nibble_shift) & 15
                        high = (np.int32(w[r, high_part + l]) >> (2 * s)) & 3
                        tile[i, e + l] = np.int16(((low | (high << 4)) - 32) * scale)


# Q2_K, 84 bytes: scales[16] | qs[64] | d | dmin; group g (16 elements) has scale byte g
# (multiplier low nibble, min high nibble); layout of decode_kquants.decode_q2_k.
@njit(cache=True, nogil=True)
def unpack_q2_k(w, r, n_cols, lanes, tile, i):
    half_lanes = lanes >> 1
    for b in range(n_cols // 256):
        offset = b * 84
        for half in range(2):
            for shift in range(4):
                base = b * 256 + half * 128 + shift * 32
                group = half * 8 + shift * 2
                for part in range(2):
                    scale = np.int32(w[r, offset + group + part])
                    q_offset = offset + 16 + half * 32 + part * half_lanes
                    e = base + part * half_lanes
                    for l in range(half_lanes):
                        q = (np.int32(w[r, q_offset + l]) >> (2 * shift)) & 3
                        tile[i, e + l] = np.int16(q * (scale & 15))


# Q3_K, 110 bytes: hmask[32] | qs[64] | scales[12] | d; layout of decode_kquants.decode_q3_k.
@njit(cache=True, nogil=True)
def unpack_q3_k(w, r, n_cols, lanes, tile, i):
    half_lanes = lanes >> 1
    for b in range(n_cols // 256):
        offset = b * 110
        for half in range(2):
            for shift in range(4):
                base = b * 256 + half * 128 + shift * 32
                high_bit = half * 4 + shift
                for part in range(2):
                    group = half * 8 + shift * 2 + part
                    scale = q3_k_scale(w, r, offset + 96, group)
                    q_offset = offset + 32 + half * 32 + part * half_lanes
                    h_offset = offset + part * half_lanes
                    e = base + part * half_lanes
                    for l in range(half_lanes):
                        low = (np.int32(w[r, q_offset + l]) >> (2 * shift)) & 3
                        high = (np.int32(w[r, h_offset + l]) >> high_bit) & 1
                        tile[i, e + l] = np.int16((low - 4 + 4 * high) * scale)


# IQ4_XS, 136 bytes: d | scales_h u16 | scales_l[4] | qs[128]; 6-bit scale - 32 per 32 elements;
# values IQ4_NL_INTS[q], layout of decode_kquants.decode_iq4_xs.
@njit(cache=True, nogil=True)
def unpack_iq4_xs(w, r, n_cols, lanes, tile, i):
    half_lanes = lanes >> 1
    for b in range(n_cols // 256):
        offset = b * 136
        scales_high = np.int32(w[r, offset + 2]) | (np.int32(w[r, offset + 3]) << 8)
        for ib in range(8):
            low = (np.int32(w[r, offset + 4 + (ib >> 1)]) >> (4 * (ib & 1))) & 15
            high = (scales_high >> (2 * ib)) & 3
            scale = (low | (high << 4)) - 32
            q_offset = offset + 8 + ib * 16
            e = b * 256 + ib * 32
            for l in range(half_lanes):
                q = np.int32(w[r, q_offset + l])
                tile[i, e + l] = np.int16(np.int32(IQ4_NL_INTS[q & 15]) * scale)
                tile[i, e + half_lanes + l] = np.int16(np.int32(IQ4_NL_INTS[q >> 4]) * scale)
