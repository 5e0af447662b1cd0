"""Quantizing float32 rows into ggml blocks, for KV cache rows written every token.

`quantize_rows` produces the bytes ggml's reference quantizers produce
(ggml-quants.c `quantize_row_q8_0_ref`, `_q4_0_ref`, `_q4_1_ref`, `_q5_0_ref`, `_q5_1_ref`,
`_iq4_nl_ref`; F16 and BF16 round to nearest even as `GGML_FP32_TO_FP16` and
`GGML_FP32_TO_BF16` do): the same float32 operations in the same order, without fused
multiply-adds. `kernels.cpu.decode.dequantize_rows` reads them back.

One difference cannot be matched: for an IQ4_NL block whose largest magnitude is below 1e-15
the reference leaves the 4-bit indices as whatever its scratch buffer held; here they are the
previous block's indices of the same row (zeros for the first). The block's scale is 0 either
way, so every value still reads back as zero.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from numba import njit, prange

from kernels.cpu.decode_basic import IQ4_NL_VALUES
from kernels.cpu.formats import as_ggml_type, f32_to_bf16_bits, f32_to_f16_bits, read_only, row_bytes

QUANTIZE_TYPES = frozenset(
    QType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")
)

_F32, _F16, _BF16 = int(QType.F32), int(QType.F16), int(QType.BF16)
_Q8_0, _Q4_0, _Q4_1, _Q5_0, _Q5_1 = (int(QType[n]) for n in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"))
_IQ4_NL = int(QType.IQ4_NL)
_IQ4_NL_GROUP_MAX_EPS = np.float32(1e-15)


@njit(cache=True, nogil=True, inline="always")
def _write_f16(dst, offset, value):
    bits = f32_to_f16_bits(value)
    dst[offset] = np.uint8(bits & 0xFF)
    dst[offset + 1] = np.uint8(bits >> 8)


@njit(cache=True, nogil=True, inline="always")
def _round_half_away(v):
    """C's roundf for a float32, exactly (a - floor(a) is exact, so no double rounding)."""
    magnitude = np.float32(abs(v))
    whole = np.float32(np.floor(magnitude))
    if magnitude - whole >= np.float32(0.5):
        whole += np.float32(1.0)
    return -whole if v < 0 else whole


@njit(cache=True, nogil=True)
def _signed_max(x, start):
    """The value of largest magnitude in x[start:start + 32] (first one on ties)."""
    amax = np.float32(0.0)
    max_value = np.float32(0.0)
    for j in range(32):
        v = x[start + j]
        if amax < abs(v):
            amax = np.float32(abs(v))
            max_value = v
    return max_value


@njit(cache=True, nogil=True)
def _min_max(x, start):
    lowest = np.float32(np.inf)  # the reference starts from +-FLT_MAX; same result
    highest = np.float32(-np.inf)
    for j in range(32):
        v = x[start + j]
        if v < lowest:
            lowest = v
        if v > highest:
            highest = v
    return lowest, highest


@njit(cache=True, nogil=True)
def _reciprocal(d):
    return np.float32(1.0) / d if d != 0 else np.float32(0.0)


@njit(cache=True, nogil=True)
def _quantize_q8_0(x, dst, n_blocks):
    for b in range(n_blocks):
        start, offset = b * 32, b * 34
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, np.float32(abs(x[start + j])))
        d = amax / np.float32(127.0)
        inverse = _reciprocal(d)
        _write_f16(dst, offset, d)
        for j in range(32):
            q = np.int32(_round_half_away(x[start + j] * inverse))
            dst[offset + 2 + j] = np.uint8(q & 0xFF)


@njit(cache=True, nogil=True)
def _quantize_q4_0(x, dst, n_blocks):
    for b in range(n_blocks):
        start, offset = b * 32, b * 18
        d = _signed_max(x, start) / np.float32(-8.0)
        inverse = _reciprocal(d)
        _write_f16(dst, offset, d)
        for j in range(16):
            q0 = min(15, np.int32(x[start + j] * inverse + np.float32(8.5)))
            q1 = min(15, np.int32(x[start + 16 + j] * inverse + np.float32(8.5)))
            dst[offset + 2 + j] = np.uint8(q0 | (q1 << 4))


@njit(cache=True, nogil=True)
def _quantize_q4_1(x, dst, n_blocks):
    for b in range(n_blocks):
        start, offset = b * 32, b * 20
        lowest, highest = _min_max(x, start)
        d = (highest - lowest) / np.float32(15.0)
        inverse = _reciprocal(d)
        _write_f16(dst, offset, d)
        _write_f16(dst, offset + 2, lowest)
        for j in range(16):
            q0 = min(15, np.int32((x[start + j] - lowest) * inverse + np.float32(0.5)))
            q1 = min(15, np.int32((x[start + 16 + j] - lowest) * inverse + np.float32(0.5)))
            dst[offset + 4 + j] = np.uint8(q0 | (q1 << 4))


@njit(cache=True, nogil=True)
def _write_q5_bits(dst, offset, j, q0, q1, high_bits):
    """Low nibbles of elements j and j+16 into qs[j]; their fifth bits into high_bits."""
    dst[offset + j] = np.uint8((q0 & 15) | ((q1 & 15) << 4))
    fifth_bits = (np.uint32(q0 >> 4) << np.uint32(j)) | (np.uint32(q1 >> 4) << np.uint32(j + 16))
    return high_bits | fifth_bits


@njit(cache=True, nogil=True)
def _write_u32(dst, offset, value):
    for i in range(4):
        dst[offset + i] = np.uint8((value >> np.uint32(8 * i)) & np.uint32(0xFF))


@njit(cache=True, nogil=True)
def _quantize_q5_0(x, dst, n_blocks):
    for b in range(n_blocks):
        start, offset = b * 32, b * 22
        d = _signed_max(x, start) / np.float32(-16.0)
        inverse = _reciprocal(d)
        _write_f16(dst, offset, d)
        high_bits = np.uint32(0)
        for j in range(16):
            q0 = min(31, np.int32(x[start + j] * inverse + np.float32(16.5)))
            q1 = min(31, np.int32(x[start + 16 + j] * inverse + np.float32(16.5)))
            high_bits = _write_q5_bits(dst, offset + 6, j, q0, q1, high_bits)
        _write_u32(dst, offset + 2, high_bits)


@njit(cache=True, nogil=True)
def _quantize_q5_1(x, dst, n_blocks):
    for b in range(n_blocks):
        start, offset = b * 32, b * 24
        lowest, highest = _min_max(x, start)
        d = (highest - lowest) / np.float32(31.0)
        inverse = _reciprocal(d)
        _write_f16(dst, offset, d)
        _write_f16(dst, offset + 2, lowest)
        high_bits = np.uint32(0)
        for j in range(16):  # the reference has no clamp here: (uint8_t)(x0 + 0.5f)
            q0 = np.int32((x[start + j] - lowest) * inverse + np.float32(0.5)) & 0xFF
            q1 = np.int32((x[start + 16 + j] - lowest) * inverse + np.float32(0.5)) & 0xFF
            high_bits = _write_q5_bits(dst, offset + 8, j, q0, q1, high_bits)
        _write_u32(dst, offset + 4, high_bits)


@njit(cache=True, nogil=True)
def _nearest_iq4_nl_index(v):
    """Index of the IQ4_NL value nearest v; ties and bisection as ggml's best_index_int8."""
    if v <= IQ4_NL_VALUES[0]:
        return 0
    if v >= IQ4_NL_VALUES[15]:
        return 15
    lower, upper = 0, 15
    while upper - lower > 1:
        middle = (lower + upper) // 2
        if v < IQ4_NL_VALUES[middle]:
            upper = middle
        else:
            lower = middle
    return upper - 1 if v - IQ4_NL_VALUES[upper - 1] < IQ4_NL_VALUES[upper] - v else upper


@njit(cache=True, nogil=True)
def _quantize_iq4_nl(x, dst, n_blocks):
    indices = np.zeros(32, dtype=np.int32)
    for b in range(n_blocks):
        start, offset = b * 32, b * 18
        amax = np.float32(0.0)
        max_value = np.float32(0.0)
        for j in range(32):
            if abs(x[start + j]) > amax:
                amax = np.float32(abs(x[start + j]))
                max_value = x[start + j]
        d = np.float32(0.0)
        if amax >= _IQ4_NL_GROUP_MAX_EPS:
            d = _iq4_nl_block_scale(x, start, max_value, indices)
        _write_f16(dst, offset, d)
        for j in range(16):
            dst[offset + 2 + j] = np.uint8(indices[j] | (indices[16 + j] << 4))


@njit(cache=True, nogil=True)
def _iq4_nl_block_scale(x, start, max_value, indices):
    """Nearest indices for the scale max/-127, then the weighted (x**2) least-squares scale."""
    inverse = np.float32(1.0) / (max_value / IQ4_NL_VALUES[0])
    sum_qx = np.float32(0.0)
    sum_q2 = np.float32(0.0)
    for j in range(32):
        v = x[start + j]
        index = _nearest_iq4_nl_index(inverse * v)
        indices[j] = index
        q = IQ4_NL_VALUES[index]
        weight = v * v
        sum_qx += weight * q * v
        sum_q2 += weight * q * q
    return sum_qx / sum_q2 if sum_q2 > 0 else np.float32(0.0)


@njit(cache=True, nogil=True)
def _quantize_row(type_code, x, dst):
    n_cols = x.shape[0]
    if type_code == _Q8_0:
        _quantize_q8_0(x, dst, n_cols // 32)
    elif type_code == _F16:
        half = dst.view(np.uint16)
        for k in range(n_cols):
            half[k] = f32_to_f16_bits(x[k])
    elif type_code == _BF16:
        half = dst.view(np.uint16)
        for k in range(n_cols):
            half[k] = f32_to_bf16_bits(x[k])
    elif type_code == _F32:
        dst.view(np.float32)[:] = x
    elif type_code == _Q4_0:
        _quantize_q4_0(x, dst, n_cols // 32)
    elif type_code == _Q4_1:
        _quantize_q4_1(x, dst, n_cols // 32)
    elif type_code == _Q5_0:
        _quantize_q5_0(x, dst, n_cols // 32)
    elif type_code == _Q5_1:
        _quantize_q5_1(x, dst, n_cols // 32)
    elif type_code == _IQ4_NL:
        _quantize_iq4_nl(x, dst, n_cols // 32)


@njit(cache=True, nogil=True, parallel=True)
def _quantize_kernel(x, type_code, out):
    for r in prange(x.shape[0]):
        _quantize_row(type_code, x[r], out[r])


def quantize_rows(
    x_f32: np.ndarray,
    ggml_type: int | QType,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """float32 rows (n, n_cols) as ggml blocks, uint8 (n, row_bytes); one row may be 1-D.

    ggml_type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or IQ4_NL. out: optional
    C-ordered uint8 (n, row_bytes) to write into (for instance rows of a KV cache).
    """
    qtype = as_ggml_type(ggml_type)
    if qtype not in QUANTIZE_TYPES:
        supported = ", ".join(sorted(t.name for t in QUANTIZE_TYPES))
        raise ValueError(f"cannot quantize to {qtype.name}; supported: {supported}")
    x = np.ascontiguousarray(x_f32, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"expected rows of shape (n, n_cols), got {x.shape}")
    shape = (x.shape[0], row_bytes(qtype, x.shape[1]))
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-ordered uint8 array of shape {shape}")
    _quantize_kernel(read_only(x), int(qtype), out)
    return out
