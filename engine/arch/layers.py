"""Shared transformer math, written once for every architecture family.

Activations are float32 arrays shaped (n_tokens, ...), rows first. Functions that read weights
take the backend `ops` (see engine.backends); the rest is array math. Where llama.cpp's result
depends on a detail (rope pairing, YaRN ramp, routing order), the matching ggml/llama.cpp
function is named.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf.constants import Keys

from engine.arch.base import AttentionKind, Metadata

# --- norms and activations ------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) over the last axis, times weight (llama.cpp build_norm RMS)."""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)
    y = x * (1.0 / np.sqrt(mean_square + np.float32(eps)))
    return y if weight is None else y * weight


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up."""
    return gate * sigmoid(gate) * up


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (ggml_gelu)."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    return 0.5 * x * (1.0 + np.tanh(c * x * (1.0 + np.float32(0.044715) * x * x)))


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return gelu_tanh(gate) * up


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    return np.float32(cap) * np.tanh(x / np.float32(cap))


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


def rope_cos_sin(positions: np.ndarray, n_dims: int, base: float, scaling: RopeScaling = RopeScaling(),
                 freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n_tokens, n_dims/2) of each rotation, magnitude included (ggml_rope_cache_init)."""
    i = np.arange(n_dims // 2, dtype=np.float64)
    theta_extrap = positions.astype(np.float64)[:, None] * base ** (-2.0 * i / n_dims)
    if freq_factors is not None:
        theta_extrap = theta_extrap / freq_factors[: n_dims // 2].astype(np.float64)
    theta = scaling.freq_scale * theta_extrap
    mscale = scaling.attn_factor
    if scaling.ext_factor != 0.0:
        low, high = yarn_corr_dims(n_dims, scaling.n_ctx_orig, base, scaling.beta_fast, scaling.beta_slow)
        ramp = (1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)) * scaling.ext_factor
        theta = theta * (1.0 - ramp) + theta_extrap * ramp
        mscale *= 1.0 + 0.1 * math.log(1.0 / scaling.freq_scale)
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate the first n_dims values of each head of x (n_tokens, n_head, head_dim).

    NORM rotates adjacent pairs (x0, x1), (x2, x3), ...; NEOX pairs x[i] with x[i + n_dims/2].
    """
    half = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.array(x, dtype=np.float32, copy=True)
    if neox:
        x0, x1 = x[..., :half], x[..., half:2 * half]
        out[..., :half] = x0 * c - x1 * s
        out[..., half:2 * half] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = x0 * c - x1 * s
        out[..., 1:2 * half:2] = x0 * s + x1 * c
    return out


# --- attention ----------------------------------------------------------------------------------


def visible(q_pos: np.ndarray, k_pos: np.ndarray, kind: AttentionKind, window: int) -> np.ndarray:
    """(n_q, n_k) bool: which cached keys each query may see (llama_hparams::is_masked_swa).
    Empty cells hold position -1."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k >= 0) & (k <= q)
    if kind is AttentionKind.SLIDING:
        mask &= q - k < window
    elif kind is AttentionKind.CHUNKED:
        mask &= k >= (q // window) * window
    return mask


SCORE_BLOCK_VALUES = 1 << 22    # attention scores held at once (64 MiB of float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, kq_scale: float) -> np.ndarray:
    """softmax(kq_scale * q k^T + mask) v with grouped-query heads: query head h reads kv head
    h // (n_head / n_head_kv). q (T, n_head, d_k), k (N, n_head_kv, d_k), v (N, n_head_kv, d_v)
    -> (T, n_head * d_v). Long prefills go in blocks of queries to bound the score matrix."""
    n_tokens, n_head, _ = q.shape
    block = max(1, SCORE_BLOCK_VALUES // (n_head * len(k)))
    if n_tokens <= block:
        return _attention_block(q, k, v, mask, kq_scale)
    return np.concatenate([_attention_block(q[t:t + block], k, v, mask[t:t + block], kq_scale)
                           for t in range(0, n_tokens, block)])


def _attention_block(q, k, v, mask, kq_scale):
    n_tokens, n_head, d_k = q.shape
    n_kv, n_head_kv, d_v = v.shape
    group = n_head // n_head_kv
    qg = q.reshape(n_tokens, n_head_kv, group, d_k).transpose(1, 2, 0, 3).reshape(n_head_kv, group * n_tokens, d_k)
    scores = (qg @ k.transpose(1, 2, 0)).reshape(n_head_kv, group, n_tokens, n_kv)   # (n_head_kv, group, T, N)
    scores *= np.float32(kq_scale)
    scores[:, :, ~mask] = -np.inf
    probs = softmax(scores).reshape(n_head_kv, group * n_tokens, n_kv)
    out = probs @ v.transpose(1, 0, 2)                                                  # (n_head_kv, group * T, d_v)
    return out.reshape(n_head_kv, group, n_tokens, d_v).transpose(2, 0, 1, 3).reshape(n_tokens, n_head * d_v)


class UBatch:
    """One ubatch in flight: positions, the KV cache, and rope tables shared across layers."""

    def __init__(self, hparams, positions: np.ndarray, cache):
        self.hparams = hparams
        self.positions = positions
        self.cache = cache
        self._rope_tables: dict = {}

    @property
    def n_tokens(self) -> int:
        return len(self.positions)

    def rope(self, x: np.ndarray, n_dims: int, base: float, scaling: RopeScaling, neox: bool,
             freq_factors: np.ndarray | None = None) -> np.ndarray:
        key = (n_dims, base, scaling, None if freq_factors is None else id(freq_factors))
        if key not in self._rope_tables:
            self._rope_tables[key] = rope_cos_sin(self.positions, n_dims, base, scaling, freq_factors)
        return apply_rope(x, *self._rope_tables[key], neox)

    def attend(self, il: int, q: np.ndarray, k: np.ndarray, v: np.ndarray | None, kq_scale: float,
               v_from_k: int = 0) -> np.ndarray:
        """Store this ubatch's k/v (T, n_head_kv, d) in layer il's cache and attend over the cache.
        v None: the values are the first v_from_k entries of each key (MLA's latent)."""
        self.cache.store(il, self.positions, k, v)
        keys, values, key_pos = self.cache.view(il)
        n_head_kv = k.shape[1]
        keys = keys.reshape(len(keys), n_head_kv, -1)
        values = keys[..., :v_from_k] if v is None else values.reshape(len(values), n_head_kv, -1)
        hp = self.hparams
        mask = visible(self.positions, key_pos, hp.attention_kind(il), hp.attention_window)
        return attention(q, keys, values, mask, kq_scale)


def qkv_projections(ops, x: np.ndarray, lw, n_head: int, n_head_kv: int, head_k: int, head_v: int):
    """Q (T, n_head, head_k), K (T, n_head_kv, head_k), V (T, n_head_kv, head_v), biases added
    where the layer has them (llama.cpp build_qkv)."""
    def project(name: str, heads: int, size: int) -> np.ndarray:
        y = ops.matmul(x, lw.get(name))
        bias = lw.get(f"{name}.bias")
        if bias is not None:
            y = y + bias
        return y.reshape(len(x), heads, size)
    return project("attn_q", n_head, head_k), project("attn_k", n_head_kv, head_k), project("attn_v", n_head_kv, head_v)


# --- feed-forward and mixture of experts --------------------------------------------------------


def feed_forward(ops, x: np.ndarray, gate, up, down, activation=swiglu) -> np.ndarray:
    """down(act(gate(x)) * up(x)) (llama.cpp build_ffn, LLM_FFN_PAR)."""
    return ops.matmul(activation(ops.matmul(x, gate), ops.matmul(x, up)), down)


def expert_feed_forward(ops, x: np.ndarray, lw, expert: int, activation=swiglu) -> np.ndarray:
    gate = ops.expert_matmul(x, lw.ffn_gate_exps, expert)
    up = ops.expert_matmul(x, lw.ffn_up_exps, expert)
    return ops.expert_matmul(activation(gate, up), lw.ffn_down_exps, expert)


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


def select_experts(logits: np.ndarray, routing: Routing, selection_bias: np.ndarray | None = None):
    """(expert ids (T, k), weights (T, k)) from router logits (T, n_expert)."""
    probs = softmax(logits) if routing.gating == "softmax" else sigmoid(logits)
    scores = logits if routing.select_on_logits else probs
    if selection_bias is not None:
        scores = scores + selection_bias            # biases the choice, not the weights
    if routing.n_groups > 1:
        n_tokens, n_expert = scores.shape
        groups = scores.reshape(n_tokens, routing.n_groups, n_expert // routing.n_groups)
        group_scores = np.sort(groups, axis=-1)[..., -2:].sum(axis=-1)                # top-2 sum per group
        best_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :routing.n_groups_used]
        keep = np.zeros(group_scores.shape, dtype=bool)
        np.put_along_axis(keep, best_groups, True, axis=-1)
        scores = np.where(keep[:, :, None], groups, -np.inf).reshape(n_tokens, n_expert)
    ids = np.argsort(-scores, axis=-1, kind="stable")[:, :routing.n_expert_used]
    weights = np.take_along_axis(probs, ids, axis=-1)
    if routing.norm_weights:
        # clamp like llama.cpp: the smallest normal float16
        weights = weights / np.maximum(weights.sum(axis=-1, keepdims=True), np.float32(6.103515625e-5))
    if routing.weights_scale not in (0.0, 1.0):
        weights = weights * np.float32(routing.weights_scale)
    return ids, weights.astype(np.float32)


def moe_feed_forward(ops, x: np.ndarray, lw, routing: Routing, expert_counts: np.ndarray,
                     activation=swiglu) -> np.ndarray:
    """The routed experts' output: only the selected experts run, each over the tokens that chose
    it. expert_counts (n_expert,) is incremented by the selections."""
    ids, weights = select_experts(ops.matmul(x, lw.ffn_gate_inp), routing, lw.get("exp_probs_b.bias"))
    expert_counts += np.bincount(ids.ravel(), minlength=len(expert_counts))
    out = np.zeros_like(x)
    for expert in np.unique(ids):
        tokens, slots = np.nonzero(ids == expert)
        weight = weights[tokens, slots][:, None]
        xe = x[tokens] * weight if routing.weight_before_ffn else x[tokens]
        y = expert_feed_forward(ops, xe, lw, int(expert), activation)
        out[tokens] += y if routing.weight_before_ffn else y * weight
    return out
