"""The shared forward-pass math (engine.arch.layers), the KV cache, the CPU backend and Model's
contract: chunked prefill, expert counting, selected-experts-only decode, NaN and overflow errors."""
import math

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from engine.arch import layers
from engine.plan import memory
from engine.arch import UnsupportedArchitectureError
from engine.arch.base import AttentionKind, HyperParamError
from engine.backends import Weight
from engine.backends import cpu as cpu_backend
from engine.gguf.model_file import ModelFile
from engine.run.kv_cache import ContextOverflowError
from engine.arch.layers import RopeScaling, Routing, select_experts
from engine.run.model import Model, NonFiniteError, UnsupportedTensorTypeError
from engine.run_config import RunConfig

RNG = np.random.default_rng(7)
F32_CACHE = RunConfig(n_ctx=512, type_k="f32", type_v="f32", activations="f32")


def random(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# --- math -----------------------------------------------------------------------------------


def test_rms_norm():
    x, w = random(3, 16), random(16)
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(layers.rms_norm(x, w, 1e-5), expected, rtol=1e-5)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_rotates_the_right_pairs(neox):
    x = random(5, 2, 8)
    positions = np.arange(5) * 3
    cos, sin = layers.rope_cos_sin(positions, 6, 100.0)    # rotate 6 of the 8 dims
    y = layers.apply_rope(x, cos, sin, neox)
    pairs = [(i, i + 3) for i in range(3)] if neox else [(2 * i, 2 * i + 1) for i in range(3)]
    for i, (a, b) in enumerate(pairs):
        angle = positions[:, None] * 100.0 ** (-2 * i / 6)
        z = (x[..., a] + 1j * x[..., b]) * np.exp(1j * angle)
        np.testing.assert_allclose(y[..., a], z.real, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y[..., b], z.imag, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., 6:], x[..., 6:])


def test_rope_freq_factors_divide_frequencies():
    positions = np.arange(4)
    factors = np.array([1.0, 2.0, 8.0], dtype=np.float32)
    cos, sin = layers.rope_cos_sin(positions, 6, 10000.0, freq_factors=factors)
    theta = positions[:, None] * 10000.0 ** (-np.arange(3) / 3) / factors
    np.testing.assert_allclose(np.arctan2(sin, cos), theta, rtol=1e-5, atol=1e-6)


def test_yarn_extrapolates_fast_dims_and_interpolates_slow_ones():
    scaling = RopeScaling(freq_scale=0.25, ext_factor=1.0, attn_factor=1 / (1 + 0.1 * math.log(4)), n_ctx_orig=4096)
    low, high = layers.yarn_corr_dims(128, 4096, 10000.0, 32.0, 1.0)
    assert (low, high) == (20.0, 46.0)
    positions = np.array([7])
    cos, sin = layers.rope_cos_sin(positions, 128, 10000.0, scaling)
    plain_cos, plain_sin = layers.rope_cos_sin(positions, 128, 10000.0)
    slow_cos, slow_sin = layers.rope_cos_sin(positions, 128, 10000.0, RopeScaling(freq_scale=0.25))
    np.testing.assert_allclose(np.hypot(cos, sin), 1.0, rtol=1e-6)        # magnitudes cancel
    np.testing.assert_allclose(cos[:, :20], plain_cos[:, :20], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cos[:, 47:], slow_cos[:, 47:], rtol=1e-5, atol=1e-6)


def test_masks():
    q = np.array([5, 9])
    k = np.array([-1, 0, 3, 4, 5, 8, 9])
    assert visible_list(q, k, AttentionKind.FULL, 0) == [[0, 3, 4, 5], [0, 3, 4, 5, 8, 9]]
    assert visible_list(q, k, AttentionKind.SLIDING, 3) == [[3, 4, 5], [8, 9]]
    assert visible_list(q, k, AttentionKind.CHUNKED, 4) == [[4, 5], [8, 9]]


def visible_list(q, k, kind, window):
    mask = layers.visible(q, k, kind, window)
    return [k[row].tolist() for row in mask]


@pytest.mark.parametrize("score_block_values", [layers.SCORE_BLOCK_VALUES, 4 * 5])
def test_gqa_attention_matches_a_loop_over_heads(score_block_values, monkeypatch):
    monkeypatch.setattr(layers, "SCORE_BLOCK_VALUES", score_block_values)    # 4 * 5: one query per block
    q, k, v = random(3, 4, 8), random(5, 2, 8), random(5, 2, 6)
    mask = layers.visible(np.arange(2, 5), np.arange(5), AttentionKind.FULL, 0)
    out = layers.attention(q, k, v, mask, 0.3).reshape(3, 4, 6)
    for h in range(4):
        scores = 0.3 * q[:, h] @ k[:, h // 2].T + np.where(mask, 0, -np.inf)
        expected = layers.softmax(scores) @ v[:, h // 2]
        np.testing.assert_allclose(out[:, h], expected, rtol=1e-5, atol=1e-6)


def test_softmax_routing_renormalises_top_k():
    logits = np.array([[1.0, 3.0, 2.0, 0.0]], dtype=np.float32)
    ids, weights = select_experts(logits, Routing(2, norm_weights=True))
    assert ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(weights, [[1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))]], rtol=1e-6)


def test_bias_moves_the_choice_not_the_weight():
    logits = np.array([[0.0, 1.0, 0.5]], dtype=np.float32)
    ids, weights = select_experts(logits, Routing(1, gating="sigmoid"), np.array([2.0, 0.0, 0.0], np.float32))
    assert ids.tolist() == [[0]] and weights[0, 0] == pytest.approx(0.5)


def test_grouped_top_k_keeps_the_best_groups():
    # groups of 2: {0,1} scores 0.9+0.0, {2,3} 0.5+0.5, {4,5} 0.6+0.45; the single best expert (0)
    # sits in the worst group and must lose
    probs = np.array([[0.9, 0.0, 0.5, 0.5, 0.6, 0.45]], dtype=np.float32)
    logits = np.log(probs / (1 - probs + 1e-9) + 1e-30)
    routing = Routing(2, gating="sigmoid", n_groups=3, n_groups_used=2, norm_weights=True, weights_scale=2.5)
    ids, weights = select_experts(logits, routing)
    assert sorted(ids[0].tolist()) == [2, 4]
    np.testing.assert_allclose(weights.sum(), 2.5, rtol=1e-5)


def test_llama4_routing_ranks_logits_and_weights_input():
    logits = np.array([[0.2, -1.0, 3.0]], dtype=np.float32)
    routing = Routing(1, gating="sigmoid", select_on_logits=True, weight_before_ffn=True)
    ids, weights = select_experts(logits, routing)
    assert ids.tolist() == [[2]] and weights[0, 0] == pytest.approx(1 / (1 + math.exp(-3)))


# --- backend --------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q5_0"])
def test_matmul_on_quantized_bytes(qtype, monkeypatch):
    monkeypatch.setattr(cpu_backend, "TILE_VALUES", 512 * 3)     # several tiles
    w = random(10, 512)
    t = GGMLQuantizationType[qtype]
    data = quantize(w, t)
    weight = Weight("w", data, int(t), (10, 512))
    exact = cpu_backend.decode_rows(data, int(t), 512)
    x = random(3, 512)
    np.testing.assert_allclose(cpu_backend.CpuBackend().matmul(x, weight), x @ exact.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cpu_backend.CpuBackend().embedding(weight, [4, 1]), exact[[4, 1]])


def test_expert_matmul_reads_one_expert_or_a_row_range_of_it():
    w = random(3, 8, 32)
    weight = Weight("w", w.view(np.uint8).reshape(3, 8, 128), int(GGMLQuantizationType.F32), (3, 8, 32))
    x = random(2, 32)
    backend = cpu_backend.CpuBackend()
    np.testing.assert_allclose(backend.expert_matmul(x, weight, 1), x @ w[1].T, rtol=1e-5)
    np.testing.assert_allclose(backend.expert_matmul(x, weight, 2, slice(2, 5)), x @ w[2, 2:5].T, rtol=1e-5)


def test_head_matmul_uses_each_heads_matrix():
    w = random(3, 4, 32)
    weight = Weight("w", w.view(np.uint8).reshape(3, 4, 128), int(GGMLQuantizationType.F32), (3, 4, 32))
    x = random(2, 3, 32)
    np.testing.assert_allclose(cpu_backend.CpuBackend().head_matmul(x, weight),
                               np.einsum("thc,hrc->thr", x, w), rtol=1e-5, atol=1e-6)


# --- cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["llama-dense", "gemma3", "llama4", "deepseek2"])
@pytest.mark.parametrize("config", [RunConfig(n_ctx=512), RunConfig(n_ctx=100, n_ubatch=16),
                                    RunConfig(n_ctx=40000, n_ubatch=512, n_seq=2)])
def test_cache_cells_and_bytes_agree_with_the_memory_estimate(fixtures_dir, fixture, config):
    model = Model.load(next((fixtures_dir / fixture).glob("*.gguf")), config)
    assert model.new_cache().nbytes == memory.kv_cache_bytes(model.hparams, config)


# --- model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_model(fixtures_dir):
    return Model.load(fixtures_dir / "llama-moe" / "F32.gguf", F32_CACHE)


def test_chunked_prefill_matches_one_batch(fixtures_dir, moe_model):
    toks = np.load(fixtures_dir / "llama-moe" / "tokens.npy")
    chunked = Model.load(fixtures_dir / "llama-moe" / "F32.gguf", F32_CACHE.replace(n_ubatch=10))
    seen = []
    logits = chunked.eval_logits(toks, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (10, 64) and seen[-1] == (64, 64) and len(seen) == 7
    whole = moe_model.eval_logits(toks)
    assert np.linalg.norm(logits - whole) / np.linalg.norm(whole) < 1e-5


class SpyBackend(cpu_backend.CpuBackend):
    def __init__(self):
        self.expert_calls, self.matmul_shapes = [], []

    def expert_matmul(self, x, w, expert):
        self.expert_calls.append((w.name, expert))
        return super().expert_matmul(x, w, expert)

    def routed_experts(self, x, spans, gate, up, down, activation):
        self.expert_calls += [(w.name, e) for e, _, _ in spans for w in (gate, up, down)]
        return super().routed_experts(x, spans, gate, up, down, activation)

    def matmul(self, x, w):
        self.matmul_shapes.append(w.shape)
        return super().matmul(x, w)


def test_decode_runs_only_the_selected_experts(fixtures_dir):
    spy = SpyBackend()
    model = Model.load(fixtures_dir / "llama-moe" / "F32.gguf", F32_CACHE, backend=spy)
    toks = np.load(fixtures_dir / "llama-moe" / "tokens.npy")
    cache = model.new_cache()
    model.eval_logits(toks[:20], cache)
    assert model.expert_counts.sum(axis=1).tolist() == [40, 40]          # 20 tokens x top-2
    before = model.expert_counts.copy()
    spy.expert_calls.clear()
    model.eval_logits(toks[20:21], cache)
    chosen = model.expert_counts - before
    for il in range(2):
        selected = set(np.nonzero(chosen[il])[0].tolist())
        assert len(selected) == 2
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            called = {e for n, e in spy.expert_calls if n == f"blk.{il}.{name}.weight"}
            assert called == selected
    assert all(len(shape) == 2 for shape in spy.matmul_shapes)     # no expert tensor read whole


def test_non_finite_values_name_the_layer(fixtures_dir):
    model = Model.load(fixtures_dir / "llama-dense" / "F32.gguf", F32_CACHE)
    norm = model.layers[1].ffn_norm.copy()
    norm[3] = np.nan
    model.layers[1].tensors["ffn_norm"] = norm
    with pytest.raises(NonFiniteError, match="layer 1 "):
        model.eval_logits([1, 5, 9])


def test_context_overflow(fixtures_dir, moe_model):
    cache = moe_model.new_cache(256)
    moe_model.eval_logits(np.arange(3, 253), cache)
    with pytest.raises(ContextOverflowError, match="position 257 does not fit the context of 256"):
        moe_model.eval_logits(np.arange(3, 11), cache)
    assert cache.n_past == 250          # nothing was evaluated


def test_bad_token_ids(moe_model):
    with pytest.raises(ValueError, match="outside the vocabulary of 512"):
        moe_model.eval_logits([1, 512])


def test_unsupported_architecture(tmp_path):
    from gguf import GGUFWriter
    path = tmp_path / "mamba.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'mamba' is not supported; supported: deepseek2"):
        Model.load(path)


def test_unsupported_tensor_type(fixtures_dir):
    model_file = ModelFile(fixtures_dir / "llama-dense" / "F32.gguf")
    model_file.unsupported_types = lambda: {"blk.0.attn_q.weight": "uses ik_llama.cpp's IQ4_KS type; only ik_llama.cpp can run it"}
    with pytest.raises(UnsupportedTensorTypeError, match="blk.0.attn_q.weight uses ik_llama.cpp's IQ4_KS"):
        Model.load(model_file)


def test_missing_tensor(fixtures_dir):
    model_file = ModelFile(fixtures_dir / "llama-dense" / "F32.gguf")
    del model_file.tensors["blk.1.ffn_up.weight"]
    # the hyperparameter check refuses the file before any weight is placed
    with pytest.raises(HyperParamError, match="tensor 'blk.1.ffn_up.weight' is missing"):
        Model.load(model_file)


@pytest.mark.slow
def test_real_gemma_decodes(gemma_path):
    model = Model.load(gemma_path, RunConfig(n_ctx=256, n_ubatch=64))
    cache = model.new_cache()
    toks = np.array([2, 818, 5279, 529, 7001, 563], dtype=np.int32)        # <bos> + a short prompt
    prompt = model.eval_logits(toks, cache, last_only=True)
    step = model.eval_logits([int(prompt.argmax())], cache)
    assert prompt.shape == step.shape == (1, model.hparams.n_vocab) and np.isfinite(step).all()


def test_threads_follow_the_run_config(fixtures_dir):
    import numba
    before = numba.get_num_threads()
    model = Model.load(fixtures_dir / "llama-dense" / "Q8_0.gguf", F32_CACHE.replace(n_threads=1))
    try:
        model.eval_logits([1, 2, 3])
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
