"""The Gated DeltaNet kernels (delta_net.cu) against the NumPy mixer of engine.arch.delta_net:
the causal conv with its state, the delta rule (decode and multi-token) over several value heads
reading grouped or tiled key heads, and the gated RMSNorm, on awkward shapes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.arch import delta_net
from kernels.cuda import ops


@pytest.mark.parametrize("n_tokens, n_channels", [(1, 7), (5, 130), (37, 512)])
def test_causal_conv_silu_continues_from_and_updates_its_state(rt, rng, n_tokens, n_channels):
    x = rng.standard_normal((n_tokens, n_channels)).astype(np.float32)
    state = rng.standard_normal((3, n_channels)).astype(np.float32)
    weight = (rng.standard_normal((n_channels, 4)) / 2).astype(np.float32)
    device_state = rt.upload(state)
    got = rt.download(ops.causal_conv_silu(rt, rt.upload(x), device_state, rt.upload(weight)))
    expected, expected_state = delta_net.causal_conv(x, state, weight)
    np.testing.assert_allclose(got, delta_net.silu(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rt.download(device_state), expected_state)


def numpy_delta_rule(mixed, g, beta, state, n_k, n_v, d, grouped, eps):
    """The host mixer's steps between the conv and the norm (engine.arch.qwen35 / delta_net)."""
    n_tokens, key_dim = len(mixed), n_k * d
    q = delta_net.l2_normalize(mixed[:, :key_dim].reshape(n_tokens, n_k, d), eps)
    k = delta_net.l2_normalize(mixed[:, key_dim:2 * key_dim].reshape(n_tokens, n_k, d), eps)
    v = np.ascontiguousarray(mixed[:, 2 * key_dim:2 * key_dim + n_v * d].reshape(n_tokens, n_v, d))
    heads = np.arange(n_v) // (n_v // n_k) if grouped else np.arange(n_v) % n_k
    q, k = q[:, heads] * np.float32(1 / math.sqrt(d)), np.ascontiguousarray(k[:, heads])
    return delta_net.delta_rule_recurrent(q, k, v, g, beta, state)


@pytest.mark.parametrize("n_tokens, n_k, n_v, d, grouped", [
    (1, 2, 4, 64, False), (1, 2, 4, 64, True), (1, 1, 3, 128, False), (6, 2, 6, 20, True), (6, 3, 3, 40, False),
    (23, 2, 4, 8, False)])
def test_delta_rule_against_the_recurrence(rt, rng, n_tokens, n_k, n_v, d, grouped):
    extra = 5                                    # columns past v (the kernel reads rows with a stride)
    mixed = delta_net.silu(rng.standard_normal((n_tokens, (2 * n_k + n_v) * d + extra)).astype(np.float32))
    g = -rng.uniform(0.001, 3.0, (n_tokens, n_v)).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (n_tokens, n_v)).astype(np.float32)
    state = (rng.standard_normal((n_v, d, d)) / d).astype(np.float32)
    device_state = rt.upload(state.reshape(1, -1))
    got = ops.gated_delta_rule(rt, rt.upload(mixed), rt.upload(g), rt.upload(beta), device_state, n_k, n_v, d, grouped,
                               1e-6, 1 / math.sqrt(d))
    expected = numpy_delta_rule(mixed, g, beta, state, n_k, n_v, d, grouped, 1e-6)     # updates state
    np.testing.assert_allclose(rt.download(got), expected, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(rt.download(device_state).reshape(state.shape), state, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 4, 64), (7, 3, 20), (2, 2, 128)])
def test_gated_rms_norm(rt, rng, shape):
    x, z = (rng.standard_normal(shape).astype(np.float32) * 2 for _ in range(2))
    weight = rng.uniform(0.9, 1.1, shape[-1]).astype(np.float32)
    got = rt.download(ops.gated_rms_norm(rt, rt.upload(x), rt.upload(weight), rt.upload(z), 1e-6))
    np.testing.assert_allclose(got, delta_net.gated_rms_norm(x, weight, z, 1e-6), rtol=2e-5, atol=2e-6)


def test_launchers_refuse_what_the_kernels_cannot_do(emu_rt):
    def zeros(*shape):
        return emu_rt.zeros(shape, np.float32)

    with pytest.raises(ops.KernelArgumentError, match="kernel of 3"):
        ops.causal_conv_silu(emu_rt, zeros(2, 8), zeros(2, 8), zeros(8, 3))
    with pytest.raises(ops.KernelArgumentError, match="heads of 1 to 128"):
        ops.gated_delta_rule(emu_rt, zeros(1, 1024), zeros(1, 1), zeros(1, 1), zeros(256, 256), 1, 1, 256, False, 1e-6, 1.0)
    with pytest.raises(ops.KernelArgumentError, match="do not group"):
        ops.gated_delta_rule(emu_rt, zeros(1, 64), zeros(1, 3), zeros(1, 3), zeros(3, 8, 8), 2, 3, 8, False, 1e-6, 1.0)
