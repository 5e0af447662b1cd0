"""The DeltaNet mixer over a layer's state: the CUDA backend's (delta_net.cu on the emulator, and
on a GPU where there is one) against the host's NumPy mixer, prefill across a chunk boundary then
decode steps, the states compared after each call; and a snapshot restored in the device's memory."""
from __future__ import annotations

import numpy as np
import pytest

from engine.arch import delta_net
from engine.backends.cuda import emulated_backend, gpu_backend


@pytest.fixture(params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    return emulated_backend("CUDA0") if request.param == "emulated" else gpu_backend("CUDA0", 0)


def mixer_inputs(rng, n_tokens, heads: delta_net.DeltaNetHeads, kernel: int = 4):
    d, channels = heads.head_dim, (2 * heads.n_k_heads + heads.n_v_heads) * heads.head_dim
    qkv = rng.standard_normal((n_tokens, channels)).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (n_tokens, heads.n_v_heads)).astype(np.float32)
    g = -rng.uniform(0.01, 2.0, (n_tokens, heads.n_v_heads)).astype(np.float32)
    z = rng.standard_normal((n_tokens, heads.n_v_heads * d)).astype(np.float32)
    conv = (rng.standard_normal((channels, kernel)) / 2).astype(np.float32)
    norm = rng.uniform(0.9, 1.1, d).astype(np.float32)
    return (qkv, beta, g, z), (conv, norm)


def new_states(backend, heads, kernel: int = 4):
    channels = (2 * heads.n_k_heads + heads.n_v_heads) * heads.head_dim
    sizes = (1, (kernel - 1) * channels, heads.n_v_heads * heads.head_dim ** 2)
    return delta_net.RecurrentLayer(delta_net.HostMemory(), *sizes), backend.new_recurrent_layer(*sizes)


@pytest.mark.parametrize("grouped", [False, True])
def test_cuda_mixer_follows_the_host_mixer_through_prefill_and_decode(backend, grouped):
    rng = np.random.default_rng(5)
    heads = delta_net.DeltaNetHeads(2, 4, 16, grouped, 1e-6)
    host_state, device_state = new_states(backend, heads)
    weights = None
    for n_tokens in (70, 1, 1, 5):
        inputs, drawn = mixer_inputs(rng, n_tokens, heads)
        weights = weights or drawn
        expected = delta_net.mixer(host_state, *inputs, *weights, heads)
        got = backend.delta_net(device_state, *map(backend.to_device, inputs + weights), heads)
        np.testing.assert_allclose(backend.to_host(got), expected, rtol=1e-3, atol=1e-4)
        for mine, reference in ((device_state.conv, host_state.conv), (device_state.ssm, host_state.ssm)):
            np.testing.assert_allclose(backend.runtime.download(mine), reference, rtol=1e-4, atol=1e-5)


def test_a_snapshot_in_device_memory_restores_the_state(backend):
    rng = np.random.default_rng(6)
    heads = delta_net.DeltaNetHeads(1, 2, 8, False, 1e-6)
    _, state = new_states(backend, heads)
    inputs, weights = mixer_inputs(rng, 6, heads)
    device_inputs = [backend.to_device(a) for a in inputs + weights]
    backend.delta_net(state, *device_inputs, heads)
    saved = state.snapshot()
    first = backend.to_host(backend.delta_net(state, *device_inputs, heads))
    state.restore(saved)
    np.testing.assert_array_equal(backend.to_host(backend.delta_net(state, *device_inputs, heads)), first)
    state.clear()
    assert not backend.runtime.download(state.ssm).any() and not backend.runtime.download(state.conv).any()
