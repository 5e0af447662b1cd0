"""The integer-dot path (qmatmul) against NumPy references of the same rounding.

- the vector primitive `scaled_block_dot`: bit for bit against its NumPy twin (the integer
  lane sums are exact; the float steps are the same operations in the same order);
- the activation quantizers: bit for bit against NumPy versions of llama.cpp's x86
  `quantize_row_q8_0` / `_q8_1` and `quantize_row_q8_K_ref`;
- qmatmul over every type of INTEGER_TYPES, shapes with one row, one token, one block: within
  float32 summation noise of the exact value of llama.cpp's formula, computed in float64 from
  the NumPy-quantized activations and gguf's dequantized weights (a wrong integer anywhere
  costs orders of magnitude more than the budget).
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_weights import random_weight
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize
from numba import njit

from kernels.cpu import INTEGER_TYPES, QuantizedActivations, qmatmul
from kernels.cpu.formats import read_only
from kernels.cpu.qmatmul import Q8_K_INPUT_TYPES, qmatmul_kernel, qmatmul_rows, qmatmul_serial, rows_per_chunk
from kernels.cpu.simd import scaled_block_dot, scaled_block_dot_reference

INTEGER_TYPE_NAMES = sorted(t.name for t in INTEGER_TYPES)
RELATIVE_BUDGET = 2e-6      # of sum |x_q| * |w| per output: float32 noise over a few hundred terms


# --- the primitive -----------------------------------------------------------------------------

@njit
def _call_scaled_block_dot(w, w0, w_stride, dw, dw0, dw_stride, x, x0, dx, n_blocks, groups):
    return scaled_block_dot(w, w0, w_stride, dw, dw0, dw_stride, x, x0, dx, n_blocks, groups)


@pytest.mark.parametrize("weight_dtype", [np.int8, np.int16])
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("n_blocks", [0, 1, 5])
def test_scaled_block_dot_is_bit_exact(rng, weight_dtype, groups, n_blocks):
    block = 32 * groups
    w_stride = block + 6                       # blocks with gaps, as rows of ggml blocks have
    limit = 127 if weight_dtype == np.int8 else 4096
    w = rng.integers(-limit, limit + 1, n_blocks * w_stride + 3).astype(weight_dtype)
    x = rng.integers(-127, 128, n_blocks * block + 1).astype(np.int8)
    dw = rng.standard_normal(n_blocks).astype(np.float32)
    dx = rng.standard_normal(n_blocks).astype(np.float32)
    result = _call_scaled_block_dot(w, 3, w_stride, dw, 0, 1, x, 1, dx, n_blocks, groups)
    expected = scaled_block_dot_reference(w, 3, w_stride, dw, x, 1, dx, n_blocks, groups)
    assert np.float32(result).view(np.uint32) == expected.view(np.uint32)


def test_scaled_block_dot_reads_half_scales_in_place(rng):
    """A uint8 scale array is read as the IEEE halves at dw0 + b * dw_stride (ggml's `d`)."""
    n_blocks, stride = 4, 34
    halves = rng.standard_normal(n_blocks).astype(np.float16)
    row = rng.integers(0, 256, n_blocks * stride).astype(np.uint8)
    for b in range(n_blocks):
        row[b * stride: b * stride + 2] = halves[b: b + 1].view(np.uint8)
    w = row.view(np.int8)
    x = rng.integers(-127, 128, n_blocks * 32).astype(np.int8)
    dx = rng.standard_normal(n_blocks).astype(np.float32)
    result = _call_scaled_block_dot(w, 2, stride, row, 0, stride, x, 0, dx, n_blocks, 1)
    expected = scaled_block_dot_reference(w, 2, stride, halves.astype(np.float32), x, 0, dx, n_blocks, 1)
    assert np.float32(result).view(np.uint32) == expected.view(np.uint32)


# --- the activation quantizers ------------------------------------------------------------------

def awkward_activations(rng: np.random.Generator, n_cols: int) -> np.ndarray:
    """Rows with exact .5 ties after scaling, a zero block, a huge range, and plain noise."""
    x = rng.standard_normal((5, n_cols)).astype(np.float32)
    x[1] = rng.integers(-254, 255, n_cols).astype(np.float32) * np.float32(0.5)
    x[1, ::256] = 127.0                        # scale 1: the halves are ties
    x[2, :256] = 0.0
    x[3] *= np.exp(rng.uniform(-6, 6, n_cols)).astype(np.float32)
    return x


def numpy_q8_0(x: np.ndarray):
    """x86 quantize_row_q8_0/_q8_1: round half to even; d and s stored as f16."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=2)
    d = amax / np.float32(127)
    inverse = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inverse[..., None]).astype(np.int32)
    s = (d * q.sum(axis=2).astype(np.float32)).astype(np.float16).astype(np.float32)
    return q.astype(np.int8).reshape(x.shape), d.astype(np.float16).astype(np.float32), s


def numpy_q8_k(x: np.ndarray):
    """quantize_row_q8_K_ref: iscale = -127 / the largest-magnitude value, q capped at 127."""
    blocks = x.reshape(x.shape[0], -1, 256)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
    safe = np.where(largest != 0, largest, 1).astype(np.float32)
    iscale = np.where(largest != 0, np.float32(-127) / safe, 0).astype(np.float32)
    q = np.minimum(np.rint(blocks * iscale[..., None]), 127).astype(np.int32)
    d = np.where(largest != 0, np.float32(1) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
    bsums = q.reshape(x.shape[0], -1, 16).sum(axis=2).astype(np.float32)
    return q.astype(np.int8).reshape(x.shape), d, bsums


def test_q8_0_activations_are_bit_exact(rng):
    x = awkward_activations(rng, 512)
    quantized = QuantizedActivations(x, k_blocks=False)
    q, d, s = numpy_q8_0(x)
    assert np.array_equal(quantized.q, q)
    assert np.array_equal(quantized.d.view(np.uint32), d.view(np.uint32))
    assert np.array_equal(quantized.sums.view(np.uint32), s.view(np.uint32))


def test_q8_k_activations_are_bit_exact(rng):
    x = awkward_activations(rng, 512)
    quantized = QuantizedActivations(x, k_blocks=True)
    q, d, bsums = numpy_q8_k(x)
    assert np.array_equal(quantized.q, q)
    assert np.array_equal(quantized.d.view(np.uint32), d.view(np.uint32))
    assert np.array_equal(quantized.sums, bsums)


# --- qmatmul over every type --------------------------------------------------------------------

def _f16_field(w: np.ndarray, block_bytes: int, offset: int) -> np.ndarray:
    blocks = w.reshape(w.shape[0], -1, block_bytes)
    return np.ascontiguousarray(blocks[..., offset: offset + 2]).view(np.float16)[..., 0].astype(np.float64)


def llama_cpp_formula(x: np.ndarray, w: np.ndarray, type_name: str) -> np.ndarray:
    """The exact (float64) value of llama.cpp's dot products on quantized activations.

    Activations enter as their quantized values q * d. Weights enter as gguf dequantizes them,
    except that Q4_1/Q5_1 apply their min m through the activation block sum s of Q8_1
    (m * s, with s rounded to f16), as llama.cpp's vec_dot_q4_1_q8_1 does."""
    qtype = QType[type_name]
    n_rows, n_cols = w.shape[0], x.shape[1]
    weights = dequantize(w, qtype).reshape(n_rows, n_cols).astype(np.float64)
    if qtype in Q8_K_INPUT_TYPES:
        q, d, _ = numpy_q8_k(x)
        xq = (q.reshape(len(x), -1, 256) * d[..., None].astype(np.float64)).reshape(x.shape)
        return xq @ weights.T
    q, d, s = numpy_q8_0(x)
    xq = (q.reshape(len(x), -1, 32) * d[..., None].astype(np.float64)).reshape(x.shape)
    if type_name not in ("Q4_1", "Q5_1"):
        return xq @ weights.T
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    m = _f16_field(w, block_bytes, 2)                                    # (n_rows, n_blocks)
    without_min = weights - np.repeat(m, 32, axis=1)
    return xq @ without_min.T + s.astype(np.float64) @ m.T


def error_scale(x: np.ndarray, w: np.ndarray, type_name: str) -> np.ndarray:
    weights = dequantize(w, QType[type_name]).reshape(w.shape[0], -1).astype(np.float64)
    return np.abs(x.astype(np.float64)) @ np.abs(weights).T + 1e-30


@pytest.mark.parametrize("type_name", INTEGER_TYPE_NAMES)
@pytest.mark.parametrize("n_tokens", [1, 3, 37])
@pytest.mark.parametrize("n_rows", [1, 70])
def test_qmatmul_tracks_llama_cpp_formula(rng, type_name, n_tokens, n_rows):
    block = 256 if QType[type_name] in Q8_K_INPUT_TYPES else 32
    for n_blocks in (1, 3):
        n_cols = block * n_blocks
        w = random_weight(rng, type_name, n_rows, n_cols)
        x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
        result = qmatmul(x, w, QType[type_name], n_cols)
        expected = llama_cpp_formula(x, w, type_name)
        relative = np.abs(result - expected) / error_scale(x, w, type_name)
        assert relative.max() < RELATIVE_BUDGET, f"{n_cols} columns: {relative.max():.2e}"


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K"])
def test_quantized_activations_are_reused(rng, type_name):
    """One quantized x for several weights of one input type gives the same products."""
    qtype = QType[type_name]
    x = rng.standard_normal((4, 512)).astype(np.float32)
    w = random_weight(rng, type_name, 16, 512)
    shared = QuantizedActivations.for_type(x, qtype)
    assert np.array_equal(qmatmul(shared, w, qtype, 512), qmatmul(x, w, qtype, 512))
    other = "Q4_K" if type_name == "Q8_0" else "Q8_0"
    with pytest.raises(ValueError, match="another input type"):
        qmatmul(shared, random_weight(rng, other, 4, 512), QType[other], 512)


def test_qmatmul_refuses_types_without_integer_form(rng):
    with pytest.raises(ValueError, match="no integer dot product"):
        qmatmul(np.zeros((1, 32), np.float32), np.zeros((1, 64), np.uint8), QType.F16, 32)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_thread_pool_and_calling_thread_agree(rng, type_name, n_tokens):
    """Large products run on the pool, small ones on the calling thread: the same numbers."""
    qtype = QType[type_name]
    n_cols, n_rows = 512, 333
    w = random_weight(rng, type_name, n_rows, n_cols)
    x = QuantizedActivations.for_type(rng.standard_normal((n_tokens, n_cols)).astype(np.float32), qtype)
    pooled = np.empty((n_tokens, n_rows), np.float32)
    serial = np.empty((n_tokens, n_rows), np.float32)
    chunk = rows_per_chunk(n_cols, n_tokens)
    qmatmul_kernel(x.q, x.d, x.min_sums, read_only(w), int(qtype), n_cols, 32, chunk, pooled, 0)
    qmatmul_serial(x.q, x.d, x.min_sums, read_only(w), int(qtype), n_cols, 32, chunk, serial, 0)
    assert np.array_equal(pooled.view(np.uint32), serial.view(np.uint32))
    assert np.array_equal(qmatmul(x, w, qtype, n_cols), pooled)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1", "Q4_K", "IQ4_XS"])
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_a_range_of_rows_is_the_same_slice_of_the_product(rng, type_name, n_tokens):
    """qmatmul_rows, the unit other kernels schedule, writes exactly its rows, as qmatmul computes them."""
    qtype = QType[type_name]
    n_cols, n_rows, start, count = 512, 200, 37, 101
    w = read_only(random_weight(rng, type_name, n_rows, n_cols))
    x = QuantizedActivations.for_type(rng.standard_normal((n_tokens, n_cols)).astype(np.float32), qtype)
    whole = qmatmul(x, w, qtype, n_cols)
    out = np.full((n_tokens, n_rows + 5), np.nan, np.float32)
    qmatmul_rows(x.q, x.d, x.min_sums, w, int(qtype), n_cols, start, count, out, 5)
    assert np.array_equal(out[:, 5 + start:5 + start + count], whole[:, start:start + count])
    assert np.isnan(out[:, :5 + start]).all() and np.isnan(out[:, 5 + start + count:]).all()
