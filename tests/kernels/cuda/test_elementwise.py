"""Norms, softmax, rope (NORM, NEOX, partial, YaRN, frequency factors), SwiGLU/GeGLU, add and the
MoE router against the engine's own NumPy layer math (engine.arch.layers)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.arch import layers
from kernels.cuda import ops


def test_rms_norm_with_and_without_weight(rt, rng):
    x = rng.standard_normal((5, 300)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 300).astype(np.float32)
    for weight in (w, None):
        got = rt.download(ops.rms_norm(rt, rt.upload(x), None if weight is None else rt.upload(weight), 1e-6))
        np.testing.assert_allclose(got, layers.rms_norm(x, weight, 1e-6), rtol=2e-6, atol=1e-6)


def test_softmax_rows_with_scale(rt, rng):
    x = rng.standard_normal((3, 1000)).astype(np.float32) * 4
    got = rt.download(ops.softmax(rt, rt.upload(x), 0.5))
    np.testing.assert_allclose(got, layers.softmax(0.5 * x), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_dims, yarn, factors", [(64, False, False), (32, False, True), (64, True, False)])
def test_rope(rt, rng, neox, n_dims, yarn, factors):
    head_dim, n_tokens, n_head = 64, 7, 3
    positions = np.array([0, 1, 5, 17, 100, 2000, 40000], np.int64)
    x = rng.standard_normal((n_tokens, n_head, head_dim)).astype(np.float32)
    scaling = layers.RopeScaling(freq_scale=0.25, ext_factor=1.0, attn_factor=0.9, n_ctx_orig=4096) if yarn \
        else layers.RopeScaling()
    freq_factors = rng.uniform(1.0, 8.0, n_dims // 2).astype(np.float32) if factors else None
    corr = layers.yarn_corr_dims(n_dims, scaling.n_ctx_orig, 10000.0, scaling.beta_fast, scaling.beta_slow) \
        if yarn else (0.0, 0.0)
    cos, sin = ops.rope_cos_sin(rt, rt.upload(positions), n_dims, 10000.0, scaling.freq_scale, scaling.ext_factor,
                                scaling.attn_factor, corr, None if freq_factors is None else rt.upload(freq_factors))
    ref_cos, ref_sin = layers.rope_cos_sin(positions, n_dims, 10000.0, scaling, freq_factors)
    np.testing.assert_allclose(rt.download(cos), ref_cos, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rt.download(sin), ref_sin, rtol=1e-6, atol=1e-7)
    got = rt.download(ops.rope(rt, rt.upload(x), cos, sin, neox))
    np.testing.assert_allclose(got, layers.apply_rope(x, ref_cos, ref_sin, neox), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["swiglu", "geglu", "add"])
def test_binary_ops(rt, rng, name):
    a, b = (rng.standard_normal((3, 333)).astype(np.float32) * 3 for _ in range(2))
    got = rt.download(getattr(ops, name)(rt, rt.upload(a), rt.upload(b)))
    expected = a + b if name == "add" else getattr(layers, name)(a, b)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=3e-6)      # 1 + tanh cancels for very negative gates


ROUTINGS = {
    "mixtral": layers.Routing(n_expert_used=2, norm_weights=True),
    "qwen3moe-no-norm": layers.Routing(n_expert_used=8),
    "deepseek-v3": layers.Routing(n_expert_used=8, gating="sigmoid", norm_weights=True, weights_scale=2.5,
                                  n_groups=8, n_groups_used=4),
    "llama4": layers.Routing(n_expert_used=1, gating="sigmoid", select_on_logits=True),
}


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_moe_router_picks_the_engines_experts(rt, rng, name):
    routing = ROUTINGS[name]
    n_expert = 64 if routing.n_groups else 16
    logits = rng.standard_normal((5, n_expert)).astype(np.float32) * 2
    bias = rng.standard_normal(n_expert).astype(np.float32) * 0.1 if routing.gating == "sigmoid" else None
    ids, weights = ops.moe_route(rt, rt.upload(logits), routing.n_expert_used, routing.gating, routing.select_on_logits,
                                 None if bias is None else rt.upload(bias), routing.n_groups, routing.n_groups_used,
                                 routing.norm_weights, routing.weights_scale)
    ref_ids, ref_weights = layers.select_experts(logits, routing, bias)
    np.testing.assert_array_equal(rt.download(ids), ref_ids)
    np.testing.assert_allclose(rt.download(weights), ref_weights, rtol=2e-6, atol=1e-7)
