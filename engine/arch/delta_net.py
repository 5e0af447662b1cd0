"""The Gated DeltaNet mixer (Qwen3.5, Qwen3-Next): a causal depthwise convolution with state,
L2-normalised q/k, the gated delta rule over a d x d state per value head, and a gated RMSNorm.

Per value head h, with S a (d_k, d_v) state that starts at zero (llama.cpp
src/models/delta-net-base.cpp, build_delta_net_chunking / build_delta_net_autoregressive):

    S <- exp(g_t) S
    S <- S + k_t (beta_t (v_t - S^T k_t))^T
    o_t = S^T q_t                          (q_t scaled by 1/sqrt(d_k) beforehand)

Decode runs that recurrence. Prefill runs it in chunks in the WY/parallel form: inside a chunk,
with G the cumulative sum of g and S0 the state the chunk starts from, the updates
u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t) solve one unit lower-triangular system

    (I + A) U = diag(beta) (V - diag(exp G) K S0),  A[t, s] = beta_t exp(G_t - G_s) k_t.k_s  (s < t)

after which the outputs and the chunk's final state are matrix products:

    O   = diag(exp G) Q S0 + (exp(G_t - G_s) q_t.k_s)_{s <= t} U
    S_C = exp(G_C) S0 + K^T diag(exp(G_C - G)) U

Arrays are float32, tokens first; heads are the value heads (q/k already mapped to them).

The layer's conv and delta-rule states live on its home device (`RecurrentLayer`); `mixer` is
the host's implementation of the whole mixer over them, which a backend may replace by its own
(`engine.backends.protocol.DeltaNetBackend`: the CUDA kernels of kernels/cuda/delta_net.cu).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.arch.layers import namespace, rms_norm, sigmoid

CHUNK_TOKENS = 64       # llama.cpp's chunk size for the scalar-gate delta rule


def softplus(x):
    """log(1 + exp(x)) (ggml_softplus), without overflow for large x, in x's own namespace."""
    xp = namespace(x)
    return xp.logaddexp(xp.zeros_like(x), x)


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def l2_normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(sum(x^2) + eps) over the last axis (llama.cpp build_gdn_l2_norm)."""
    return x / np.sqrt(np.sum(np.square(x), axis=-1, keepdims=True) + np.float32(eps))


def causal_conv(x: np.ndarray, conv_state: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depthwise causal convolution over time (ggml_ssm_conv) continuing from conv_state.

    x (T, C), conv_state (K-1, C) the previous K-1 inputs (zeros at the sequence start),
    weight (C, K). Returns y (T, C) with y_t[c] = sum_j weight[c, j] x_{t-K+1+j}[c], and the
    new state: the last K-1 inputs.
    """
    n_tokens, kernel = len(x), weight.shape[1]
    padded = np.concatenate([conv_state, x])                 # (K-1+T, C)
    y = np.zeros_like(x)
    for j in range(kernel):
        y += padded[j:j + n_tokens] * weight[:, j]
    return y, padded[len(padded) - (kernel - 1):].copy()


def gated_rms_norm(o: np.ndarray, weight: np.ndarray, z: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over each head's values (weight not +1-shifted), times silu(z)."""
    return rms_norm(o, weight, eps) * silu(z)


def delta_rule_recurrent(q, k, v, g, beta, state):
    """One token at a time. q, k (T, H, d_k); v (T, H, d_v); g, beta (T, H); state (H, d_k, d_v),
    updated in place. Returns o (T, H, d_v)."""
    out = np.empty_like(v)
    for t in range(len(q)):
        state *= np.exp(g[t])[:, None, None]
        predicted = np.einsum("hkv,hk->hv", state, k[t])                   # S^T k
        update = beta[t][:, None] * (v[t] - predicted)                       # (H, d_v)
        state += k[t][:, :, None] * update[:, None, :]
        out[t] = np.einsum("hkv,hk->hv", state, q[t])
    return out


def delta_rule_chunked(q, k, v, g, beta, state, chunk: int = CHUNK_TOKENS):
    """The same result in chunks of `chunk` tokens (the WY form above). Shapes as
    delta_rule_recurrent; state updated in place."""
    out = np.empty_like(v)
    for start in range(0, len(q), chunk):
        end = min(len(q), start + chunk)
        out[start:end] = _delta_rule_chunk(*(np.swapaxes(a[start:end], 0, 1) for a in (q, k, v, g, beta)), state)
    return out


def _delta_rule_chunk(q, k, v, g, beta, state):
    """One chunk, heads first: q, k (H, C, d_k); v (H, C, d_v); g, beta (H, C); state (H, d_k, d_v)."""
    n_tokens = q.shape[1]
    cum_g = np.cumsum(g, axis=1, dtype=np.float32)                            # (H, C)
    causal = np.tril(np.ones((n_tokens, n_tokens), dtype=bool))
    # exp(G_t - G_s) for s <= t: at most 1, since every g <= 0
    decay = np.exp(np.where(causal, cum_g[:, :, None] - cum_g[:, None, :], -np.inf)).astype(np.float32)
    keys_keys = k @ np.swapaxes(k, 1, 2)                                      # (H, C, C)
    a = np.tril(beta[:, :, None] * decay * keys_keys, -1)
    decay_in = np.exp(cum_g)[:, :, None]                                      # (H, C, 1)
    rhs = beta[:, :, None] * (v - decay_in * (k @ state))                     # (H, C, d_v)
    eye = np.eye(n_tokens, dtype=np.float32)
    updates = np.linalg.solve(eye + a, rhs).astype(np.float32)                # (H, C, d_v)
    out = decay_in * (q @ state) + (decay * (q @ np.swapaxes(k, 1, 2))) @ updates
    decay_to_end = np.exp(cum_g[:, -1:] - cum_g)[:, :, None]                  # (H, C, 1)
    state *= np.exp(cum_g[:, -1])[:, None, None]
    state += np.swapaxes(k * decay_to_end, 1, 2) @ updates
    return np.swapaxes(out, 0, 1)                                             # (C, H, d_v)


def delta_rule(q, k, v, g, beta, state):
    """Decode steps run the recurrence; longer inputs run in chunks."""
    if len(q) == 1:
        return delta_rule_recurrent(q, k, v, g, beta, state)
    return delta_rule_chunked(q, k, v, g, beta, state)


# --- the mixer over a layer's state -----------------------------------------------------------


@dataclass(frozen=True)
class DeltaNetHeads:
    """The head layout of a DeltaNet mixer: the conv output is [q (Hk x d) | k (Hk x d) | v (Hv x d)]."""

    n_k_heads: int          # Hk (ssm.group_count)
    n_v_heads: int          # Hv (ssm.time_step_rank)
    head_dim: int           # d (ssm.state_size)
    grouped: bool           # value head h reads key head h // (Hv/Hk) (qwen3next), else h % Hk
    eps: float              # of the L2 norms and the gated RMSNorm (rms_eps)

    def key_heads(self) -> np.ndarray:
        """The key head each value head reads."""
        heads = np.arange(self.n_v_heads)
        return heads // (self.n_v_heads // self.n_k_heads) if self.grouped else heads % self.n_k_heads


class HostMemory:
    """Host memory behind the interface of a device runtime (kernels.cuda.runtime): what
    `RecurrentLayer` needs to allocate, copy and clear its states."""

    @staticmethod
    def zeros(shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    @staticmethod
    def alloc(shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    @staticmethod
    def copy_into(dst: np.ndarray, src) -> None:
        dst[...] = src


class RecurrentLayer:
    """One DeltaNet layer's states in one device's memory (host memory, or a CUDA runtime's):
    `conv` (rows, n_embd_r) and `ssm` (rows, n_embd_s) float32, one row per sequence, zero at the
    start. Snapshots (checkpoints) are copies in the same memory."""

    def __init__(self, memory, rows: int, conv_values: int, ssm_values: int):
        self.memory = memory
        self.conv = memory.zeros((rows, conv_values), np.float32)
        self.ssm = memory.zeros((rows, ssm_values), np.float32)

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def snapshot(self) -> tuple:
        return tuple(self._copy(a) for a in (self.conv, self.ssm))

    def restore(self, saved: tuple) -> None:
        for mine, copy in zip((self.conv, self.ssm), saved):
            self.memory.copy_into(mine, copy)

    def clear(self) -> None:
        for a in (self.conv, self.ssm):
            self.memory.copy_into(a, np.zeros(a.shape, np.float32))

    def _copy(self, a):
        copy = self.memory.alloc(a.shape, a.dtype)
        self.memory.copy_into(copy, a)
        return copy


def mixer(state: RecurrentLayer, qkv, beta, g, z, conv_weight, norm_weight, heads: DeltaNetHeads) -> np.ndarray:
    """The mixer of one ubatch on the host, sequence 0 of `state` updated: qkv (T, C) the attn_qkv
    projection, beta and the log-decay g (T, Hv), z (T, Hv * d) the attn_gate projection,
    conv_weight (C, K), norm_weight (d,). Returns (T, Hv * d), the input of ssm_out."""
    n_tokens, d, n_k, n_v = len(qkv), heads.head_dim, heads.n_k_heads, heads.n_v_heads
    conv_state = state.conv[0].reshape(conv_weight.shape[1] - 1, qkv.shape[1])        # the last K-1 inputs
    mixed, conv_state[...] = causal_conv(qkv, conv_state, conv_weight)
    mixed = silu(mixed)
    key_dim = n_k * d
    q = l2_normalize(mixed[:, :key_dim].reshape(n_tokens, n_k, d), heads.eps)
    k = l2_normalize(mixed[:, key_dim:2 * key_dim].reshape(n_tokens, n_k, d), heads.eps)
    v = np.ascontiguousarray(mixed[:, 2 * key_dim:].reshape(n_tokens, n_v, d))
    mapped = heads.key_heads()
    q, k = q[:, mapped] * np.float32(1.0 / math.sqrt(d)), np.ascontiguousarray(k[:, mapped])   # (T, Hv, d)
    out = delta_rule(q, k, v, g, beta, state.ssm[0].reshape(n_v, d, d))                   # (T, Hv, d)
    out = gated_rms_norm(out, norm_weight, z.reshape(n_tokens, n_v, d), heads.eps)
    return out.reshape(n_tokens, n_v * d)
