"""Activation rows quantized once per matmul, as llama.cpp's CPU backend quantizes them.

llama.cpp multiplies a quantized weight with activations quantized to the weight type's
`vec_dot_type`; these are those quantizers, producing int8 values and float32 block scales:

    Q8_0 (for Q4_0, Q5_0, Q8_0, IQ4_NL; and Q8_1 for Q4_1, Q5_1, whose values are the same):
        blocks of 32; d = max|x| / 127 (stored as f16), q = round-half-even(x * 127 / max|x|)
        as the x86 `quantize_row_q8_0` / `_q8_1` do; Q8_1 also keeps s = f16(d * sum q).
    Q8_K (for the K-quants and IQ4_XS): blocks of 256, `quantize_row_q8_K_ref`: iscale =
        -127 / (the value of largest magnitude), q = min(127, round-half-even(x * iscale)),
        d = 1 / iscale (float32), and the sums of q over each 16 elements (bsums).

Rounding half to even is done by adding and subtracting 1.5 * 2**23, as ggml's nearest_int
does; it is exact for |v| < 2**22, and here |v| <= 127.5.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.cpu.formats import f16_bits_to_f32, f32_to_f16_bits

_ROUNDING_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


@njit(cache=True, nogil=True, inline="always")
def _round_half_even(v):
    return np.int32(np.float32(np.float32(v + _ROUNDING_MAGIC) - _ROUNDING_MAGIC))


@njit(cache=True, nogil=True, inline="always")
def _f32_of_bits(bits):
    return np.int32(bits).view(np.float32)


@njit(cache=True, nogil=True, inline="always")
def _f16_rounded(v):
    return f16_bits_to_f32(f32_to_f16_bits(v))


_MAGNITUDE_BITS = np.int32(0x7FFFFFFF)
_SIGN_BIT = np.int32(-0x80000000)


@njit(cache=True, nogil=True)
def _largest_magnitude_bits(bits, start, n):
    """The bits of max |x| over x[start:start + n] given as int32 bits: for floats without the
    sign the integer order is the float order, and an integer max vectorises."""
    amax = np.int32(0)
    for j in range(start, start + n):
        amax = max(amax, bits[j] & _MAGNITUDE_BITS)
    return amax


@njit(cache=True, nogil=True)
def quantize_row_q8_0(x, q, d, s):
    """One row: q int8 (n,), d and s float32 (n // 32,)."""
    for b in range(x.shape[0] // 32):
        start = b * 32
        amax = np.float32(_f32_of_bits(_largest_magnitude_bits(x.view(np.int32), start, 32)))
        scale = amax / np.float32(127.0)
        inverse = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        total = np.int32(0)
        for j in range(start, start + 32):
            v = _round_half_even(x[j] * inverse)
            q[j] = np.int8(v)
            total += v
        d[b] = _f16_rounded(scale)
        s[b] = _f16_rounded(scale * np.float32(total))


@njit(cache=True, nogil=True)
def _largest(x, start, n):
    """The value of largest magnitude; where +m and -m both occur, the first of them (ggml's
    scan keeps the first strictly larger magnitude)."""
    bits = x.view(np.int32)
    amax = _largest_magnitude_bits(bits, start, n)
    positive = negative = False
    for j in range(start, start + n):
        positive |= bits[j] == amax
        negative |= bits[j] == (amax | _SIGN_BIT)
    if positive and negative:
        for j in range(start, start + n):
            if bits[j] & _MAGNITUDE_BITS == amax:
                return x[j]
    magnitude = _f32_of_bits(amax)
    return magnitude if positive else -magnitude


@njit(cache=True, nogil=True)
def quantize_row_q8_k(x, q, d, bsums):
    """One row: q int8 (n,), d float32 (n // 256,), bsums float32 (n // 16,), whole numbers."""
    for b in range(x.shape[0] // 256):
        start = b * 256
        largest = _largest(x, start, 256)
        iscale = np.float32(-127.0) / largest if largest != 0 else np.float32(0.0)
        for j in range(start, start + 256):
            q[j] = np.int8(min(127, _round_half_even(iscale * x[j])))
        for g in range(16):
            total = np.int32(0)
            for j in range(start + g * 16, start + g * 16 + 16):
                total += np.int32(q[j])
            bsums[b * 16 + g] = np.float32(total)
        d[b] = np.float32(1.0) / iscale if largest != 0 else np.float32(0.0)


@njit(cache=True, nogil=True)
def _quantize_token(x, t, k_blocks, q, d, sums):
    if k_blocks:
        quantize_row_q8_k(x[t], q[t], d[t], sums[t])
    else:
        quantize_row_q8_0(x[t], q[t], d[t], sums[t])


@njit(cache=True, nogil=True)
def _token_min_sums(t, d, bsums, min_sums):
    """What a K-quant weight's min factors multiply: Q8_K's d * bsum per 16 values."""
    for j in range(bsums.shape[1]):
        min_sums[t, j] = bsums[t, j] * d[t, j // 16]


@njit(cache=True, nogil=True)
def q8_k_min_sums(d, bsums, min_sums):
    """min_sums (n_tokens, n_cols // 16) of Q8_K activations: d * bsum of each 16 values."""
    for t in range(bsums.shape[0]):
        _token_min_sums(t, d, bsums, min_sums)


@njit(cache=True, nogil=True)
def quantize_one_token(x, k_blocks, q, d, sums, min_sums):
    """quantize_activations for a single row, without starting the thread pool (decode), and
    for Q8_K its min_sums (q8_k_min_sums) in the same call."""
    _quantize_token(x, 0, k_blocks, q, d, sums)
    if k_blocks:
        _token_min_sums(0, d, sums, min_sums)


@njit(cache=True, nogil=True, parallel=True)
def _quantize_rows_parallel(x, k_blocks, q, d, sums):
    for t in prange(x.shape[0]):
        _quantize_token(x, t, k_blocks, q, d, sums)


@njit(cache=True, nogil=True)
def _quantize_rows_serial(x, k_blocks, q, d, sums):
    for t in range(x.shape[0]):
        _quantize_token(x, t, k_blocks, q, d, sums)


# Below this many values one thread quantizes faster than waking the pool (about 0.1 ms of
# work; a parallel region costs tens of microseconds, far more on a busy machine).
PARALLEL_MIN_VALUES = 1 << 18


def quantize_activations(x, k_blocks, q, d, sums):
    """All rows of x (n_tokens, n_cols): to Q8_K when k_blocks, else to Q8_0 / Q8_1.

    q int8 (n_tokens, n_cols); d float32 (n_tokens, n_cols // block); sums float32: Q8_1's s
    (n_tokens, n_cols // 32) or Q8_K's bsums (n_tokens, n_cols // 16; whole numbers below
    2**11, exact in float32 like every product and sum the min terms make of them)."""
    rows = _quantize_rows_parallel if x.size >= PARALLEL_MIN_VALUES else _quantize_rows_serial
    rows(x, k_blocks, q, d, sums)
