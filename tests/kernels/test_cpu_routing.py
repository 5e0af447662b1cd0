"""One token's router and weighted sum (kernels.cpu.routing) against engine.arch.layers'
select_experts array math (run on two tokens, its general path) over the routings of the
families (softmax or sigmoid, selection bias, grouped top-k, ranking on logits, normalisation,
scale). select_experts' one host token (NumPy's probabilities, then route_probabilities): bit for
bit. route_token (libm's exp): the same experts in the same order, the weights within 8 ulp
(exp differs in the last bit between libm and NumPy's SIMD exp; the sums are NumPy's pairwise
sums, bit for bit); examples with two scores within 1e-5 of each other but not equal are set
aside there, as exp's last bit decides them. combine against moe_feed_forward's sum, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from engine.arch import layers
from kernels.cpu.routing import GATING, _sum, combine, route_token

F32 = st.floats(-30.0, 30.0, width=32, allow_subnormal=False)


@st.composite
def routed_tokens(draw):
    """(logits (n_expert,), Routing, bias or None): a family's routing on one token's logits."""
    n_groups = draw(st.sampled_from([0, 0, 2, 4, 8]))
    n_expert = draw(st.integers(2, 20)) * max(n_groups, 1) if n_groups else draw(st.integers(1, 160))
    gating = draw(st.sampled_from(["softmax", "sigmoid"]))
    grid = draw(st.booleans())              # values on a coarse grid: exact ties between experts
    values = st.integers(-12, 12).map(lambda i: i / 4) if grid else F32
    logits = np.array(draw(st.lists(values, min_size=n_expert, max_size=n_expert)), dtype=np.float32)
    bias = None
    if draw(st.booleans()):
        bias = np.array(draw(st.lists(values, min_size=n_expert, max_size=n_expert)), dtype=np.float32) / 8
    routing = layers.Routing(
        n_expert_used=draw(st.integers(1, min(n_expert, 10))), gating=gating, norm_weights=draw(st.booleans()),
        weights_scale=draw(st.sampled_from([0.0, 1.0, 2.5, 16.0])), n_groups=n_groups,
        n_groups_used=draw(st.integers(1, n_groups)) if n_groups else 0, select_on_logits=draw(st.booleans()))
    return logits, routing, bias


def ranked_scores(logits, routing, bias):
    """What select_experts ranks, in float64: the experts' scores and, when grouped, the groups'."""
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum() if routing.gating == "softmax" else 1 / (1 + np.exp(-x))
    scores = (x if routing.select_on_logits else probs) + (0 if bias is None else bias)
    if routing.n_groups > 1:
        groups = np.sort(scores.reshape(routing.n_groups, -1), axis=-1)[:, -2:].sum(axis=-1)
        return np.concatenate([scores, groups])
    return scores


def near_tie(scores) -> bool:
    """Two scores that differ, by less than float32's rounding can tell apart or reorder."""
    s = np.unique(scores[np.isfinite(scores)])
    return bool(np.any(np.diff(s) <= 1e-5 * np.maximum(np.abs(s[1:]), 1e-30)))


def route(logits, routing, bias):
    return route_token(logits, GATING[routing.gating], routing.select_on_logits,
                       np.zeros(0, np.float32) if bias is None else bias, routing.n_groups, routing.n_groups_used,
                       routing.n_expert_used, routing.norm_weights, routing.weights_scale)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routed_tokens())
def test_route_token_picks_select_experts_experts(case):
    logits, routing, bias = case
    assume(not near_tie(ranked_scores(logits, routing, bias)))
    ref_ids, ref_weights = layers.select_experts(np.stack([logits, logits]), routing, bias)   # the general path
    ids, weights = route(logits, routing, bias)
    assert ids.dtype == np.int64 and weights.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids[0])
    np.testing.assert_array_max_ulp(weights, ref_weights[0], maxulp=8)


def test_route_token_ties_go_to_the_lower_expert():
    logits = np.array([1.0, 2.0, 2.0, 0.5, 2.0, 1.0], dtype=np.float32)
    ids, _ = route(logits, layers.Routing(4), None)
    assert ids.tolist() == [1, 2, 4, 0]


def test_route_token_grouped_keeps_the_best_groups():
    # groups of 2: {0,1} scores 0.9 + 0.0, {2,3} 0.5 + 0.5, {4,5} 0.6 + 0.45: expert 0 is the best
    # single expert but its group is the worst
    probs = np.array([0.9, 0.0, 0.5, 0.5, 0.6, 0.45], dtype=np.float32)
    logits = np.log(probs / (1 - probs + 1e-9) + 1e-30).astype(np.float32)
    routing = layers.Routing(2, gating="sigmoid", n_groups=3, n_groups_used=2, norm_weights=True, weights_scale=2.5)
    ids, weights = route(logits, routing, None)
    assert sorted(ids.tolist()) == [2, 4]
    assert weights.sum() == pytest.approx(2.5, rel=1e-6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routed_tokens())
def test_one_host_token_is_select_experts_bit_for_bit(case):
    """select_experts' one-token path (NumPy's probabilities, then route_probabilities) against
    its general path: no tolerance, no example set aside."""
    logits, routing, bias = case
    ref_ids, ref_weights = layers.select_experts(np.stack([logits, logits]), routing, bias)
    ids, weights = layers.select_experts(logits[None, :], routing, bias)
    assert ids.shape == (1, routing.n_expert_used) and weights.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids[:1])
    assert np.array_equal(weights.view(np.uint32), ref_weights[:1].view(np.uint32))


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=9), dict(bias=np.zeros(3, np.float32)), dict(n_groups=3)])
def test_route_token_rejects_bad_arguments(bad):
    args = dict(k=2, bias=np.zeros(0, np.float32), n_groups=0)
    args.update(bad)
    with pytest.raises(ValueError, match="route_token"):
        route_token(np.zeros(8, np.float32), 0, False, args["bias"], args["n_groups"], 1, args["k"], True, 0.0)


@pytest.mark.parametrize("n", list(range(1, 20)) + [127, 128, 129, 200, 256, 300, 1000])
def test_sum_is_numpys_sum_bit_for_bit(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        a = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 4, n)).astype(np.float32)
        assert _sum(a) == np.sum(a) or (np.isnan(_sum(a)) and np.isnan(np.sum(a)))
        assert np.signbit(_sum(a)) == np.signbit(np.sum(a))


def moe_sum(rows, ids, weights):
    """moe_feed_forward's weighted sum of one token: zeros, then + y * w in ascending expert id."""
    out = np.zeros((1, rows.shape[1]), dtype=np.float32)
    for j in np.argsort(ids, kind="stable"):
        out = out + rows[j:j + 1] * weights[j]
    return out[0]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10), st.integers(1, 300), st.integers(0, 2 ** 32 - 1))
def test_combine_is_moe_feed_forwards_sum(k, n, seed):
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((k, n)) * 10.0 ** rng.uniform(-3, 3, (k, 1))).astype(np.float32)
    ids = rng.permutation(128)[:k].astype(np.int64)
    weights = rng.random(k).astype(np.float32)
    out = np.full(n, np.nan, dtype=np.float32)
    combine(rows, ids, weights, out)
    np.testing.assert_array_equal(out, moe_sum(rows, ids, weights))
