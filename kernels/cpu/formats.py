"""ggml block formats: row sizes, and exact scalar conversions shared by the CPU kernels.

Block sizes come from `gguf.constants.GGML_QUANT_SIZES` (elements per block, bytes per block).
The half-precision conversions here are written with bit operations so that Numba can vectorise
them. They are bit-exact with NumPy's casts: float16 -> float32 for all 65536 halves, and
float32 -> float16/bfloat16 (round to nearest even) for every non-NaN value; a NaN becomes a
quiet NaN, as in ggml.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

# Types whose rows the Numba kernels decode directly; every other type that
# gguf.quants can dequantize goes through the slower tile path.
FAST_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16",
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
        "IQ4_NL", "IQ4_XS",
    )
)


_TYPE_BY_VALUE = {int(t): t for t in GGMLQuantizationType}

# bytes per block by type code, for kernels that pick a type's layout at run time (a global array
# is a compile-time constant to Numba)
_BLOCK_BYTES = np.zeros(max(int(t) for t in GGML_QUANT_SIZES) + 1, dtype=np.int64)
for _type, (_, _type_size) in GGML_QUANT_SIZES.items():
    _BLOCK_BYTES[int(_type)] = _type_size


@njit(cache=True, nogil=True)
def block_bytes(type_code):
    """Bytes of one block of the ggml type with this code."""
    return _BLOCK_BYTES[type_code]


def as_ggml_type(ggml_type: int | GGMLQuantizationType) -> GGMLQuantizationType:
    """The ggml type enum for an int or enum value; ValueError for an unknown one."""
    try:
        return _TYPE_BY_VALUE[ggml_type]     # one lookup: this runs on every kernel call
    except (KeyError, TypeError):
        pass
    try:
        return GGMLQuantizationType(int(ggml_type))
    except ValueError:
        raise ValueError(f"unknown ggml type {ggml_type!r}") from None


def block_shape(ggml_type: int | GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    qtype = as_ggml_type(ggml_type)
    if qtype not in GGML_QUANT_SIZES:
        raise ValueError(f"ggml type {qtype.name} has no block size")
    return GGML_QUANT_SIZES[qtype]


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view. The kernels take every input array read-only: Numba compiles one
    specialisation per writeable flag, and this keeps it to one."""
    view = a.view()
    view.flags.writeable = False
    return view


def row_bytes(ggml_type: int | GGMLQuantizationType, n_cols: int) -> int:
    """Bytes of one row of n_cols elements; ValueError if n_cols is not whole blocks."""
    block_size, type_size = block_shape(ggml_type)
    if n_cols <= 0 or n_cols % block_size != 0:
        raise ValueError(
            f"a {as_ggml_type(ggml_type).name} row of {n_cols} elements is not a whole number "
            f"of {block_size}-element blocks"
        )
    return n_cols // block_size * type_size


# ---- half precision, as bits -------------------------------------------------------------
#
# float16: s eeeee mmmmmmmmmm        float32: s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm
#
# Half to float: put the half's exponent and mantissa at the bottom of float32's (shift by 13)
# and multiply by 2**112, which moves the exponent bias from 15 to 127. The product is exact,
# subnormal halves included (they enter as float32 subnormals). Infinities and NaNs keep an
# all-ones exponent instead. Branch-free, so loops of it vectorise.

_HALF_EXPONENT_REBIAS = np.float32(2.0**112)
_HALF_ROUNDING_MAGIC = np.float32(0.5)  # bits 0x3F000000; adding it leaves a subnormal half's
                                         # bits, rounded to even, at the bottom of the mantissa


@njit(cache=True, nogil=True)
def f16_bits_to_f32(h):
    """float32 value of the float16 with bit pattern h (0..65535); NaN payloads are kept."""
    h = np.uint32(h)
    shifted = np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13))
    magnitude = np.uint32(shifted).view(np.float32) * _HALF_EXPONENT_REBIAS
    if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):
        magnitude = np.uint32(shifted | np.uint32(0x7F800000)).view(np.float32)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    return np.uint32(np.float32(magnitude).view(np.uint32) | sign).view(np.float32)


@njit(cache=True, nogil=True)
def f32_to_f16_bits(value):
    """float16 bit pattern nearest to a float32 (ties to even; NaN becomes a quiet NaN)."""
    bits = np.float32(value).view(np.uint32)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude_bits = bits & np.uint32(0x7FFFFFFF)
    if magnitude_bits > np.uint32(0x7F800000):
        return np.uint16(sign | np.uint32(0x7E00))
    if magnitude_bits >= np.uint32(0x477FF000):  # rounds to 65536 or more: infinity
        return np.uint16(sign | np.uint32(0x7C00))
    if magnitude_bits < np.uint32(0x38800000):  # below 2**-14: a subnormal half or zero
        shifted = np.uint32(magnitude_bits).view(np.float32) + _HALF_ROUNDING_MAGIC
        return np.uint16(sign | (np.float32(shifted).view(np.uint32) - np.uint32(0x3F000000)))
    mantissa_odd = (magnitude_bits >> np.uint32(13)) & np.uint32(1)
    rounded = magnitude_bits + np.uint32(0xC8000FFF) + mantissa_odd  # rebias by -(127-15) << 23
    return np.uint16(sign | (rounded >> np.uint32(13)))


@njit(cache=True, nogil=True)
def f32_to_bf16_bits(value):
    """bfloat16 bit pattern of a float32 (ties to even; NaN kept quiet), as ggml rounds it."""
    bits = np.float32(value).view(np.uint32)
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((bits >> np.uint32(16)) | np.uint32(64))
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16((np.uint64(bits) + np.uint64(rounding)) >> np.uint64(16))
