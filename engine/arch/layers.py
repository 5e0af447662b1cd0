"""Shared transformer math, written once for every architecture family.

Activations are float32 arrays shaped (n_tokens, ...), rows first, of whatever array namespace
the device running the layer uses (NumPy on the CPU, array-api-strict on a simulated GPU, CuPy on
CUDA): every function takes its namespace from its inputs (`namespace`), builds what it needs
(rope tables, masks) on the device of those inputs, and never indexes with boolean masks or
copies through NumPy. Functions that read weights take the backend `ops` (see
engine.backends.protocol). Where llama.cpp's result depends on a detail (rope pairing, YaRN
ramp, routing order), the matching ggml/llama.cpp function is named.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import array_api_compat
import array_api_compat.numpy as numpy_namespace
import numpy as np
from gguf.constants import Keys

from engine.arch.base import AttentionKind, Metadata


def namespace(x):
    """The array namespace of x. NumPy arrays, the CPU's hot loop, skip the general lookup."""
    if type(x) is np.ndarray:
        return numpy_namespace
    return array_api_compat.array_namespace(x)


# --- norms and activations ------------------------------------------------------------------


def rms_norm(x, weight, eps: float):
    """x / sqrt(mean(x^2) + eps) over the last axis, times weight (llama.cpp build_norm RMS)."""
    xp = namespace(x)
    mean_square = xp.mean(x * x, axis=-1, keepdims=True)
    y = x * (1.0 / xp.sqrt(mean_square + eps))
    return y if weight is None else y * weight


def softmax(x, axis: int = -1):
    xp = namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def sigmoid(x):
    with np.errstate(over="ignore"):    # exp(-x) overflows to inf for very negative x: sigmoid 0
        return 1.0 / (1.0 + namespace(x).exp(-x))


def swiglu(gate, up):
    """silu(gate) * up."""
    return gate * sigmoid(gate) * up


def gelu_tanh(x):
    """GELU, tanh approximation (ggml_gelu)."""
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + namespace(x).tanh(c * x * (1.0 + 0.044715 * x * x)))


def geglu(gate, up):
    return gelu_tanh(gate) * up


def softcap(x, cap: float):
    return cap * namespace(x).tanh(x / cap)


def add_rms_norm(residual, y, weight, eps: float):
    """residual + rms_norm(y) * weight: a sub-block's output normalised into the residual (gemma)."""
    return residual + rms_norm(y, weight, eps)


def glu(gate, up, activation=swiglu):
    """activation(gate, up): swiglu or geglu, the gated unit of a feed-forward block."""
    return activation(gate, up)


# --- rotary position embedding ----------------------------------------------------------------


@dataclass(frozen=True)
class RopeScaling:
    """llama.cpp's rope scaling parameters as they reach ggml_rope_ext."""

    freq_scale: float = 1.0
    ext_factor: float = 0.0         # 1 with YaRN
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0

    @classmethod
    def from_metadata(cls, md, hp, yarn_mscale_is_log_mul: bool = False, yarn_log_mul: float = 0.0) -> RopeScaling:
        """The scaling llama_context sets up: 'none' never scales, 'yarn' extrapolates with the
        attention factor adjusted so that the rope op's own magnitude factor cancels out."""
        m = Metadata(md)
        kind = str(m.get(Keys.Rope.SCALING_TYPE, "linear"))
        freq_scale = 1.0 if kind == "none" else hp.rope_freq_scale
        n_ctx_orig = int(m.get(Keys.Rope.SCALING_ORIG_CTX_LEN, 0) or hp.n_ctx_train)
        attn_factor = 1.0
        ext_factor = 1.0 if kind == "yarn" else 0.0
        if ext_factor:
            factor = 1.0 / freq_scale

            def mscale_of(mscale: float) -> float:
                return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0

            if yarn_log_mul:
                mscale = yarn_log_mul if yarn_mscale_is_log_mul and yarn_log_mul != 1.0 else 1.0
                attn_factor = mscale_of(mscale) / mscale_of(yarn_log_mul)
            else:
                attn_factor = mscale_of(1.0)
            attn_factor /= 1.0 + 0.1 * math.log(factor)
        attn_factor *= float(m.get(Keys.Rope.SCALING_ATTN_FACTOR, 1.0) or 1.0)
        return cls(freq_scale=freq_scale, ext_factor=ext_factor, attn_factor=attn_factor, n_ctx_orig=n_ctx_orig)


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float):
    """ggml_rope_yarn_corr_dims: the dimension range over which YaRN ramps from interpolation
    to extrapolation."""
    def corr_dim(n_rot: float) -> float:
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    low = math.floor(corr_dim(beta_fast))
    high = math.ceil(corr_dim(beta_slow))
    return max(0.0, low), min(n_dims - 1.0, high)


def rope_cos_sin(positions, n_dims: int, base: float, scaling: RopeScaling = RopeScaling(), freq_factors=None):
    """cos and sin (n_tokens, n_dims/2) of each rotation, magnitude included
    (ggml_rope_cache_init), on the device of `positions` (int64 (n_tokens,))."""
    xp = namespace(positions)
    i = xp.arange(n_dims // 2, dtype=xp.float64, device=array_api_compat.device(positions))
    theta_extrap = xp.astype(positions, xp.float64)[:, None] * base ** (-2.0 * i / n_dims)
    if freq_factors is not None:
        theta_extrap = theta_extrap / xp.astype(freq_factors[: n_dims // 2], xp.float64)
    theta = scaling.freq_scale * theta_extrap
    mscale = scaling.attn_factor
    if scaling.ext_factor != 0.0:
        low, high = yarn_corr_dims(n_dims, scaling.n_ctx_orig, base, scaling.beta_fast, scaling.beta_slow)
        ramp = (1.0 - xp.clip((i - low) / max(0.001, high - low), 0.0, 1.0)) * scaling.ext_factor
        theta = theta * (1.0 - ramp) + theta_extrap * ramp
        mscale *= 1.0 + 0.1 * math.log(1.0 / scaling.freq_scale)
    return xp.astype(xp.cos(theta) * mscale, xp.float32), xp.astype(xp.sin(theta) * mscale, xp.float32)


def apply_rope(x, cos, sin, neox: bool):
    """Rotate the first n_dims values of each head of x (n_tokens, n_head, head_dim).

    NORM rotates adjacent pairs (x0, x1), (x2, x3), ...; NEOX pairs x[i] with x[i + n_dims/2].
    """
    xp = namespace(x)
    half = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        x0, x1 = x[..., :half], x[..., half:2 * half]
        rotated = [x0 * c - x1 * s, x0 * s + x1 * c]
    else:
        x0, x1 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        pairs = xp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)      # (T, n_head, half, 2)
        rotated = [xp.reshape(pairs, (*x.shape[:-1], 2 * half))]
    if 2 * half < x.shape[-1]:
        rotated.append(x[..., 2 * half:])
    return rotated[0] if len(rotated) == 1 else xp.concat(rotated, axis=-1)


def rope_qk(q, k, cos, sin, neox: bool, q_scale: float = 1.0):
    """q and k (T, heads, head_dim) rotated by the same tables; q also times q_scale (gemma
    scales its queries right after the rotation)."""
    q = apply_rope(q, cos, sin, neox)
    return (q if q_scale == 1.0 else q * q_scale), apply_rope(k, cos, sin, neox)


class ArrayOps:
    """The small ops of a layer over the array namespace of their inputs: what runs on a
    backend without kernels of its own for them (engine.backends.protocol.LayerOps)."""

    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    glu = staticmethod(glu)
    rope_qk = staticmethod(rope_qk)


# --- attention ----------------------------------------------------------------------------------


def visible(q_pos, k_pos, kind: AttentionKind, window: int):
    """(n_q, n_k) bool on the device of the positions: which cached keys each query may see
    (llama_hparams::is_masked_swa). Empty cells hold position -1."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k >= 0) & (k <= q)
    if kind is AttentionKind.SLIDING:
        mask = mask & (q - k < window)
    elif kind is AttentionKind.CHUNKED:
        mask = mask & (k >= (q // window) * window)
    return mask


SCORE_BLOCK_VALUES = 1 << 22    # attention scores held at once (64 MiB of float32)


def attention(q, k, v, mask, kq_scale: float, round_probs=None):
    """softmax(kq_scale * q k^T + mask) v with grouped-query heads: query head h reads kv head
    h // (n_head / n_head_kv). q (T, n_head, d_k), k (N, n_head_kv, d_k), v (N, n_head_kv, d_v),
    mask (T, N) bool -> (T, n_head * d_v). `round_probs`, when given, rounds the probabilities
    before the v product (llama.cpp without flash attention: to v's dot type). Long prefills go
    in blocks of queries to bound the score matrix."""
    n_tokens, n_head, _ = q.shape
    block = max(1, SCORE_BLOCK_VALUES // (n_head * k.shape[0]))
    if n_tokens <= block:
        return _attention_block(q, k, v, mask, kq_scale, round_probs)
    return namespace(q).concat([_attention_block(q[t:t + block, ...], k, v, mask[t:t + block, :], kq_scale,
                                                 round_probs) for t in range(0, n_tokens, block)], axis=0)


def _attention_block(q, k, v, mask, kq_scale, round_probs=None):
    xp = namespace(q)
    n_tokens, n_head, d_k = q.shape
    n_kv, n_head_kv, d_v = v.shape
    group = n_head // n_head_kv
    qg = xp.reshape(xp.permute_dims(xp.reshape(q, (n_tokens, n_head_kv, group, d_k)), (1, 2, 0, 3)),
                    (n_head_kv, group * n_tokens, d_k))
    scores = xp.reshape(qg @ xp.permute_dims(k, (1, 2, 0)), (n_head_kv, group, n_tokens, n_kv)) * kq_scale
    scores = xp.where(mask, scores, -math.inf)                                        # (n_head_kv, group, T, N)
    probs = xp.reshape(softmax(scores), (n_head_kv, group * n_tokens, n_kv))
    if round_probs is not None:
        probs = round_probs(probs)
    out = probs @ xp.permute_dims(v, (1, 0, 2))                                       # (n_head_kv, group * T, d_v)
    out = xp.permute_dims(xp.reshape(out, (n_head_kv, group, n_tokens, d_v)), (2, 0, 1, 3))
    return xp.reshape(out, (n_tokens, n_head * d_v))


def qkv_projections(ops, x, lw, n_head: int, n_head_kv: int, head_k: int, head_v: int):
    """Q (T, n_head, head_k), K (T, n_head_kv, head_k), V (T, n_head_kv, head_v), biases added
    where the layer has them (llama.cpp build_qkv)."""
    xp = namespace(x)
    names = ("attn_q", "attn_k", "attn_v")
    heads = ((n_head, head_k), (n_head_kv, head_k), (n_head_kv, head_v))

    def shaped(name: str, y, heads: int, size: int):
        bias = lw.get(f"{name}.bias")
        if bias is not None:
            y = y + bias
        return xp.reshape(y, (x.shape[0], heads, size))
    ys = ops.matmuls(x, [lw.get(name) for name in names])
    return tuple(shaped(name, y, *shape) for name, y, shape in zip(names, ys, heads))


# --- feed-forward and mixture of experts --------------------------------------------------------


def feed_forward(ops, x, gate, up, down, activation=swiglu):
    """down(act(gate(x)) * up(x)) (llama.cpp build_ffn, LLM_FFN_PAR)."""
    return ops.matmul(ops.glu(*ops.matmuls(x, (gate, up)), activation), down)


def expert_feed_forward(backend, x, gate, up, down, expert: int, activation=swiglu):
    """One expert's FFN on the device holding it: gate/up/down are that device's part. The
    activation is the ops' `glu`, the one the dense FFN and the grouped experts apply."""
    y = backend.glu(backend.expert_matmul(x, gate, expert), backend.expert_matmul(x, up, expert), activation)
    return backend.expert_matmul(y, down, expert)


@dataclass(frozen=True)
class Routing:
    """How a MoE layer picks and weights its experts (llama.cpp build_moe_ffn's arguments)."""

    n_expert_used: int
    gating: str = "softmax"             # router probabilities: softmax over experts or sigmoid
    norm_weights: bool = False          # renormalise the chosen experts' weights to sum 1
    weights_scale: float = 0.0          # multiply the weights (0 or 1: leave them)
    n_groups: int = 0                   # grouped top-k (DeepSeek-V3): experts in n_groups groups,
    n_groups_used: int = 0              # only the best n_groups_used groups compete
    select_on_logits: bool = False      # rank experts by raw router logits (llama4)
    weight_before_ffn: bool = False     # scale the expert's input rather than its output (llama4)


def best_groups_mask(group_scores, n_used: int):
    """(T, n_groups) bool: the n_used best groups of each token, ties to the lower index (as a
    stable sort of the negated scores ranks them)."""
    xp = namespace(group_scores)
    s, other = group_scores[:, :, None], group_scores[:, None, :]
    n_groups = group_scores.shape[1]
    index = xp.arange(n_groups, device=array_api_compat.device(group_scores))
    earlier = index[None, None, :] < index[None, :, None]
    beaten_by = (other > s) | ((other == s) & earlier)                  # (T, group, other group)
    return xp.sum(xp.astype(beaten_by, xp.int64), axis=-1) < n_used


def select_experts(logits, routing: Routing, selection_bias=None):
    """(expert ids (T, k) int64, weights (T, k) float32) from router logits (T, n_expert), on
    the logits' device (llama.cpp build_moe_ffn: probabilities, biased selection, grouped
    top-k, weight normalisation and scale). One token on the host takes the probabilities, then
    one Numba call for the rest (kernels.cpu.routing.route_probabilities: bit for bit)."""
    if type(logits) is np.ndarray and logits.shape[0] == 1:
        return _route_host_token(logits[0], routing, selection_bias)
    xp = namespace(logits)
    probs = softmax(logits) if routing.gating == "softmax" else sigmoid(logits)
    scores = logits if routing.select_on_logits else probs
    if selection_bias is not None:
        scores = scores + selection_bias            # biases the choice, not the weights
    if routing.n_groups > 1:
        n_tokens, n_expert = scores.shape
        groups = xp.reshape(scores, (n_tokens, routing.n_groups, n_expert // routing.n_groups))
        group_scores = xp.sum(xp.sort(groups, axis=-1)[..., -2:], axis=-1)      # top-2 sum per group
        keep = best_groups_mask(group_scores, routing.n_groups_used)
        scores = xp.reshape(xp.where(keep[:, :, None], groups, -math.inf), (n_tokens, n_expert))
    ids = xp.argsort(-scores, axis=-1, stable=True)[:, :routing.n_expert_used]
    weights = xp.take_along_axis(probs, ids, axis=-1)
    if routing.norm_weights:
        # clamp like llama.cpp: the smallest normal float16
        weights = weights / xp.clip(xp.sum(weights, axis=-1, keepdims=True), min=6.103515625e-5)
    if routing.weights_scale not in (0.0, 1.0):
        weights = weights * routing.weights_scale
    return ids, xp.astype(weights, xp.float32)


_NO_BIAS = np.zeros(0, np.float32)


def _route_host_token(row: np.ndarray, routing: Routing, selection_bias) -> tuple:
    """select_experts of one host token: its probabilities by NumPy (softmax's operations on the
    row itself, a third of the time of keepdims reductions, bit for bit), the rest by one call."""
    from kernels.cpu.routing import route_probabilities
    if routing.gating == "softmax":
        e = np.exp(row - row.max())
        probs = e / e.sum()
    else:
        probs = sigmoid(row)
    bias = _NO_BIAS if selection_bias is None else np.asarray(selection_bias, dtype=np.float32)
    ids, weights = route_probabilities(row, probs, routing.select_on_logits, bias, routing.n_groups,
                                       routing.n_groups_used, routing.n_expert_used, routing.norm_weights,
                                       routing.weights_scale)
    return ids[None, :], weights[None, :]


@dataclass(frozen=True)
class ExpertRows:
    """Host bookkeeping of one MoE step (llama.cpp's mul_mat_id row mapping): the selected
    (token, expert) pairs as rows grouped by device, then by expert.

    Row r carries token `row_token[r]` into expert `row_expert[r]`; `segments` lists, per
    device in order, (device, [(expert, first_row, end_row), ...]); `slot_row[t, j]` is the row
    holding token t's j-th expert in ascending expert order, and `slot_order[t, j]` that
    expert's slot in the router's (T, k) output."""

    row_token: np.ndarray
    row_slot: np.ndarray            # flat index t * k + slot of each row's routing weight
    segments: tuple
    slot_row: np.ndarray
    slot_order: np.ndarray


def _one_token_rows(ids: np.ndarray, expert_device) -> ExpertRows | None:
    """expert_rows of a decode step whose k distinct experts share one device: row j holds the
    j-th smallest expert (a tenth of the general mapping's NumPy calls); None otherwise."""
    order = np.argsort(ids[0], kind="stable")
    experts = ids[0][order].tolist()
    devices = {expert_device(e) for e in experts}
    if len(devices) != 1 or len(set(experts)) != len(experts):
        return None
    k = len(experts)
    spans = tuple((e, j, j + 1) for j, e in enumerate(experts))
    return ExpertRows(np.zeros(k, dtype=np.int64), order, ((devices.pop(), spans),),
                      np.arange(k, dtype=np.int64)[None, :], order[None, :])


def expert_rows(ids: np.ndarray, expert_device) -> ExpertRows:
    """The row mapping of host expert ids (T, k); expert_device(e) names the device of expert e.
    Devices come in the order of their lowest selected expert, experts ascending within one."""
    if ids.shape[0] == 1:
        one = _one_token_rows(ids, expert_device)
        if one is not None:
            return one
    k = ids.shape[1]
    flat = ids.reshape(-1)
    experts, counts = np.unique(flat, return_counts=True)
    devices = [expert_device(int(e)) for e in experts]
    rank = {device: i for i, device in enumerate(dict.fromkeys(devices))}
    expert_rank = np.array([rank[d] for d in devices], dtype=np.int64)
    position = np.searchsorted(experts, flat)                   # each row's expert, as an index
    # rows sorted by (device, expert); the stable sort keeps each expert's tokens in order
    row_slot = np.argsort(expert_rank[position] * len(experts) + position, kind="stable")
    row_of = np.empty(len(flat), dtype=np.int64)
    row_of[row_slot] = np.arange(len(flat))
    segments, first = {}, 0
    for i in np.argsort(expert_rank, kind="stable").tolist():
        segments.setdefault(devices[i], []).append((int(experts[i]), first, first + int(counts[i])))
        first += int(counts[i])
    slot_order = np.argsort(ids, axis=-1, kind="stable")
    return ExpertRows(row_slot // k, row_slot, tuple((d, tuple(spans)) for d, spans in segments.items()),
                      np.take_along_axis(row_of.reshape(ids.shape), slot_order, axis=-1), slot_order)


def moe_feed_forward(ops, x, lw, routing: Routing, expert_counts: np.ndarray, activation=swiglu):
    """The routed experts' output: only the selected experts run, each over the tokens that chose
    it, on the device that holds it (`ops.expert_ffn`, one move in and one out per device); the
    outputs are weighted and summed here, per token in ascending expert order, so the result does
    not depend on where the experts live. expert_counts (n_expert,) counts the selections."""
    xp = namespace(x)
    ids, weights = select_experts(ops.matmul(x, lw.ffn_gate_inp), routing, lw.get("exp_probs_b.bias"))
    ids = ops.to_host(ids)              # which experts run is decided on the host, as in llama.cpp
    expert_counts += np.bincount(ids.ravel(), minlength=len(expert_counts))
    rows = expert_rows(ids, ops.expert_device(lw.ffn_gate_exps))
    flat_weights = xp.reshape(weights, (-1,))
    rows_in = xp.take(x, ops.index(rows.row_token), axis=0)                       # (R, n_embd)
    if routing.weight_before_ffn:
        rows_in = rows_in * xp.take(flat_weights, ops.index(rows.row_slot))[:, None]
    rows_out = ops.expert_ffn(rows_in, rows.segments, lw, activation)            # (R, n_embd)
    if type(rows_out) is np.ndarray and ids.shape[0] == 1:
        return _combine_host_token(rows_out, ids, weights, rows, routing.weight_before_ffn)
    sorted_weights = xp.take_along_axis(weights, ops.index(rows.slot_order), axis=-1)
    slot_row = ops.index(rows.slot_row)
    out = xp.zeros_like(x)
    for j in range(ids.shape[1]):
        y = xp.take(rows_out, slot_row[:, j], axis=0)
        out = out + (y if routing.weight_before_ffn else y * sorted_weights[:, j:j + 1])
    return out


def _combine_host_token(rows_out: np.ndarray, ids: np.ndarray, weights: np.ndarray, rows: ExpertRows,
                        weighted_before: bool) -> np.ndarray:
    """moe_feed_forward's sum for one token on the host, in one Numba call (kernels.cpu.routing.combine)."""
    from kernels.cpu.routing import combine
    row_weights = np.ones(len(rows.row_slot), np.float32) if weighted_before else weights[0][rows.row_slot]
    out = np.empty((1, rows_out.shape[1]), dtype=np.float32)
    combine(rows_out, ids[0][rows.row_slot], row_weights, out[0])
    return out


def routed_and_shared_experts(ops, x, lw, routing: Routing, expert_counts: np.ndarray):
    """The MoE block of llama4 and deepseek2: the routed experts plus an always-on shared
    SwiGLU expert (llama.cpp build_moe_ffn + the ffn_*_shexp branch)."""
    routed = moe_feed_forward(ops, x, lw, routing, expert_counts)
    return routed + feed_forward(ops, x, lw.ffn_gate_shexp, lw.ffn_up_shexp, lw.ffn_down_shexp)
