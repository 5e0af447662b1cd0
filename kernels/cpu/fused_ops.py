"""The small ops of a decode step, each one pass over its rows on the calling thread.

At one token a layer's norms, rotations and activations touch a few thousand values each: as
NumPy expressions they cost more in calls and temporaries than in arithmetic, and as parallel
kernels more in waking the thread pool. Here each is one serial loop that writes its result
once. Inputs are C-ordered float32; every function fills a caller-provided `out`.

    rms_norm_rows(x, w, eps, out)            out = x / sqrt(mean(x^2) + eps) * w, per row
    add_rms_norm_rows(r, y, w, eps, out)     out = r + rms_norm(y) * w (gemma's post-norms)
    glu_rows(gate, up, kind, out)            out = act(gate) * up, act SILU, GELU (tanh form) or
                                             GELU_F16 (llama.cpp's CPU GELU: an f16 table)
    rope_rows(x, cos, sin, neox, scale, out) rotation of each head's first dims, times scale
    q8_0_round_rows(x, out)                  x rounded as llama.cpp quantizes it to Q8_0

The arithmetic is float32 in the order of `engine.arch.layers` (no fused multiply-adds), except
the RMS sum, accumulated in float64 as ggml_compute_forward_rms_norm_f32 does, and the
activations' exponential: libm's expf and tanhf are scalar calls that keep a loop from being
vectorised (slower than NumPy's SIMD ufuncs), so `_exp` is a branch-free Cody-Waite reduction
and polynomial (Cephes expf, within 2 ulp) that LLVM vectorises, as ggml's ggml_v_expf does
for the same reason; tanh is written through it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.cpu.formats import f16_bits_to_f32, f32_to_f16_bits

SILU, GELU, GELU_F16 = 0, 1, 2
_GELU_COEF_A = np.float32(0.044715)
_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_HALF, _ONE, _TWO = np.float32(0.5), np.float32(1.0), np.float32(2.0)
_GELU_F16_RANGE = np.float32(10.0)


def _gelu_f16_table() -> np.ndarray:
    """gelu(h) rounded to f16, for every f16 bit pattern h, as float32: what llama.cpp's CPU
    backend (GGML_GELU_FP16, its default) looks up for an input rounded to f16. That rounding of
    the activation moves Gemma's perplexity by about 0.3 %, so the llama.cpp mode keeps it."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        y = _HALF * x * (_ONE + np.tanh(_SQRT_2_OVER_PI * x * (_ONE + _GELU_COEF_A * x * x)))
    return y.astype(np.float16).astype(np.float32)


GELU_F16_TABLE = _gelu_f16_table()
_EXP_LO, _EXP_HI = np.float32(-87.0), np.float32(88.0)     # 2**n stays a normal float
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))


@njit(cache=True, nogil=True, inline="always")
def _exp(v):
    """exp(v) for float32 v, saturating below -87 (to ~1e-38) and above 88."""
    v = min(max(v, _EXP_LO), _EXP_HI)
    n = np.float32(np.floor(v * _LOG2E + _HALF))
    r = v - n * _LN2_HI - n * _LN2_LO                       # |r| <= ln2 / 2
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
    p = p * r * r + r + _ONE
    scale = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    return p * scale


@njit(cache=True, nogil=True, inline="always")
def _tanh(v):
    return _ONE - _TWO / (_exp(_TWO * v) + _ONE)


@njit(cache=True, nogil=True)
def _inverse_rms(x, r, eps):
    """1 / sqrt(mean(x[r]^2) + eps) (ggml's rms_norm: a double sum, a float mean)."""
    n = x.shape[1]
    total = 0.0
    for k in range(n):
        v = np.float64(x[r, k])
        total += v * v
    mean = np.float32(total / n)
    return _ONE / np.float32(np.sqrt(mean + eps))


@njit(cache=True, nogil=True)
def rms_norm_rows(x, w, eps, out):
    """out[r] = x[r] * inverse rms, times w when w has one value per column (not when empty)."""
    n = x.shape[1]
    weighted = w.shape[0] == n
    eps32 = np.float32(eps)
    for r in range(x.shape[0]):
        scale = _inverse_rms(x, r, eps32)
        for k in range(n):
            y = x[r, k] * scale
            out[r, k] = y * w[k] if weighted else y


@njit(cache=True, nogil=True)
def add_rms_norm_rows(residual, y, w, eps, out):
    """out[r] = residual[r] + rms_norm(y[r]) * w."""
    n = y.shape[1]
    eps32 = np.float32(eps)
    for r in range(y.shape[0]):
        scale = _inverse_rms(y, r, eps32)
        for k in range(n):
            out[r, k] = residual[r, k] + (y[r, k] * scale) * w[k]


# error_model="numpy": a division without Python's zero check, which would keep the loops
# from being vectorised
@njit(cache=True, nogil=True, error_model="numpy")
def glu_rows(gate, up, kind, out):
    """out = silu(gate) * up (SILU), gelu_tanh(gate) * up (GELU) or by llama.cpp's table
    (GELU_F16), elementwise."""
    for r in range(gate.shape[0]):
        g, u, o = gate[r], up[r], out[r]
        if kind == SILU:
            for k in range(g.shape[0]):
                o[k] = g[k] * (_ONE / (_ONE + _exp(-g[k]))) * u[k]
        elif kind == GELU:
            for k in range(g.shape[0]):
                x = g[k]
                o[k] = _HALF * x * (_ONE + _tanh(_SQRT_2_OVER_PI * x * (_ONE + _GELU_COEF_A * x * x))) * u[k]
        else:
            for k in range(g.shape[0]):
                o[k] = _gelu_f16(g[k]) * u[k]


@njit(cache=True, nogil=True, inline="always")
def _gelu_f16(x):
    """ggml_vec_geglu_f32 with GGML_GELU_FP16: 0 from -10 down, x from 10 up, else the table at
    x rounded to f16."""
    if x <= -_GELU_F16_RANGE:
        return np.float32(0.0)
    if x >= _GELU_F16_RANGE:
        return x
    return GELU_F16_TABLE[f32_to_f16_bits(x)]


@njit(cache=True, nogil=True)
def rope_rows(x, cos, sin, neox, scale, out):
    """x (T, n_head, head_dim): the first 2 * half dims of every head rotated by the token's
    angles (cos, sin (T, half)), the rest copied, everything times scale (1: untouched).
    NEOX pairs x[i] with x[i + half]; NORM pairs x[2i] with x[2i + 1] (ggml_rope_ext)."""
    n_tokens, n_head, head_dim = x.shape
    half = cos.shape[1]
    scaled = scale != np.float32(1.0)
    for t in range(n_tokens):
        for h in range(n_head):
            for i in range(half):
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                x0, x1 = x[t, h, a], x[t, h, b]
                c, s = cos[t, i], sin[t, i]
                y0 = x0 * c - x1 * s
                y1 = x0 * s + x1 * c
                out[t, h, a] = y0 * scale if scaled else y0
                out[t, h, b] = y1 * scale if scaled else y1
            for k in range(2 * half, head_dim):
                out[t, h, k] = x[t, h, k] * scale if scaled else x[t, h, k]


@njit(cache=True, nogil=True)
def q8_0_round_rows(x, out):
    """x (n, 32 * blocks) as llama.cpp's x86 quantize_row_q8_0 feeds it to a Q4_0..Q8_0 dot:
    each block of 32 scaled to int8 (round half to even) and multiplied back by its f16 scale."""
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            start = b * 32
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[r, start + j]))
            d = f16_bits_to_f32(f32_to_f16_bits(amax / np.float32(127.0)))
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            for j in range(32):
                out[r, start + j] = np.float32(np.rint(x[r, start + j] * inv)) * d
