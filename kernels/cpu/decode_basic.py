"""Row decoders for the float types and the 32-element block types (Q4_0 .. Q8_0, IQ4_NL).

Every decoder has the signature ``(w, r, n_cols, lanes, out, o)``: it writes row r of the
weight bytes w (uint8, rows first) as n_cols float32 values into out[o]. Values are bit-exact
with `gguf.quants.dequantize`: the same float32 operations in the same order, and no fused
multiply-add (these functions are compiled without fastmath).

`lanes` is always 32. It is passed at run time on purpose: a loop whose bound the compiler
cannot see stays a loop that LLVM vectorises, where a constant 32 gets fully unrolled into
scalar code that the aliasing between `w` and `out` keeps from being vectorised.
"""

from __future__ import annotations

import numpy as np
from gguf.quants import IQ4_NL
from numba import njit

from kernels.cpu.formats import f16_bits_to_f32

IQ4_NL_VALUES = np.array(IQ4_NL.kvalues, dtype=np.float32)


@njit(cache=True, nogil=True, inline="always")
def read_f16(w, r, offset):
    """The little-endian float16 at byte offset of row r, as float32."""
    return f16_bits_to_f32(np.uint32(w[r, offset]) | (np.uint32(w[r, offset + 1]) << np.uint32(8)))


@njit(cache=True, nogil=True)
def decode_f32(w, r, n_cols, lanes, out, o):
    src = w[r].view(np.float32)
    for k in range(n_cols):
        out[o, k] = src[k]


@njit(cache=True, nogil=True)
def decode_f16(w, r, n_cols, lanes, out, o):
    src = w[r].view(np.uint16)
    for k in range(n_cols):
        out[o, k] = f16_bits_to_f32(src[k])


@njit(cache=True, nogil=True)
def decode_bf16(w, r, n_cols, lanes, out, o):
    src = w[r].view(np.uint16)
    for k in range(n_cols):
        out[o, k] = np.uint32(np.uint32(src[k]) << np.uint32(16)).view(np.float32)


# Q4_0 block, 18 bytes: d f16 | qs[16]; element j is the low nibble of qs[j], element j+16 its
# high nibble; value = d * (q - 8).
@njit(cache=True, nogil=True)
def decode_q4_0(w, r, n_cols, lanes, out, o):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset = b * 18
        d = read_f16(w, r, offset)
        base = b * 32
        for j in range(half):
            q = np.int32(w[r, offset + 2 + j])
            out[o, base + j] = d * np.float32((q & 15) - 8)
            out[o, base + half + j] = d * np.float32((q >> 4) - 8)


# Q4_1 block, 20 bytes: d f16 | m f16 | qs[16]; value = d * q + m.
@njit(cache=True, nogil=True)
def decode_q4_1(w, r, n_cols, lanes, out, o):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset = b * 20
        d = read_f16(w, r, offset)
        m = read_f16(w, r, offset + 2)
        base = b * 32
        for j in range(half):
            q = np.int32(w[r, offset + 4 + j])
            out[o, base + j] = d * np.float32(q & 15) + m
            out[o, base + half + j] = d * np.float32(q >> 4) + m


# Q5_0 block, 22 bytes: d f16 | qh u32 | qs[16]; bit j of qh is the fifth bit of element j;
# value = d * (q - 16).
@njit(cache=True, nogil=True)
def decode_q5_0(w, r, n_cols, lanes, out, o):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset = b * 22
        d = read_f16(w, r, offset)
        qh = np.int64(w[r, offset + 2]) | (np.int64(w[r, offset + 3]) << 8)
        qh |= (np.int64(w[r, offset + 4]) << 16) | (np.int64(w[r, offset + 5]) << 24)
        base = b * 32
        for j in range(half):
            q = np.int64(w[r, offset + 6 + j])
            low = (q & 15) | (((qh >> j) & 1) << 4)
            high = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[o, base + j] = d * np.float32(np.int8(low - 16))
            out[o, base + half + j] = d * np.float32(np.int8(high - 16))


# Q5_1 block, 24 bytes: d f16 | m f16 | qh u32 | qs[16]; value = d * q + m.
@njit(cache=True, nogil=True)
def decode_q5_1(w, r, n_cols, lanes, out, o):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset = b * 24
        d = read_f16(w, r, offset)
        m = read_f16(w, r, offset + 2)
        qh = np.int64(w[r, offset + 4]) | (np.int64(w[r, offset + 5]) << 8)
        qh |= (np.int64(w[r, offset + 6]) << 16) | (np.int64(w[r, offset + 7]) << 24)
        base = b * 32
        for j in range(half):
            q = np.int64(w[r, offset + 8 + j])
            low = (q & 15) | (((qh >> j) & 1) << 4)
            high = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[o, base + j] = d * np.float32(np.uint8(low)) + m
            out[o, base + half + j] = d * np.float32(np.uint8(high)) + m


# Q8_0 block, 34 bytes: d f16 | qs int8[32]; value = q * d.
@njit(cache=True, nogil=True)
def decode_q8_0(w, r, n_cols, lanes, out, o):
    for b in range(n_cols // 32):
        offset = b * 34
        d = read_f16(w, r, offset)
        base = b * 32
        for j in range(lanes):
            q = np.int32(w[r, offset + 2 + j])
            q -= (q & 128) << 1  # the byte is signed
            out[o, base + j] = np.float32(q) * d


# IQ4_NL block, 18 bytes: d f16 | qs[16], nibbles as in Q4_0; value = d * IQ4_NL_VALUES[q].
@njit(cache=True, nogil=True)
def decode_iq4_nl(w, r, n_cols, lanes, out, o):
    half = lanes >> 1
    for b in range(n_cols // 32):
        offset = b * 18
        d = read_f16(w, r, offset)
        base = b * 32
        for j in range(half):
            q = np.int32(w[r, offset + 2 + j])
            out[o, base + j] = d * IQ4_NL_VALUES[q & 15]
            out[o, base + half + j] = d * IQ4_NL_VALUES[q >> 4]
