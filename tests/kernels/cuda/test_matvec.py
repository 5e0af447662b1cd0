"""Decode matmuls against NumPy: every weight type, 1 to 8 tokens, awkward row counts.

The reference is the exact product of gguf's dequantized weights with the q8_1-rounded
activations (computed here in NumPy), so the only difference left is float summation order."""
from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize

from kernels.cuda import ops


def q8_1_reference(x: np.ndarray) -> np.ndarray:
    """x rounded as quantize_q8_1 rounds it: d = amax / 127 per 32 values, q = round half away from 0."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(amax == 0, 0, blocks / d)
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return (q * d).reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("type_name", list(ops.FORMATS))
@pytest.mark.parametrize("n_tokens, n_rows", [(1, 13), (3, 4), (8, 1)])
def test_matvec_matches_dequantized_reference(rt, rng, make_weight, type_name, n_tokens, n_rows):
    fmt = ops.FORMATS[type_name]
    n_cols = 512 if fmt.block_values == 256 else 96 if fmt.block_values == 32 else 75
    w = make_weight(type_name, n_rows, n_cols)
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    got = rt.download(ops.matvec(rt, rt.upload(x), rt.upload(w), type_name, n_cols))
    xr = x if fmt.is_float else q8_1_reference(x)
    wd = dequantize(w, QType[type_name]).astype(np.float64)
    scale = np.abs(xr).astype(np.float64) @ np.abs(wd).T
    np.testing.assert_array_less(np.abs(got - xr.astype(np.float64) @ wd.T), 1e-6 * scale + 1e-30)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q3_K", "IQ4_XS"])
def test_exact_matvec_uses_unrounded_activations(rt, rng, make_weight, type_name):
    n_cols = 512
    w = make_weight(type_name, 6, n_cols)
    x = rng.standard_normal((2, n_cols)).astype(np.float32)
    got = rt.download(ops.matvec(rt, rt.upload(x), rt.upload(w), type_name, n_cols, exact=True))
    expected = x.astype(np.float64) @ dequantize(w, QType[type_name]).astype(np.float64).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_q8_1_quantization_is_exact(rt, rng):
    x = rng.standard_normal((2, 96)).astype(np.float32) * np.float32(3)
    x[1, :32] = 0.0                                       # an all-zero block has d = 0
    q = rt.download(ops.quantize_q8_1(rt, rt.upload(x))).reshape(2, 3, 40)
    d = q[..., :4].copy().view(np.float32)[..., 0]
    s = q[..., 4:8].copy().view(np.float32)[..., 0]
    values = q[..., 8:].view(np.int8).astype(np.float32)
    np.testing.assert_array_equal(values * d[..., None], q8_1_reference(x).reshape(2, 3, 32))
    np.testing.assert_allclose(s, d * values.sum(-1), rtol=1e-6)


def test_matvec_refuses_bad_arguments(emu_rt, make_weight):
    w = emu_rt.upload(make_weight("Q4_0", 4, 64))
    with pytest.raises(ops.KernelArgumentError, match="1 to 8 tokens"):
        ops.matvec(emu_rt, emu_rt.upload(np.zeros((9, 64), np.float32)), w, "Q4_0", 64)
    with pytest.raises(ops.KernelArgumentError, match="must be float32"):
        ops.matvec(emu_rt, emu_rt.upload(np.zeros((1, 64), np.float64)), w, "Q4_0", 64)
    with pytest.raises(ops.KernelArgumentError, match="bytes, got"):
        ops.matvec(emu_rt, emu_rt.upload(np.zeros((1, 96), np.float32)), w, "Q4_0", 96)
    with pytest.raises(ops.KernelArgumentError, match="no CUDA matvec for IQ2_XXS"):
        ops.matvec(emu_rt, emu_rt.upload(np.zeros((1, 64), np.float32)), w, "IQ2_XXS", 64)
