"""A MoE layer's router and weighted sum for one token, as Numba kernels.

    route_token(logits, gating, select_on_logits, bias, n_groups, n_groups_used, k, norm_weights,
                weights_scale) -> (ids int64 (k,), weights float32 (k,))
    route_probabilities(logits, probs, select_on_logits, bias, ...) -> the same from probabilities
    combine(rows, ids, weights, out)

`engine.arch.layers.select_experts` is array math for any device and any number of tokens; for
the one token of a CPU decode step its dozen NumPy calls cost 30-46 us per layer, more than the
arithmetic on 128 logits. route_token does the same steps in one call (llama.cpp build_moe_ffn:
probabilities, selection bias, grouped top-k on llama.cpp's top-2-sum group scores, weight
normalisation with the float16-min clamp, scale), choosing the same experts in the same order:
ties go to the lower expert id, as select_experts' stable sort of the negated scores ranks them.

Every float32 sum is NumPy's pairwise sum in its order, so the weights are bit-identical to
select_experts' wherever the probabilities are. route_token takes exp from libm, select_experts
from NumPy's SIMD exp; they differ in the last bit for many inputs, so route_token's weights
agree within 8 ulp (6 seen over 20000 tokens of 128 experts, one in sixteen bit for bit) and
two experts whose probabilities are that close may swap places. Where results must not depend
on the device (a placement's layers on a simulated GPU run NumPy's exp), the host's one token
takes its probabilities from NumPy and the rest from `route_probabilities`: bit for bit.

combine sums the experts' output rows in ascending expert id from zero, weight times row, in
float32: exactly `moe_feed_forward`'s sum, whatever the order the rows come in.
"""

from __future__ import annotations

import numpy as np
from numba import njit

GATING = {"softmax": 0, "sigmoid": 1}       # route_token's gating codes
_F16_MIN_NORMAL = np.float32(6.103515625e-5)    # llama.cpp's clamp of the weights' sum
_PAIRWISE_BLOCK = 128                           # NumPy's pairwise sum: unrolled below this


@njit(cache=True, nogil=True)
def _block_sum(a, first, n):
    """NumPy's pairwise sum of a[first:first + n], n <= 128: eight running sums added as a tree,
    the elements after the last multiple of eight one by one (fewer than eight: one by one)."""
    if n < 8:
        s = np.float32(0.0)
        for i in range(first, first + n):
            s += a[i]
        return s
    r = np.empty(8, dtype=np.float32)
    for j in range(8):
        r[j] = a[first + j]
    end8 = first + n - n % 8
    for i in range(first + 8, end8, 8):
        for j in range(8):
            r[j] += a[i + j]
    s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for i in range(end8, first + n):
        s += a[i]
    return s


@njit(cache=True, nogil=True)
def _pairwise_sum(a):
    """The float32 sum of a in NumPy's pairwise order: ranges over 128 elements split in halves
    cut at a multiple of eight, each half summed alone, then the two added (an explicit stack:
    Numba's cached functions cannot recurse)."""
    firsts = np.empty(128, dtype=np.int64)
    lengths = np.empty(128, dtype=np.int64)        # a negative length: add the last two sums
    sums = np.empty(64, dtype=np.float32)
    firsts[0], lengths[0] = 0, a.shape[0]
    n_open, n_sums = 1, 0
    while n_open:
        n_open -= 1
        first, n = firsts[n_open], lengths[n_open]
        if n < 0:
            n_sums -= 1
            sums[n_sums - 1] = sums[n_sums - 1] + sums[n_sums]
        elif n <= _PAIRWISE_BLOCK:
            sums[n_sums] = _block_sum(a, first, n)
            n_sums += 1
        else:
            half = n // 2
            half -= half % 8
            firsts[n_open], lengths[n_open] = 0, -1
            firsts[n_open + 1], lengths[n_open + 1] = first + half, n - half
            firsts[n_open + 2], lengths[n_open + 2] = first, half
            n_open += 3
    return sums[0]


@njit(cache=True, nogil=True)
def _sum(a):
    """NumPy's np.sum of a float32 vector: its identity zero plus the pairwise sum."""
    return np.float32(0.0) + _pairwise_sum(a)


@njit(cache=True, nogil=True)
def _probabilities(logits, gating):
    """softmax(logits) (gating 0) or sigmoid(logits) (gating 1), in float32 as layers computes them."""
    n = logits.shape[0]
    probs = np.empty(n, dtype=np.float32)
    if gating == 1:
        for e in range(n):
            probs[e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[e]))
        return probs
    top = logits[0]
    for e in range(1, n):
        top = max(top, logits[e])
    for e in range(n):
        probs[e] = np.exp(logits[e] - top)
    total = _sum(probs)
    for e in range(n):
        probs[e] = probs[e] / total
    return probs


@njit(cache=True, nogil=True)
def _keep_best_groups(scores, n_groups, n_groups_used):
    """Set the scores of all but the n_groups_used best groups to -inf; a group scores the sum of
    its two best experts, ties to the lower group (layers.best_groups_mask)."""
    size = scores.shape[0] // n_groups
    group_score = np.empty(n_groups, dtype=np.float32)
    for g in range(n_groups):
        best, second = np.float32(-np.inf), np.float32(-np.inf)
        for e in range(g * size, (g + 1) * size):
            if scores[e] > best:
                best, second = scores[e], best
            elif scores[e] > second:
                second = scores[e]
        group_score[g] = best if size == 1 else second + best
    for g in range(n_groups):
        beaten_by = 0
        for other in range(n_groups):
            if group_score[other] > group_score[g] or (group_score[other] == group_score[g] and other < g):
                beaten_by += 1
        if beaten_by >= n_groups_used:
            scores[g * size:(g + 1) * size] = -np.inf


@njit(cache=True, nogil=True)
def _top_k(scores, k):
    """The ids of the k highest scores, best first, ties to the lower id (a stable sort of the
    negated scores)."""
    ids = np.empty(k, dtype=np.int64)
    n_held = 0
    for e in range(scores.shape[0]):
        if n_held == k and not scores[e] > scores[ids[k - 1]]:
            continue
        j = min(n_held, k - 1)              # the slot it takes: after every score >= it
        while j > 0 and scores[e] > scores[ids[j - 1]]:
            ids[j] = ids[j - 1]
            j -= 1
        ids[j] = e
        n_held = min(n_held + 1, k)
    return ids


@njit(cache=True, nogil=True)
def route_token(logits, gating, select_on_logits, bias, n_groups, n_groups_used, k, norm_weights, weights_scale):
    """(ids int64 (k,), weights float32 (k,)) of one token from its router logits float32
    (n_expert,): engine.arch.layers.select_experts for one token. gating: GATING's code; bias:
    the selection bias (n_expert,), or empty for none; n_groups > 1: grouped top-k."""
    return route_probabilities(logits, _probabilities(logits, gating), select_on_logits, bias, n_groups,
                               n_groups_used, k, norm_weights, weights_scale)


@njit(cache=True, nogil=True)
def route_probabilities(logits, probs, select_on_logits, bias, n_groups, n_groups_used, k, norm_weights,
                        weights_scale):
    """route_token from the router's probabilities already computed (probs float32 (n_expert,)):
    bit for bit select_experts' choice and weights when probs are its probabilities."""
    n_expert = logits.shape[0]
    if k < 1 or k > n_expert:
        raise ValueError("route_token: the number of experts used is not between 1 and the number of experts")
    if bias.shape[0] not in (0, n_expert) or probs.shape[0] != n_expert:
        raise ValueError("route_token: the selection bias or the probabilities do not have one value per expert")
    if n_groups > 1 and n_expert % n_groups != 0:
        raise ValueError("route_token: the experts do not split into the groups evenly")
    scores = np.empty(n_expert, dtype=np.float32)
    for e in range(n_expert):
        scores[e] = logits[e] if select_on_logits else probs[e]
        if bias.shape[0] == n_expert:
            scores[e] += bias[e]
    if n_groups > 1:
        _keep_best_groups(scores, n_groups, n_groups_used)
    ids = _top_k(scores, k)
    weights = np.empty(k, dtype=np.float32)
    for j in range(k):
        weights[j] = probs[ids[j]]
    if norm_weights:
        total = max(_sum(weights), _F16_MIN_NORMAL)
        for j in range(k):
            weights[j] = weights[j] / total
    if weights_scale != 0.0 and weights_scale != 1.0:
        scale = np.float32(weights_scale)
        for j in range(k):
            weights[j] = weights[j] * scale
    return ids, weights


@njit(cache=True, nogil=True)
def combine(rows, ids, weights, out):
    """out (n,) = the sum of weights[j] * rows[j] (float32 (k, n), rows[j] the output of expert
    ids[j]) from zero in ascending expert id, each term rounded to float32 before it is added."""
    order = np.argsort(ids, kind="mergesort")
    out[:] = 0.0
    for j in order:
        w = weights[j]
        for c in range(out.shape[0]):
            out[c] += rows[j, c] * w
