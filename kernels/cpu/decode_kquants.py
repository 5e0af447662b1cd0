"""Row decoders for the 256-element super-block types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS.

Same contract as `kernels.cpu.decode_basic` (signature ``(w, r, n_cols, lanes, out, o)``,
bit-exact with `gguf.quants.dequantize`, `lanes` always 32 but unknown to the compiler).
Element indices below are within one 256-element super-block.

Numba widens integer arithmetic to 64 bits; where a decoder narrows a value to np.int8 or
np.uint8 just before converting it to float32, that lets LLVM vectorise the loop in narrow
lanes (several times faster), and it changes no value.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.cpu.decode_basic import IQ4_NL_VALUES, read_f16


# Q2_K, 84 bytes: scales[16] | qs[64] | d f16 | dmin f16.
# Element e = 128*half + 32*shift + l (l < 32) is bits 2*shift.. of qs[32*half + l]; it belongs
# to group e // 16, whose scale byte holds the multiplier (low nibble) and the min (high nibble);
# value = (d * sc) * q - dmin * m.
@njit(cache=True, nogil=True)
def decode_q2_k(w, r, n_cols, lanes, out, o):
    half_lanes = lanes >> 1
    for b in range(n_cols // 256):
        offset = b * 84
        d = read_f16(w, r, offset + 80)
        dmin = read_f16(w, r, offset + 82)
        for half in range(2):
            for shift in range(4):
                base = b * 256 + half * 128 + shift * 32
                group = half * 8 + shift * 2
                for part in range(2):
                    scale = np.int32(w[r, offset + group + part])
                    dl = d * np.float32(scale & 15)
                    ml = dmin * np.float32(scale >> 4)
                    q_offset = offset + 16 + half * 32 + part * half_lanes
                    e = base + part * half_lanes
                    for l in range(half_lanes):
                        q = (np.int32(w[r, q_offset + l]) >> (2 * shift)) & 3
                        out[o, e + l] = dl * np.float32(np.uint8(q)) - ml


@njit(cache=True, nogil=True)
def q3_k_scale(w, r, scales_offset, group):
    """Signed 6-bit scale of group 0..15: low 4 bits from bytes 0..7, high 2 bits from 8..11."""
    low_byte = np.int32(w[r, scales_offset + (group & 7)])
    low = (low_byte >> (4 * (group >> 3))) & 15
    high = (np.int32(w[r, scales_offset + 8 + (group & 3)]) >> (2 * (group >> 2))) & 3
    return (low | (high << 4)) - 32


# Q3_K, 110 bytes: hmask[32] | qs[64] | scales[12] | d f16.
# Element e = 128*half + 32*shift + l has low bits (qs[32*half + l] >> 2*shift) & 3 and a high
# bit (hmask[l] >> (4*half + shift)) & 1; a clear high bit means subtract 4.
# value = (d * scale) * (low - 4 * (1 - high)).
@njit(cache=True, nogil=True)
def decode_q3_k(w, r, n_cols, lanes, out, o):
    half_lanes = lanes >> 1
    for b in range(n_cols // 256):
        offset = b * 110
        d = read_f16(w, r, offset + 108)
        for half in range(2):
            for shift in range(4):
                base = b * 256 + half * 128 + shift * 32
                high_bit = half * 4 + shift
                for part in range(2):
                    group = half * 8 + shift * 2 + part
                    dl = d * np.float32(q3_k_scale(w, r, offset + 96, group))
                    q_offset = offset + 32 + half * 32 + part * half_lanes
                    h_offset = offset + part * half_lanes
                    e = base + part * half_lanes
                    for l in range(half_lanes):
                        low = (np.int32(w[r, q_offset + l]) >> (2 * shift)) & 3
                        high = (np.int32(w[r, h_offset + l]) >> high_bit) & 1
                        out[o, e + l] = dl * np.float32(np.int8(low - 4 + 4 * high))


@njit(cache=True, nogil=True)
def k_scale_min(w, r, scales_offset, j):
    """6-bit (scale, min) of sub-block j (0..7) from the 12 packed bytes of Q4_K and Q5_K.

    bytes 0-3: scale j (low 6 bits), top 2 bits go to scale j+4
    bytes 4-7: min j (low 6 bits), top 2 bits go to min j+4
    bytes 8-11: scale j+4 (low nibble) and min j+4 (high nibble), low 4 bits of each
    """
    if j < 4:
        scale = np.int32(w[r, scales_offset + j]) & 63
        minimum = np.int32(w[r, scales_offset + j + 4]) & 63
    else:
        packed = np.int32(w[r, scales_offset + j + 4])
        scale = (packed & 15) | ((np.int32(w[r, scales_offset + j - 4]) >> 6) << 4)
        minimum = (packed >> 4) | ((np.int32(w[r, scales_offset + j]) >> 6) << 4)
    return scale, minimum


# Q4_K, 144 bytes: d f16 | dmin f16 | scales[12] | qs[128].
# Sub-block j = 2*c + h (32 elements) is nibble h of qs[32*c .. 32*c + 31];
# value = (d * scale_j) * q - dmin * min_j.
@njit(cache=True, nogil=True)
def decode_q4_k(w, r, n_cols, lanes, out, o):
    for b in range(n_cols // 256):
        offset = b * 144
        d = read_f16(w, r, offset)
        dmin = read_f16(w, r, offset + 2)
        for j in range(8):
            scale, minimum = k_scale_min(w, r, offset + 4, j)
            dl = d * np.float32(scale)
            ml = dmin * np.float32(minimum)
            q_offset = offset + 16 + (j >> 1) * 32
            nibble_shift = 4 * (j & 1)
            e = b * 256 + j * 32
            for l in range(lanes):
                q = (np.int32(w[r, q_offset + l]) >> nibble_shift) & 15
                out[o, e + l] = dl * np.float32(np.uint8(q)) - ml


# Q5_K, 176 bytes: d f16 | dmin f16 | scales[12] | qh[32] | qs[128].
# As Q4_K, with a fifth bit (qh[l] >> j) & 1 for element l of sub-block j.
@njit(cache=True, nogil=True)
def decode_q5_k(w, r, n_cols, lanes, out, o):
    for b in range(n_cols // 256):
        offset = b * 176
        d = read_f16(w, r, offset)
        dmin = read_f16(w, r, offset + 2)
        for j in range(8):
            scale, minimum = k_scale_min(w, r, offset + 4, j)
            dl = d * np.float32(scale)
            ml = dmin * np.float32(minimum)
            q_offset = offset + 48 + (j >> 1) * 32
            nibble_shift = 4 * (j & 1)
            e = b * 256 + j * 32
            for l in range(lanes):
                low = (np.int32(w[r, q_offset + l]) >> nibble_shift) & 15
                high = (np.int32(w[r, offset + 16 + l]) >> j) & 1
                out[o, e + l] = dl * np.float32(np.uint8(low | (high << 4))) - ml


# Q6_K, 210 bytes: ql[128] | qh[64] | scales int8[16] | d f16.
# Element e = 128*a + 32*s + l (s < 4, l < 32): low 4 bits are nibble s // 2 of
# ql[64*a + 32*(s % 2) + l], high 2 bits are bits 2*s.. of qh[32*a + l]; group e // 16;
# value = (d * scale) * (q - 32).
@njit(cache=True, nogil=True)
def decode_q6_k(w, r, n_cols, lanes, out, o):
    half_lanes = lanes >> 1
    for b in range(n_cols // 256):
        offset = b * 210
        d = read_f16(w, r, offset + 208)
        for a in range(2):
            for s in range(4):
                low_offset = offset + a * 64 + (s & 1) * 32
                high_offset = offset + 128 + a * 32
                nibble_shift = 4 * (s >> 1)
                for part in range(2):
                    group = a * 8 + s * 2 + part
                    scale = np.int32(w[r, offset + 192 + group])
                    scale -= (scale & 128) << 1  # the byte is signed
                    dl = d * np.float32(scale)
                    e = b * 256 + a * 128 + s * 32 + part * half_lanes
                    low_part = low_offset + part * half_lanes
                    high_part = high_offset + part * half_lanes
                    for l in range(half_lanes):
                        low = (w[r, low_part + l] >> nibble_shift) & 15
                        high = (w[r, high_part + l] >> (2 * s)) & 3
                        out[o, e + l] = dl * np.float32(np.int8((low | (high << 4)) - 32))


# IQ4_XS, 136 bytes: d f16 | scales_h u16 | scales_l[4] | qs[128].
# Sub-block ib (32 elements) has the 6-bit scale (nibble ib % 2 of scales_l[ib // 2]) |
# (bits 2*ib.. of scales_h) << 4, minus 32; element l < 16 is the low nibble of qs[16*ib + l],
# element 16 + l its high nibble; value = (d * scale) * IQ4_NL_VALUES[q].
@njit(cache=True, nogil=True)
def decode_iq4_xs(w, r, n_cols, lanes, out, o):
    half_lanes = lanes >> 1
    for b in range(n_cols // 256):
        offset = b * 136
        d = read_f16(w, r, offset)
        scales_high = np.int32(w[r, offset + 2]) | (np.int32(w[r, offset + 3]) << 8)
        for ib in range(8):
            low = (np.int32(w[r, offset + 4 + (ib >> 1)]) >> (4 * (ib & 1))) & 15
            high = (scales_high >> (2 * ib)) & 3
            dl = d * np.float32((low | (high << 4)) - 32)
            q_offset = offset + 8 + ib * 16
            e = b * 256 + ib * 32
            for l in range(half_lanes):
                q = np.int32(w[r, q_offset + l])
                out[o, e + l] = dl * IQ4_NL_VALUES[q & 15]
                out[o, e + half_lanes + l] = dl * IQ4_NL_VALUES[q >> 4]
