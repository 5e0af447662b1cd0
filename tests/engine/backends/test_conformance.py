"""Every op of the Backend protocol on every backend against a NumPy float64 reference.

Weights are decoded for the reference with gguf's own dequantizer; shapes are awkward on
purpose (one row, one token, one expert, a head dimension that is not a power of two). A
backend registers itself in tests/support/backend_registry.py and this whole file runs on it.
"""
from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

from backend_registry import backend_params, make_backend
from engine.arch.base import AttentionKind
from engine.arch.layers import geglu, swiglu
from engine.backends import Weight
from engine.backends.dispatch import PlacedOps
from engine.backends.protocol import AttentionStep, Backend, KVLayout, layer_ops
from kernels.cpu import quantize_rows

pytestmark = pytest.mark.parametrize("backend_name", backend_params())

RNG = np.random.default_rng(11)


def random_bytes_of(qtype: T, n_rows: int, n_cols: int) -> np.ndarray:
    """Rows of random ggml blocks whose f16 scales are sane (the K-quants have no quantizer here)."""
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    data = RNG.integers(0, 256, (n_rows, n_cols // block, type_bytes), dtype=np.uint8)
    scale = np.array([0.02], np.float16).view(np.uint8)
    if qtype == T.Q4_K:
        data[..., 0:2], data[..., 2:4] = scale, np.array([0.01], np.float16).view(np.uint8)
    elif qtype == T.Q6_K:
        data[..., 208:210] = scale
    return data.reshape(n_rows, -1)


def weight_bytes(qtype: T, values: np.ndarray) -> np.ndarray:
    """values (rows, n_cols) as ggml rows of qtype."""
    if qtype in (T.Q4_K, T.Q6_K):
        return random_bytes_of(qtype, *values.shape)
    return quantize_rows(values.astype(np.float32), int(qtype))


def make_weight(name: str, qtype: T, shape: tuple[int, ...]) -> tuple[Weight, np.ndarray]:
    """A Weight of random values and its exact float64 decoding (the reference)."""
    rows = int(np.prod(shape[:-1]))
    data = weight_bytes(qtype, RNG.standard_normal((rows, shape[-1])).astype(np.float32))
    exact = dequantize(data, qtype).astype(np.float64).reshape(shape)
    return Weight(name, data.reshape(*shape[:-1], -1), int(qtype), shape), exact


def nmse(found, expected) -> float:
    """Normalised mean squared error (llama.cpp test-backend-ops' measure)."""
    return float(np.sum((found - expected) ** 2) / np.sum(expected ** 2))


def on(backend, x: np.ndarray):
    return backend.to_device(np.ascontiguousarray(x, dtype=np.float32))


def host(backend, y) -> np.ndarray:
    assert array_api_compat.array_namespace(y) is backend.namespace, "a result left the backend's device"
    return backend.to_host(y)


QTYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_1, T.Q4_K, T.Q6_K]


def test_the_backend_implements_the_protocol(backend_name):
    assert isinstance(make_backend(backend_name), Backend)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens,n_rows", [(1, 1), (3, 7), (17, 33)])
def test_matmul(backend_name, qtype, n_tokens, n_rows):
    backend = make_backend(backend_name)
    n_cols = 512
    w, exact = make_weight("w", qtype, (n_rows, n_cols))
    x = RNG.standard_normal((n_tokens, n_cols)).astype(np.float32)
    y = host(backend, backend.matmul(on(backend, x), backend.upload(w)))
    assert y.shape == (n_tokens, n_rows) and y.dtype == np.float32
    assert nmse(y, x.astype(np.float64) @ exact.T) < 1e-10


def test_matmul_keeps_leading_axes(backend_name):
    backend = make_backend(backend_name)
    w, exact = make_weight("w", T.Q8_0, (5, 64))
    x = RNG.standard_normal((2, 3, 64)).astype(np.float32)
    y = host(backend, backend.matmul(on(backend, x), backend.upload(w)))
    assert y.shape == (2, 3, 5) and nmse(y, x @ exact.T.astype(np.float32)) < 1e-10


@pytest.mark.parametrize("qtype", [T.F32, T.Q8_0, T.Q4_K], ids=lambda t: t.name)
def test_expert_matmul_whole_and_uploaded_subsets(backend_name, qtype):
    backend = make_backend(backend_name)
    n_expert, n_rows, n_cols = 5, 9, 256
    w, exact = make_weight("w_exps", qtype, (n_expert, n_rows, n_cols))
    x = RNG.standard_normal((4, n_cols)).astype(np.float32)
    whole = backend.upload(w)
    for expert in (0, n_expert - 1):
        y = host(backend, backend.expert_matmul(on(backend, x), whole, expert))
        assert nmse(y, x @ exact[expert].T) < 1e-10
    y = host(backend, backend.expert_matmul(on(backend, x), whole, 2, slice(3, 8)))
    assert y.shape == (4, 5) and nmse(y, x @ exact[2, 3:8].T) < 1e-10
    # a subset in a chosen order (one expert, a contiguous range, an out-of-order pick)
    for experts in ([3], [1, 2, 3], [4, 0, 2]):
        part = backend.upload(w, experts)
        assert part.shape == (len(experts), n_rows, n_cols) and part.device == backend.name
        for local, expert in enumerate(experts):
            y = host(backend, backend.expert_matmul(on(backend, x[:1]), part, local))
            assert nmse(y, x[:1] @ exact[expert].T) < 1e-10


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 6])
def test_head_matmul(backend_name, qtype, n_tokens):
    backend = make_backend(backend_name)
    n_head, n_rows, n_cols = 3, 5, 64
    w, exact = make_weight("attn_k_b", qtype, (n_head, n_rows, n_cols))
    x = RNG.standard_normal((n_tokens, n_head, n_cols)).astype(np.float32)
    y = host(backend, backend.head_matmul(on(backend, x), backend.upload(w)))
    assert y.shape == (n_tokens, n_head, n_rows)
    assert nmse(y, np.einsum("thc,hrc->thr", x.astype(np.float64), exact)) < 1e-10


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_embedding_rows_are_exact(backend_name, qtype):
    backend = make_backend(backend_name)
    w, exact = make_weight("token_embd", qtype, (11, 256))
    ids = np.array([10, 0, 3, 3], dtype=np.int32)
    rows = host(backend, backend.embedding(backend.upload(w), ids))
    assert rows.dtype == np.float32 and np.array_equal(rows, exact[ids].astype(np.float32))


def test_transfers_and_vectors_round_trip_exactly(backend_name):
    backend = make_backend(backend_name)
    x = RNG.standard_normal((3, 7)).astype(np.float32)
    assert np.array_equal(host(backend, backend.to_device(x)), x)
    positions = np.arange(5, dtype=np.int64)
    assert np.array_equal(host(backend, backend.to_device(positions)), positions)
    norm = RNG.standard_normal(13).astype(np.float32)
    assert np.array_equal(host(backend, backend.upload_vector(norm)), norm)


@pytest.mark.parametrize("activations", ["f32", "llama.cpp"])
def test_matmuls_of_one_input_equal_one_matmul_each(backend_name, activations):
    """q, k and v (or gate and up) of mixed types over one input, as the dispatcher runs them."""
    backend = make_backend(backend_name, activations)
    ops = PlacedOps({backend.name: backend})
    ws = [backend.upload(make_weight(f"w{i}", qtype, (rows, 256))[0])
          for i, (qtype, rows) in enumerate([(T.Q4_K, 7), (T.Q8_0, 5), (T.Q6_K, 3), (T.Q5_1, 4), (T.F16, 2)])]
    x = on(backend, RNG.standard_normal((2, 1, 256)).astype(np.float32))
    together = ops.matmuls(x, ws)
    for w, y in zip(ws, together):
        assert np.array_equal(host(backend, y), host(backend, backend.matmul(x, w)))


# --- the small ops of a layer (the backend's own kernels, or the array-namespace math) ---------------


def rms_normed(x: np.ndarray, w) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1.0 if w is None else w)


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_over_rows_and_heads(backend_name, weighted):
    backend = make_backend(backend_name)
    x = RNG.standard_normal((3, 2, 48)).astype(np.float32) * 10       # (T, heads, head_dim): per head
    w = RNG.standard_normal(48).astype(np.float32) if weighted else None
    y = host(backend, layer_ops(backend).rms_norm(on(backend, x), w if w is None else backend.upload_vector(w), 1e-6))
    assert y.shape == x.shape and nmse(y, rms_normed(x, w)) < 1e-10


def test_add_rms_norm(backend_name):
    backend = make_backend(backend_name)
    residual, y = RNG.standard_normal((2, 64)).astype(np.float32), RNG.standard_normal((2, 64)).astype(np.float32)
    w = RNG.standard_normal(64).astype(np.float32)
    out = host(backend, layer_ops(backend).add_rms_norm(on(backend, residual), on(backend, y),
                                                        backend.upload_vector(w), 1e-6))
    assert nmse(out, residual + rms_normed(y, w)) < 1e-10


@pytest.mark.parametrize("activation", [swiglu, geglu], ids=["swiglu", "geglu"])
def test_glu(backend_name, activation):
    backend = make_backend(backend_name)
    gate, up = RNG.standard_normal((3, 80)).astype(np.float32) * 3, RNG.standard_normal((3, 80)).astype(np.float32)
    g = gate.astype(np.float64)
    if activation is swiglu:
        act = g / (1.0 + np.exp(-g))
    else:
        act = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3)))
    out = host(backend, layer_ops(backend).glu(on(backend, gate), on(backend, up), activation))
    assert nmse(out, act * up) < 1e-10


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "norm"])
def test_rope_qk_rotates_both_and_scales_q(backend_name, neox):
    backend = make_backend(backend_name)
    n_dims, head_dim = 16, 20                                         # a tail of 4 dims is not rotated
    q = RNG.standard_normal((2, 4, head_dim)).astype(np.float32)
    k = RNG.standard_normal((2, 2, head_dim)).astype(np.float32)
    angles = RNG.uniform(-3.0, 3.0, (2, n_dims // 2))
    cos, sin = (backend.to_device(f(angles).astype(np.float32)) for f in (np.cos, np.sin))
    q_out, k_out = layer_ops(backend).rope_qk(on(backend, q), on(backend, k), cos, sin, neox, 0.25)

    def rotated(x):
        y = x.astype(np.float64).copy()
        for i in range(n_dims // 2):
            a, b = (i, i + n_dims // 2) if neox else (2 * i, 2 * i + 1)
            c, s = np.cos(angles[:, i])[:, None], np.sin(angles[:, i])[:, None]
            y[..., a], y[..., b] = x[..., a] * c - x[..., b] * s, x[..., a] * s + x[..., b] * c
        return y
    assert nmse(host(backend, q_out), 0.25 * rotated(q)) < 1e-10
    assert nmse(host(backend, k_out), rotated(k)) < 1e-10


# --- the KV cache and attention --------------------------------------------------------------------


def stored(values: np.ndarray, type_name: str) -> np.ndarray:
    """What a cache of type_name gives back for values (rows, n): the reference's keys."""
    if type_name == "f32":
        return values.astype(np.float64)
    if type_name == "f16":
        return values.astype(np.float16).astype(np.float64)
    qtype = T[type_name.upper()]
    return dequantize(quantize_rows(values.astype(np.float32), int(qtype)), qtype).astype(np.float64)


def reference_attention(q, keys, values, q_pos, key_pos, kind, window, kq_scale):
    """float64 softmax attention with grouped heads over the visible cached cells."""
    n_tokens, n_head, _ = q.shape
    n_head_kv = keys.shape[1]
    out = np.zeros((n_tokens, n_head, values.shape[-1]))
    for t in range(n_tokens):
        seen = (key_pos >= 0) & (key_pos <= q_pos[t])
        if kind is AttentionKind.SLIDING:
            seen &= q_pos[t] - key_pos < window
        for h in range(n_head):
            kv_head = h // (n_head // n_head_kv)
            scores = kq_scale * keys[seen, kv_head] @ q[t, h]
            p = np.exp(scores - scores.max())
            out[t, h] = (p / p.sum()) @ values[seen, kv_head]
    return out.reshape(n_tokens, -1)


def run_steps(backend, layout, kind, window, steps, n_head, n_head_kv, d_k, d_v, v_from_k=0):
    """Feed ubatches (lists of positions) through one KV layer; compare each to the reference."""
    kv = backend.new_kv_layer(layout)
    n_cells = layout.n_cells
    cell_keys = np.zeros((n_cells, n_head_kv, d_k))
    cell_values = np.zeros((n_cells, n_head_kv, d_v))
    cell_pos = np.full(n_cells, -1)
    n_filled = 0
    for positions in steps:
        positions = np.asarray(positions, dtype=np.int64)
        cells = positions % n_cells
        n_filled = max(n_filled, int(cells.max()) + 1)
        q = RNG.standard_normal((len(positions), n_head, d_k)).astype(np.float32)
        k = RNG.standard_normal((len(positions), n_head_kv, d_k)).astype(np.float32)
        v = None if v_from_k else RNG.standard_normal((len(positions), n_head_kv, d_v)).astype(np.float32)
        cell_keys[cells] = stored(k.reshape(len(cells), -1), layout.type_k).reshape(k.shape)
        cell_values[cells] = cell_keys[cells][..., :v_from_k] if v_from_k else \
            stored(v.reshape(len(cells), -1), layout.type_v).reshape(v.shape)
        cell_pos[cells] = positions
        step = AttentionStep(cells, n_filled, kind, window)
        out = backend.attend(kv, step, backend.to_device(positions), on(backend, q), on(backend, k),
                             None if v is None else on(backend, v), 0.125, v_from_k)
        expected = reference_attention(q.astype(np.float64), cell_keys[:n_filled], cell_values[:n_filled],
                                       positions, cell_pos[:n_filled], kind, window, 0.125)
        assert nmse(host(backend, out), expected) < 1e-10
    return kv


@pytest.mark.parametrize("type_k,type_v", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q4_0")])
def test_attention_over_the_cache_with_grouped_heads(backend_name, type_k, type_v):
    backend = make_backend(backend_name)
    n_head, n_head_kv, d = 6, 2, 32
    layout = KVLayout(64, n_head_kv * d, n_head_kv * d, type_k, type_v)
    # a prefill with a tail, two single-token steps, then a short ubatch
    kv = run_steps(backend, layout, AttentionKind.FULL, 0, [range(0, 11), [11], [12], range(13, 16)],
                   n_head, n_head_kv, d, d)
    row_bytes = {"f32": 4 * d * n_head_kv, "f16": 2 * d * n_head_kv, "q8_0": 34 * n_head_kv, "q4_0": 18 * n_head_kv}
    assert kv.nbytes == 64 * (row_bytes[type_k] + row_bytes[type_v])


def test_sliding_window_ring_and_forget(backend_name):
    backend = make_backend(backend_name)
    layout = KVLayout(8, 16, 16, "f32", "f32")
    kv = run_steps(backend, layout, AttentionKind.SLIDING, 4, [range(0, 5), [5], [6], [7], [8], [9]], 2, 1, 16, 16)
    kv.forget(0)
    # every cell forgotten: a new token sees only itself
    run_steps(backend, layout, AttentionKind.SLIDING, 4, [[0]], 2, 1, 16, 16)


def test_latent_attention_reads_values_from_the_keys(backend_name):
    backend = make_backend(backend_name)
    kv_lora, n_rot = 24, 8
    layout = KVLayout(32, kv_lora + n_rot, 0, "f16", "f16")     # MLA: one kv head, V a prefix of K
    run_steps(backend, layout, AttentionKind.FULL, 0, [range(0, 7), [7]], 4, 1, kv_lora + n_rot, kv_lora,
              v_from_k=kv_lora)
