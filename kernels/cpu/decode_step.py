"""A decoder block's chains of kernels for one token, one call each side of attention.

    attention_inputs(x, ...)        attn_norm, q/k/v products (+ biases), per-head q/k norm, rope,
                                    k and v stored in an f32/f16 cache row, q rounded to the
                                    cache's dot type -> the query heads
    attention_output(x, a, ...)     the o product, the residual (through post_attention_norm)
    dense_ffn(h, ...)               ffn_norm, gate/up, the GLU, down, the residual (through
                                    post_ffw_norm)
    ffn_input(h, w, eps)            ffn_norm alone, for a MoE layer's experts

A small model's decode step spends a quarter of its time in Python between kernels when every
op is a call of its own (engine.backends.cpu_decode). These functions run the same kernels on
the same inputs in the same order as the CPU backend's ops do under a family's forward_layer
(rms_norm_rows, quantize_one_token, qmatmul_kernel / qmatmul_serial, rope_rows, glu_rows,
add_rms_norm_rows), so their results are bit-identical; the cache row is written as NumPy casts
to f16 (round to nearest even) and the query rounded as `kv_store.half_rounded` rounds it.

Products take their activation quantized once per input: `inputs` is (q8_0, q8_k), each a tuple
(q, d, sums, min_sums, q_view, d_view, min_sums_view) of buffers the caller owns, the views
read-only as the products take them (one compiled form of each product kernel); a form the
block does not need may be zero-sized. Absent norms and biases are zero-length arrays.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.cpu.attention import f16_round
from kernels.cpu.formats import f32_to_f16_bits
from kernels.cpu.fused_ops import add_rms_norm_rows, glu_rows, rms_norm_rows, rope_rows
from kernels.cpu.qactivations import quantize_one_token
from kernels.cpu.qmatmul import DECODE_ROWS_PER_CHUNK, LANES, SERIAL_WORK_BYTES, qmatmul_kernel, qmatmul_serial

STORE_F32, STORE_F16 = 0, 1         # how a cache row holds its values


@njit(cache=True, nogil=True)
def _quantize(x, inputs, k_blocks):
    q, d, sums, min_sums = inputs[1][:4] if k_blocks else inputs[0][:4]
    quantize_one_token(x, k_blocks, q, d, sums, min_sums)


@njit(cache=True, nogil=True)
def _quantize_for(x, inputs, need_q8_0, need_q8_k):
    if need_q8_0:
        _quantize(x, inputs, False)
    if need_q8_k:
        _quantize(x, inputs, True)


@njit(cache=True, nogil=True)
def _product(inputs, k_blocks, w, w_type, n_cols):
    """x @ W.T (1, n_rows) from x's quantized form for W's type, by the kernel qmatmul picks."""
    q, d, min_sums = inputs[1][4:] if k_blocks else inputs[0][4:]
    out = np.empty((1, w.shape[0]), dtype=np.float32)
    if w.shape[0] * w.shape[1] <= SERIAL_WORK_BYTES:
        qmatmul_serial(q, d, min_sums, w, w_type, n_cols, LANES, DECODE_ROWS_PER_CHUNK, out, 0)
    else:
        qmatmul_kernel(q, d, min_sums, w, w_type, n_cols, LANES, DECODE_ROWS_PER_CHUNK, out, 0)
    return out


@njit(cache=True, nogil=True)
def _plus_bias(y, bias):
    if bias.shape[0] == 0:
        return y
    out = np.empty_like(y)
    for i in range(y.shape[1]):
        out[0, i] = y[0, i] + bias[i]
    return out


@njit(cache=True, nogil=True)
def _head_norm(y, w, eps, n_head, d):
    out = np.empty((n_head, d), dtype=np.float32)
    rms_norm_rows(y.reshape((n_head, d)), w, eps, out)
    return out.reshape((1, n_head, d))


@njit(cache=True, nogil=True)
def _store_row(rows, cell, values, store):
    """values (n,) into cache row `cell` (uint8 bytes of f32 or f16 values)."""
    if store == STORE_F16:
        row = rows[cell].view(np.uint16)
        for i in range(values.shape[0]):
            row[i] = f32_to_f16_bits(values[i])
    else:
        row = rows[cell].view(np.float32)
        for i in range(values.shape[0]):
            row[i] = values[i]


@njit(cache=True, nogil=True)
def attention_inputs(x, attn_norm, eps, inputs, weights, types, k_blocks, biases, q_norm, k_norm,
                     heads, cos, sin, neox, q_scale, k_rows, v_rows, cell_pos, cell, position, stores, round_q):
    """The query heads (1, n_head, d_k) of token x (1, n_embd), its key and value stored in cache
    row `cell` (k_rows / v_rows: uint8 rows; stores: (STORE_* of K, of V)) at `position`.

    weights (wq, wk, wv), types and k_blocks per weight, biases (q, k, v); q_norm / k_norm
    zero-length when the block has no per-head norm; heads (n_head, n_head_kv, d_k, d_v);
    round_q: the query rounded to f16 (an f16 key's dot type)."""
    n_head, n_head_kv, d_k, d_v = heads
    h = np.empty_like(x)
    rms_norm_rows(x, attn_norm, eps, h)
    _quantize_for(h, inputs, not (k_blocks[0] and k_blocks[1] and k_blocks[2]),
                  k_blocks[0] or k_blocks[1] or k_blocks[2])
    n_cols = x.shape[1]
    q = _plus_bias(_product(inputs, k_blocks[0], weights[0], types[0], n_cols), biases[0])
    k = _plus_bias(_product(inputs, k_blocks[1], weights[1], types[1], n_cols), biases[1])
    v = _plus_bias(_product(inputs, k_blocks[2], weights[2], types[2], n_cols), biases[2])
    if q_norm.shape[0]:
        q3, k3 = _head_norm(q, q_norm, eps, n_head, d_k), _head_norm(k, k_norm, eps, n_head_kv, d_k)
    else:
        q3, k3 = q.reshape((1, n_head, d_k)), k.reshape((1, n_head_kv, d_k))
    q_out, k_out = np.empty_like(q3), np.empty_like(k3)
    rope_rows(q3, cos, sin, neox, np.float32(q_scale), q_out)
    rope_rows(k3, cos, sin, neox, np.float32(1.0), k_out)
    _store_row(k_rows, cell, k_out.reshape(n_head_kv * d_k), stores[0])
    _store_row(v_rows, cell, v.reshape(n_head_kv * d_v), stores[1])
    cell_pos[cell] = position
    if round_q:
        flat = q_out.reshape(n_head * d_k)
        for i in range(flat.shape[0]):
            flat[i] = f16_round(flat[i])
    return q_out


@njit(cache=True, nogil=True)
def attention_output(x, attended, inputs, w, w_type, k_blocks, post_norm, eps):
    """x + o(attended), or x + post_attention_norm(o(attended)) where post_norm is given."""
    _quantize(attended, inputs, k_blocks)
    y = _product(inputs, k_blocks, w, w_type, attended.shape[1])
    h = np.empty_like(x)
    if post_norm.shape[0]:
        add_rms_norm_rows(x, y, post_norm, eps, h)
    else:
        for i in range(x.shape[1]):
            h[0, i] = x[0, i] + y[0, i]
    return h


@njit(cache=True, nogil=True)
def ffn_input(h, ffn_norm, eps):
    y = np.empty_like(h)
    rms_norm_rows(h, ffn_norm, eps, y)
    return y


@njit(cache=True, nogil=True)
def dense_ffn(h, ffn_norm, eps, inputs, hidden_inputs, weights, types, k_blocks, glu_kind, post_norm):
    """h + down(glu(gate(y), up(y))) of y = ffn_norm(h), through post_ffw_norm where given.
    weights (gate, up, down); hidden_inputs: the quantized forms of down's input."""
    y = ffn_input(h, ffn_norm, eps)
    _quantize_for(y, inputs, not (k_blocks[0] and k_blocks[1]), k_blocks[0] or k_blocks[1])
    n_embd = h.shape[1]
    gate = _product(inputs, k_blocks[0], weights[0], types[0], n_embd)
    up = _product(inputs, k_blocks[1], weights[1], types[1], n_embd)
    hidden = np.empty_like(gate)
    glu_rows(gate, up, glu_kind, hidden)
    _quantize(hidden, hidden_inputs, k_blocks[2])
    down = _product(hidden_inputs, k_blocks[2], weights[2], types[2], hidden.shape[1])
    out = np.empty_like(h)
    if post_norm.shape[0]:
        add_rms_norm_rows(h, down, post_norm, eps, out)
    else:
        for i in range(n_embd):
            out[0, i] = h[0, i] + down[0, i]
    return out
