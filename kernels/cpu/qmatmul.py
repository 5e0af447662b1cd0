"""y = x @ W.T by integer dot products on quantized activations, as llama.cpp computes it.

    qmatmul(x, w_bytes, ggml_type, n_cols, out=None) -> float32 (n_tokens, n_rows)

x is quantized once (`qactivations`: Q8_0 blocks for the 32-element weight types, Q8_K for
the K-quants and IQ4_XS), then every output is, per weight block,
`d_w * d_x * (exact integer sum of products)` (+ the min terms of the types with mins). The
results equal llama.cpp's up to the order of the float additions. Types outside INTEGER_TYPES
have no integer form here (F32/F16/BF16 and the IQ1-IQ3/TQ/MXFP4 families): use
`kernels.cpu.matmul`.

Work split: the rows of W in chunks over Numba's threads. One token (decode): each row's raw
GGUF blocks go straight through the type's fused kernel (`blockdot`: decoded in vector
registers), so every weight byte is read once from memory, in order. Several tokens (prefill):
a chunk of rows is unpacked once into an int8/int16 tile sized to stay in L1, then every
token's quantized row is dotted with every tile row (`simd.scaled_block_dot`).
"""

from __future__ import annotations

import platform

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from llvmlite import binding as llvm_binding
from numba import njit, prange

from kernels.cpu import unpack
from kernels.cpu.blockdot import ROW_DOTS
from kernels.cpu.decode import checked_weight
from kernels.cpu.decode_basic import read_f16
from kernels.cpu.decode_kquants import k_scale_min
from kernels.cpu.formats import as_ggml_type, block_bytes as bytes_per_block, read_only
from kernels.cpu.prefetch import prefetch_rows
from kernels.cpu.qactivations import q8_k_min_sums, quantize_activations, quantize_one_token
from kernels.cpu.qgemm import prefill_is_faster, qgemm
from kernels.cpu.simd import scaled_block_dot
from kernels.cpu.tile_matmul import SUM_FASTMATH

_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(QType[n]) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(QType[n]) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
_IQ4_NL, _IQ4_XS = int(QType.IQ4_NL), int(QType.IQ4_XS)
_DOT_Q4_0, _DOT_Q4_1, _DOT_Q5_0, _DOT_Q5_1, _DOT_Q8_0, _DOT_IQ4_NL = (
    ROW_DOTS[n] for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"))
_DOT_Q2_K, _DOT_Q3_K, _DOT_Q4_K, _DOT_Q5_K, _DOT_Q6_K, _DOT_IQ4_XS = (
    ROW_DOTS[n] for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"))

Q8_0_INPUT_TYPES = frozenset(QType[n] for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"))
Q8_K_INPUT_TYPES = frozenset(QType[n] for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"))
INTEGER_TYPES = Q8_0_INPUT_TYPES | Q8_K_INPUT_TYPES
# Where qmatmul beats the float tile path (`kernels.cpu.matmul` on the same rounded inputs) on
# an AVX-512 Xeon: one-token products of every integer type, whose fused kernels (`blockdot`)
# run 1.5-5x faster than the float path (`python -m kernels.cpu.bench`), and from
# qgemm.PREFILL_MIN_TOKENS tokens on the prefill GEMM; in between, the float tiles win.
INTEGER_DECODE_TYPES = INTEGER_TYPES
INTEGER_MAX_TOKENS = 1


def _half_conversion_is_native() -> bool:
    """scaled_block_dot reads f16 scales with LLVM's fpext half: one instruction with x86's F16C
    (and on ARM), a library call that the JIT may not link elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool(llvm_binding.get_host_cpu_features().get("f16c", False))


HALF_CONVERSION_NATIVE = _half_conversion_is_native()


def integer_path_is_faster(ggml_type: int | QType, n_tokens: int) -> bool:
    return (HALF_CONVERSION_NATIVE and n_tokens <= INTEGER_MAX_TOKENS
            and as_ggml_type(ggml_type) in INTEGER_DECODE_TYPES) or prefill_is_faster(ggml_type, n_tokens)

LANES = 32   # the unpackers' loop width, passed at run time so that LLVM vectorises the loops
TILE_BYTES = 32 * 1024       # unpacked rows per prefill chunk: about an L1 data cache
SERIAL_WORK_BYTES = 64 * 1024  # weight bytes x tokens below which one thread is faster than the pool


@njit(cache=True, nogil=True)
def _unpack_row(type_code, w, r, n_cols, lanes, tile8, tile16, i):
    if type_code == _Q4_K:
        unpack.unpack_q4_k(w, r, n_cols, lanes, tile16, i)
    elif type_code == _Q6_K:
        unpack.unpack_q6_k(w, r, n_cols, lanes, tile16, i)
    elif type_code == _Q5_0:
        unpack.unpack_q5_0(w, r, n_cols, lanes, tile8, i)
    elif type_code == _Q4_0:
        unpack.unpack_q4_0(w, r, n_cols, lanes, tile8, i)
    elif type_code == _Q5_K:
        unpack.unpack_q5_k(w, r, n_cols, lanes, tile16, i)
    elif type_code == _IQ4_NL:
        unpack.unpack_iq4_nl(w, r, n_cols, lanes, tile8, i)
    elif type_code == _Q4_1:
        unpack.unpack_q4_1(w, r, n_cols, lanes, tile8, i)
    elif type_code == _Q5_1:
        unpack.unpack_q5_1(w, r, n_cols, lanes, tile8, i)
    elif type_code == _Q2_K:
        unpack.unpack_q2_k(w, r, n_cols, lanes, tile16, i)
    elif type_code == _Q3_K:
        unpack.unpack_q3_k(w, r, n_cols, lanes, tile16, i)
    elif type_code == _IQ4_XS:
        unpack.unpack_iq4_xs(w, r, n_cols, lanes, tile16, i)


_IN_PLACE, _TILE8, _TILE16 = 0, 1, 2   # how a type's rows reach the dot product


@njit(cache=True, nogil=True)
def _kind(type_code):
    """Q8_0 rows are read in place; the other 32-element types are unpacked to int8, the
    256-element types to int16 (sub-block scales multiplied in)."""
    if type_code == _Q8_0:
        return _IN_PLACE
    if type_code == _Q4_0 or type_code == _Q5_0 or type_code == _IQ4_NL or type_code == _Q4_1 or type_code == _Q5_1:
        return _TILE8
    return _TILE16


@njit(cache=True, nogil=True)
def _d_offset(type_code):
    """Byte offset of the block's f16 `d` (0 in every 32-element type)."""
    if type_code == _Q6_K:
        return 208
    if type_code == _Q3_K:
        return 108
    if type_code == _Q2_K:
        return 80
    return 0


@njit(cache=True, nogil=True)
def _min_offset(type_code):
    """Byte offset of the block's f16 `dmin` (or Q4_1/Q5_1's `m`); -1 for the types without."""
    if type_code == _Q4_K or type_code == _Q5_K or type_code == _Q4_1 or type_code == _Q5_1:
        return 2
    if type_code == _Q2_K:
        return 82
    return -1


@njit(cache=True, nogil=True)
def _min_factors(type_code, w, r, n_cols, i, mins_f):
    """mins_f[i]: the row's min factors as floats, paired with QuantizedActivations.min_sums:
    Q4_1/Q5_1 one m per 32 (times Q8_1's block sum s); K-quants with mins -dmin * min per 16
    (times d_x * bsum), the 6-bit mins of Q4_K/Q5_K per 32, Q2_K's high nibbles per 16."""
    block_bytes = bytes_per_block(type_code)
    min_offset = _min_offset(type_code)
    if type_code == _Q4_1 or type_code == _Q5_1:
        for b in range(n_cols // 32):
            mins_f[i, b] = read_f16(w, r, b * block_bytes + min_offset)
        return
    for b in range(n_cols // 256):
        offset = b * block_bytes
        dmin = read_f16(w, r, offset + min_offset)
        for g in range(16):
            if type_code == _Q2_K:
                minimum = np.int32(w[r, offset + g]) >> 4
            else:
                minimum = k_scale_min(w, r, offset + 4, g >> 1)[1]
            mins_f[i, b * 16 + g] = -(dmin * np.float32(minimum))


@njit(cache=True, nogil=True, fastmath=SUM_FASTMATH)
def _min_term(mins_f, i, min_sums, t):
    total = np.float32(0.0)
    for k in range(min_sums.shape[1]):
        total += mins_f[i, k] * min_sums[t, k]
    return total


@njit(cache=True, nogil=True)
def _dot_rows(kind, w, wi, start, n_chunk_rows, tile_row0, n_cols, d_offset, block_bytes, tile8, tile16, xq, xd, t,
              out, col0):
    """out[t, col0 + r] = the block dot products (no min terms) of rows r = start .. of W with
    token t. Weight rows come from W itself (Q8_0), or from tile rows tile_row0 + i. The type
    is resolved once per call, so the inner loop is the vector primitive alone."""
    xqt, xdt = xq[t], xd[t]
    if kind == _IN_PLACE:
        for i in range(n_chunk_rows):
            r = start + i
            out[t, col0 + r] = scaled_block_dot(wi[r], 2, 34, w[r], 0, 34, xqt, 0, xdt, n_cols // 32, 1)
    elif kind == _TILE8:
        for i in range(n_chunk_rows):
            r = start + i
            out[t, col0 + r] = scaled_block_dot(tile8[tile_row0 + i], 0, 32, w[r], d_offset, block_bytes,
                                                xqt, 0, xdt, n_cols // 32, 1)
    else:
        for i in range(n_chunk_rows):
            r = start + i
            out[t, col0 + r] = scaled_block_dot(tile16[tile_row0 + i], 0, 256, w[r], d_offset, block_bytes,
                                                xqt, 0, xdt, n_cols // 256, 8)


@njit(cache=True, nogil=True)
def _row_dot(type_code, w, r, x, dx, sx, n_cols):
    """Row r of W . one token's quantized activations, by the type's fused kernel (sx: Q8_1's
    block sums for Q4_1 / Q5_1's mins); r a tuple of rows: the tuple of their dot products."""
    if type_code == _Q8_0:
        return _DOT_Q8_0(w, r, x, dx, sx, n_cols // 32)
    if type_code == _Q6_K:
        return _DOT_Q6_K(w, r, x, dx, sx, n_cols // 256)
    if type_code == _Q4_K:
        return _DOT_Q4_K(w, r, x, dx, sx, n_cols // 256)
    if type_code == _Q5_0:
        return _DOT_Q5_0(w, r, x, dx, sx, n_cols // 32)
    if type_code == _Q4_0:
        return _DOT_Q4_0(w, r, x, dx, sx, n_cols // 32)
    if type_code == _Q5_K:
        return _DOT_Q5_K(w, r, x, dx, sx, n_cols // 256)
    if type_code == _IQ4_NL:
        return _DOT_IQ4_NL(w, r, x, dx, sx, n_cols // 32)
    if type_code == _Q4_1:
        return _DOT_Q4_1(w, r, x, dx, sx, n_cols // 32)
    if type_code == _Q5_1:
        return _DOT_Q5_1(w, r, x, dx, sx, n_cols // 32)
    if type_code == _Q2_K:
        return _DOT_Q2_K(w, r, x, dx, sx, n_cols // 256)
    if type_code == _Q3_K:
        return _DOT_Q3_K(w, r, x, dx, sx, n_cols // 256)
    return _DOT_IQ4_XS(w, r, x, dx, sx, n_cols // 256)


# Weights up to this size (about the cores' L2 caches) are decoded four rows per kernel call,
# which share the activations' loads and what is computed from them (from cache: Q8_0 10 %,
# Q6_K 6 %, Q3_K 5 % faster, the others within 2 %).
# Larger ones stream from memory, where one row after another, a single sequential stream for
# the hardware prefetcher, kept the Q8_0 output head nearer the read speed (0.94 against 0.80).
GROUPED_ROWS_MAX_BYTES = 4 << 20
# Each group or row asks for the rows this far ahead (`prefetch.prefetch_rows`): the hardware
# prefetcher stops at every 4 KiB page. A decode step's small products start cold, right after
# the head or the previous layer (Gemma 3 270M's step 21.2 -> 19.0 ms); the output heads cross a
# page every 2-6 rows (Q8_0 262144 x 640 and Q6_K 151936 x 2048 1.3-1.4x faster, interleaved).
PREFETCH_ROWS_AHEAD = 8


@njit(cache=True, nogil=True)
def _decode_rows(xq, xd, min_sums, w, type_code, n_cols, start, n_rows, out, col0):
    """One token: out[0, col0 + r] for rows r = start .., every weight byte read once, in order."""
    x, dx, sx = xq[0], xd[0], min_sums[0]
    end = start + n_rows
    quads_end = end - n_rows % 4 if w.size <= GROUPED_ROWS_MAX_BYTES else start
    ahead_end = w.shape[0] - 4 - PREFETCH_ROWS_AHEAD
    for r in range(start, quads_end, 4):
        if r <= ahead_end:
            prefetch_rows(w, r + PREFETCH_ROWS_AHEAD, 4)
        o = out[0, col0 + r:col0 + r + 4]
        o[0], o[1], o[2], o[3] = _row_dot(type_code, w, (r, r + 1, r + 2, r + 3), x, dx, sx, n_cols)
    for r in range(quads_end, end):
        if r <= ahead_end:
            prefetch_rows(w, r + PREFETCH_ROWS_AHEAD, 1)
        out[0, col0 + r] = _row_dot(type_code, w, r, x, dx, sx, n_cols)


@njit(cache=True, nogil=True)
def _matmul_chunk(xq, xd, min_sums, w, wi, type_code, n_cols, lanes, start, n_chunk_rows, tile_rows, out, col0):
    """Rows start .. start + n_chunk_rows of out[:, col0:] (one work item)."""
    n_tokens = xq.shape[0]
    if n_tokens == 1:
        _decode_rows(xq, xd, min_sums, w, type_code, n_cols, start, n_chunk_rows, out, col0)
        return
    kind = _kind(type_code)
    d_offset = _d_offset(type_code)
    block_bytes = bytes_per_block(type_code)
    has_mins = _min_offset(type_code) >= 0
    tile8 = np.empty((tile_rows, n_cols if kind == _TILE8 else 0), dtype=np.int8)
    tile16 = np.empty((tile_rows, n_cols if kind == _TILE16 else 0), dtype=np.int16)
    mins_f = np.empty((tile_rows, min_sums.shape[1]), dtype=np.float32)
    for i in range(n_chunk_rows):
        if kind != _IN_PLACE:
            _unpack_row(type_code, w, start + i, n_cols, lanes, tile8, tile16, i)
        if has_mins:
            _min_factors(type_code, w, start + i, n_cols, i, mins_f)
    for t in range(n_tokens):
        _dot_rows(kind, w, wi, start, n_chunk_rows, 0, n_cols, d_offset, block_bytes, tile8, tile16, xq, xd, t,
                  out, col0)
        if has_mins:
            for i in range(n_chunk_rows):
                out[t, col0 + start + i] += _min_term(mins_f, i, min_sums, t)


@njit(cache=True, nogil=True)
def qmatmul_rows(xq, xd, min_sums, w, type_code, n_cols, start, n_rows, out, col0):
    """out[:, col0 + start : col0 + start + n_rows] = rows start .. of x @ W.T on the calling
    thread: the unit other parallel kernels (the grouped experts of a MoE layer) schedule."""
    tile_rows = 1 if xq.shape[0] == 1 else n_rows
    _matmul_chunk(xq, xd, min_sums, w, w.view(np.int8), type_code, n_cols, LANES, start, n_rows, tile_rows, out, col0)


@njit(cache=True, nogil=True, parallel=True)
def qmatmul_kernel(xq, xd, min_sums, w, type_code, n_cols, lanes, rows_per_chunk, out, col0):
    """out[:, col0:col0 + n_rows] = x @ W.T from x quantized (xq, xd, min_sums) for type_code."""
    wi = w.view(np.int8)
    n_rows = w.shape[0]
    n_chunks = (n_rows + rows_per_chunk - 1) // rows_per_chunk
    tile_rows = 1 if xq.shape[0] == 1 else rows_per_chunk
    for c in prange(n_chunks):
        start = c * rows_per_chunk
        _matmul_chunk(xq, xd, min_sums, w, wi, type_code, n_cols, lanes, start, min(rows_per_chunk, n_rows - start),
                      tile_rows, out, col0)


@njit(cache=True, nogil=True)
def qmatmul_serial(xq, xd, min_sums, w, type_code, n_cols, lanes, rows_per_chunk, out, col0):
    """qmatmul_kernel on the calling thread: for products too small to pay for waking the pool."""
    wi = w.view(np.int8)
    n_rows = w.shape[0]
    tile_rows = 1 if xq.shape[0] == 1 else rows_per_chunk
    for start in range(0, n_rows, rows_per_chunk):
        _matmul_chunk(xq, xd, min_sums, w, wi, type_code, n_cols, lanes, start, min(rows_per_chunk, n_rows - start),
                      tile_rows, out, col0)


def quantized_buffers(n_tokens: int, n_cols: int, k_blocks: bool) -> tuple:
    """(q, d, sums, min_sums) to quantize n_tokens rows of n_cols into: Q8_K (k_blocks) or
    Q8_0 / Q8_1 blocks. min_sums is what the weights' min factors multiply: Q8_1's s per 32 (the
    sums themselves), or Q8_K's d * bsum per 16."""
    block = 256 if k_blocks else 32
    q = np.empty((n_tokens, n_cols), dtype=np.int8)
    d = np.empty((n_tokens, n_cols // block), dtype=np.float32)
    sums = np.empty((n_tokens, n_cols // (16 if k_blocks else 32)), dtype=np.float32)
    return q, d, sums, (np.empty_like(sums) if k_blocks else sums)


class QuantizedActivations:
    """x quantized for one vec_dot_type: reuse it for every weight of that input type (the
    q, k and v projections, or gate and up, share one)."""

    __slots__ = ("q", "d", "sums", "min_sums", "k_blocks")

    def __init__(self, x: np.ndarray, k_blocks: bool):
        n_tokens, n_cols = x.shape
        block = 256 if k_blocks else 32
        if n_cols % block:
            raise ValueError(f"activations of {n_cols} columns are not whole {block}-element blocks")
        self.k_blocks = k_blocks
        q, d, sums, min_sums = quantized_buffers(n_tokens, n_cols, k_blocks)
        self.q, self.d, self.sums, self.min_sums = q, d, sums, min_sums
        x = read_only(np.ascontiguousarray(x, dtype=np.float32))
        if n_tokens == 1:
            quantize_one_token(x, k_blocks, q, d, sums, min_sums)
        else:
            quantize_activations(x, k_blocks, q, d, sums)
            if k_blocks:
                q8_k_min_sums(d, sums, min_sums)
        # read-only, as the kernels take every input (one compiled form each)
        q.flags.writeable = d.flags.writeable = sums.flags.writeable = min_sums.flags.writeable = False

    @classmethod
    def for_type(cls, x: np.ndarray, ggml_type: int | QType) -> QuantizedActivations:
        return cls(x, as_ggml_type(ggml_type) in Q8_K_INPUT_TYPES)


DECODE_ROWS_PER_CHUNK = 64     # a one-token product's work item


def rows_per_chunk(n_cols: int, n_tokens: int) -> int:
    """Decode: DECODE_ROWS_PER_CHUNK rows per work item. Prefill: an unpacked tile of about TILE_BYTES."""
    if n_tokens == 1:
        return DECODE_ROWS_PER_CHUNK
    return max(4, TILE_BYTES // (2 * n_cols))


def qmatmul(
    x: np.ndarray | QuantizedActivations,
    w_bytes: np.ndarray,
    ggml_type: int | QType,
    n_cols: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """x @ W.T as float32 (n_tokens, n_rows) for W of a type in INTEGER_TYPES.

    x: float32 (n_tokens, n_cols), or already quantized for this type's input
    (`QuantizedActivations.for_type`). w_bytes and out as for `kernels.cpu.matmul`.
    """
    qtype = as_ggml_type(ggml_type)
    if qtype not in INTEGER_TYPES:
        raise ValueError(f"{qtype.name} has no integer dot product; use kernels.cpu.matmul")
    w = checked_weight(w_bytes, qtype, n_cols)
    k_blocks = qtype in Q8_K_INPUT_TYPES
    if isinstance(x, QuantizedActivations):
        if x.k_blocks != k_blocks or x.q.shape[1] != n_cols:
            raise ValueError(f"activations quantized for another input type than {qtype.name}'s")
        xa = x
    else:
        x2 = np.asarray(x, dtype=np.float32)
        if x2.ndim != 2 or x2.shape[1] != n_cols:
            raise ValueError(f"activations of shape {x2.shape} do not have {n_cols} columns")
        xa = QuantizedActivations(x2, k_blocks)
    shape = (xa.q.shape[0], w.shape[0])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-ordered float32 array of shape {shape}")
    if prefill_is_faster(qtype, shape[0]):   # several tokens: the integer GEMM
        return qgemm(xa, w, qtype, n_cols, out)
    chunk = rows_per_chunk(n_cols, shape[0])
    kernel = qmatmul_serial if w.nbytes * shape[0] <= SERIAL_WORK_BYTES else qmatmul_kernel
    kernel(xa.q, xa.d, xa.min_sums, w, int(qtype), n_cols, LANES, chunk, out, 0)
    return out
