"""qwen35moe, qwen35 and qwen3next (hybrid Gated DeltaNet) against the llama.cpp fixtures, on the
CPU, on simulated GPUs and with the mixer's CUDA kernels on emulated (or, marked gpu, real) devices;
and the delta rule's chunked form against its recurrence."""
from pathlib import Path

import numpy as np
import pytest

import forward_parity as parity
from engine import arch
from engine.arch import delta_net
from engine.gguf.model_file import ModelFile

HYBRID_FIXTURES = Path(__file__).resolve().parents[4] / "shared" / "fixtures-hybrid"

VARIANTS = [("qwen35moe", "F16"), ("qwen35moe", "Q8_0"), ("qwen35moe", "Q4_K_M"),
            ("qwen3next", "F16"), ("qwen3next", "Q4_K_M"), ("qwen35", "F16"), ("qwen35", "Q6_K")]


@pytest.fixture(scope="session")
def hybrid_dir() -> Path:
    if not HYBRID_FIXTURES.is_dir():
        pytest.skip(f"hybrid reference fixtures not found at {HYBRID_FIXTURES}")
    return HYBRID_FIXTURES


@pytest.mark.parametrize("fixture,variant", VARIANTS)
def test_matches_llama_cpp_f32_reference(hybrid_dir, fixture, variant):
    parity.check_f32ref(hybrid_dir / fixture, variant)


@pytest.mark.parametrize("fixture,variant", VARIANTS)
def test_matches_llama_cpp_default_settings(hybrid_dir, fixture, variant):
    parity.check_llama_cpp_default(hybrid_dir / fixture, variant)


@pytest.mark.parametrize("fixture", ["qwen35moe", "qwen3next", "qwen35"])
def test_smoke(hybrid_dir, fixture):
    parity.smoke(hybrid_dir / fixture, "F16")


@pytest.mark.parametrize("name", [f"{f}/{v}" for f, v in VARIANTS])
def test_fixture_tensors_match_the_family_tables(hybrid_dir, name):
    mf = ModelFile(hybrid_dir / f"{name}.gguf")
    family = arch.family(mf.architecture)
    hp = family.hyperparams(mf.metadata)
    specs = {s.name: s for s in family.tensor_specs(hp, tied_output="output.weight" not in mf.tensors)}
    assert set(mf.tensors) == set(specs)
    assert all(specs[n].accepts(mf.tensors[n].shape) for n in mf.tensors)


def test_hyperparams_and_layer_kinds(hybrid_dir):
    for fixture, grouped in (("qwen35moe", False), ("qwen3next", True), ("qwen35", False)):
        hp = arch.family(fixture).hyperparams(ModelFile(hybrid_dir / fixture / "F16.gguf").metadata)
        assert hp.recurrent == (True, True, True, False)
        assert [hp.n_embd_k_gqa(il) for il in range(4)] == [0, 0, 0, 64 * hp.n_head_kv[3]]
        assert (hp.ssm_n_group, hp.ssm_dt_rank, hp.ssm_d_state, hp.conv_channels) == (2, 4, 64, 512)
        assert hp.grouped_heads == grouped and hp.joint_beta_alpha == grouped
        assert hp.n_embd_r() == 3 * 512 and hp.n_embd_s() == 64 * 256


def test_recurrent_layers_key_overrides_the_interval(hybrid_dir):
    md = dict(ModelFile(hybrid_dir / "qwen35" / "F16.gguf").metadata)
    md["qwen35.attention.recurrent_layers"] = [False, True, True, True]
    assert arch.family("qwen35").hyperparams(md).recurrent == (False, True, True, True)


def test_only_attention_layers_have_a_kv_cache(hybrid_dir):
    model = parity.load(hybrid_dir / "qwen35moe", "F16")
    cache = model.new_cache()
    assert [k.shape[1] for k in cache.k] == [0, 0, 0, 128]
    assert [c is None for c in cache.recurrent.conv] == [False, False, False, True]
    assert cache.recurrent.ssm[0].shape == (1, 64 * 64 * 4)


def random_delta_inputs(rng, n_tokens, n_heads=3, d_k=8, d_v=6):
    q = rng.standard_normal((n_tokens, n_heads, d_k)).astype(np.float32)
    k = delta_net.l2_normalize(rng.standard_normal((n_tokens, n_heads, d_k)).astype(np.float32), 1e-6)
    v = rng.standard_normal((n_tokens, n_heads, d_v)).astype(np.float32)
    g = -rng.uniform(0.001, 3.0, (n_tokens, n_heads)).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (n_tokens, n_heads)).astype(np.float32)
    state = rng.standard_normal((n_heads, d_k, d_v)).astype(np.float32)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("n_tokens,chunk", [(1, 4), (5, 4), (16, 4), (70, 64), (130, 64)])
def test_chunked_delta_rule_equals_the_recurrence(n_tokens, chunk):
    q, k, v, g, beta, state = random_delta_inputs(np.random.default_rng(n_tokens), n_tokens)
    state_step, state_chunk = state.copy(), state.copy()
    out_step = delta_net.delta_rule_recurrent(q, k, v, g, beta, state_step)
    out_chunk = delta_net.delta_rule_chunked(q, k, v, g, beta, state_chunk, chunk=chunk)
    assert parity.rel(out_chunk.reshape(n_tokens, -1), out_step.reshape(n_tokens, -1)) < 1e-5
    assert parity.rel(state_chunk.reshape(1, -1), state_step.reshape(1, -1)) < 1e-5


def test_delta_rule_against_the_definition_in_float64():
    """S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q, written out per head."""
    q, k, v, g, beta, state = random_delta_inputs(np.random.default_rng(7), 9)
    expected = np.zeros(v.shape)
    for h in range(q.shape[1]):
        s = state[h].astype(np.float64)
        for t in range(len(q)):
            s = np.exp(g[t, h]) * s
            s = s + np.outer(k[t, h], beta[t, h] * (v[t, h] - s.T @ k[t, h]))
            expected[t, h] = s.T @ q[t, h]
    out = delta_net.delta_rule_chunked(q, k, v, g, beta, state.copy(), chunk=4)
    assert parity.rel(out.reshape(9, -1), expected.reshape(9, -1)) < 1e-5


def test_causal_conv_continues_from_its_state():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 5)).astype(np.float32)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    whole, _ = delta_net.causal_conv(x, np.zeros((3, 5), np.float32), w)
    first, state = delta_net.causal_conv(x[:6], np.zeros((3, 5), np.float32), w)
    rest, _ = delta_net.causal_conv(x[6:], state, w)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=1e-6)
    t, c = 5, 2     # y_t[c] = sum_j w[c, j] x_{t-3+j}[c]
    assert whole[t, c] == pytest.approx(sum(w[c, j] * x[t - 3 + j, c] for j in range(4)), rel=1e-5)


@pytest.mark.parametrize("name", ["tiny-qwen3.5-moe", "tiny-qwen3.5", "tiny-qwen3-next"])
def test_tiny_presets_run(tmp_path, name):
    """The synthetic tiny hybrids load and run; prefill in chunks equals the token-by-token path."""
    from engine.run.model import Model
    from engine.run_config import RunConfig
    from engine.synth.writer import write_synthetic
    path = write_synthetic(tmp_path / f"{name}.gguf", name, "Q4_K_M")
    model = Model.load(path, RunConfig(n_ctx=256, activations="f32"))
    toks = np.random.default_rng(0).integers(3, 512, 40)
    batch = model.eval_logits(toks)
    cache = model.new_cache()
    steps = np.concatenate([model.eval_logits(toks[i:i + 1], cache) for i in range(len(toks))])
    assert np.isfinite(batch).all() and batch.std() > 0.1
    assert parity.rel(steps, batch) < 1e-4


# --- quantized KV caches: llama.cpp's Hadamard rotation and Q8_0 queries --------------------------

def kv_extras_rows(fixture_dir, variant, cache_type):
    """Rows llama.cpp's flash-attention path itself moved far from its exact logits (expert flips)."""
    extras = parity.meta(fixture_dir)["variants"][variant]["kv_cache_extras"]
    return set(extras[cache_type]["batch_vs_f32ref"]["outlier_rows"])


@pytest.mark.parametrize("variant,cache_type,tolerance", [
    ("F16", "q8_0", 5e-3), ("F16", "q4_0", 1e-2), ("F16", "q4_0-norot", 1e-2),
    ("Q8_0", "q4_0", 3e-2), ("Q4_K_M", "q8_0", 5e-2)])
def test_quantized_kv_cache_matches_llama_cpp(hybrid_dir, monkeypatch, variant, cache_type, tolerance):
    fixture_dir = hybrid_dir / "qwen35moe"
    kv_type = cache_type.removesuffix("-norot")
    monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1" if cache_type.endswith("-norot") else "0")
    model = parity.load(fixture_dir, variant, kv_type, activations="llama.cpp")
    batch, incr = parity.batch_and_incremental(model, parity.tokens(fixture_dir))
    ref_batch = np.load(fixture_dir / f"{variant}.logits_batch_fa_kv-{cache_type}.npy")
    ref_incr = np.load(fixture_dir / f"{variant}.logits_incr_fa_kv-{cache_type}.npy")
    keep = [r for r in range(len(ref_batch)) if r not in kv_extras_rows(fixture_dir, variant, cache_type)]
    assert np.isfinite(batch).all() and np.isfinite(incr).all()
    assert parity.rel(batch[keep], ref_batch[keep]) <= tolerance
    assert parity.rel(incr, ref_incr) <= tolerance


def test_the_rotation_is_what_llama_cpp_caches(hybrid_dir):
    """A q4_0 cache: our rotated run lands next to llama.cpp's rotated one, far from its -norot one."""
    fixture_dir = hybrid_dir / "qwen35moe"
    model = parity.load(fixture_dir, "F16", "q4_0", activations="llama.cpp")
    batch = model.eval_logits(parity.tokens(fixture_dir))
    rotated = np.load(fixture_dir / "F16.logits_batch_fa_kv-q4_0.npy")
    plain = np.load(fixture_dir / "F16.logits_batch_fa_kv-q4_0-norot.npy")
    assert parity.rel(batch, rotated) * 3 < parity.rel(batch, plain)


def test_placed_on_simulated_gpus_gives_the_cpu_logits(hybrid_dir):
    """DeltaNet layers on one GPU, the attention layer on another, some experts on the CPU."""
    from engine.devices import Device, simulated_gpus
    from engine.plan.inventory import Inventory
    from engine.plan.llama_args import parse_llama_args
    from engine.run.model import Model
    from engine.run_config import RunConfig
    path = hybrid_dir / "qwen35moe" / "F16.gguf"
    devices = [Device("CPU", "cpu", 64 << 30)] + simulated_gpus("16GiB,16GiB")
    placement = parse_llama_args(r"-ngl 99 -ts 1,1 -ot blk\.1\.ffn_.*_exps=CPU", Inventory.from_model_file(
        ModelFile(path)), devices).placement
    assert [placement.layer_home_device(il) for il in range(4)] == ["CUDA0"] * 3 + ["CUDA1"]
    toks = parity.tokens(hybrid_dir / "qwen35moe")
    config = RunConfig(n_ctx=512, type_k="f32", type_v="f32", activations="f32")
    placed = Model.load(path, config, placement=placement)
    batch, incr = parity.batch_and_incremental(placed, toks)
    cpu_batch, cpu_incr = parity.batch_and_incremental(Model.load(path, config), toks)
    np.testing.assert_array_equal(batch, cpu_batch)
    np.testing.assert_array_equal(incr, cpu_incr)


def placed_model(path, args: str, devices, cache_type: str = "f32", activations: str = "f32"):
    from engine.plan.inventory import Inventory
    from engine.plan.llama_args import parse_llama_args
    from engine.run.model import Model
    from engine.run_config import RunConfig
    placement = parse_llama_args(args, Inventory.from_model_file(ModelFile(path)), devices).placement
    config = RunConfig(n_ctx=512, type_k=cache_type, type_v=cache_type, activations=activations)
    return Model.load(path, config, placement=placement)


def assert_check_1(model, fixture_dir):
    """llama.cpp's exact-math logits, batched (prefill) and one token at a time (decode)."""
    batch, incr = parity.batch_and_incremental(model, parity.tokens(fixture_dir))
    ref = np.load(fixture_dir / "F16.logits_batch_f32ref.npy")
    assert parity.rel(batch, ref) <= 1e-3 and parity.row_rel(batch, ref).max() <= 3e-3
    assert parity.rel(incr, ref[-parity.INCR_STEPS:]) <= 1e-3


def assert_states_on_their_homes(model):
    """Each DeltaNet layer's state lives in its home device's memory; the CUDA ones run the kernels."""
    from engine.backends.cuda import CudaBackend
    cache = model.new_cache()
    for il, layer in enumerate(cache.recurrent.layers):
        if layer is not None:
            home = model.ops.backends[model.homes[il]]
            assert (layer.memory is home.runtime) if isinstance(home, CudaBackend) else type(layer.conv) is np.ndarray


@pytest.mark.parametrize("fixture", ["qwen35moe", "qwen3next"])
def test_on_emulated_cuda_devices_meets_check_1(hybrid_dir, fixture):
    """Every layer on two emulated CUDA devices: the DeltaNet mixer runs the kernels of
    delta_net.cu there, its recurrent state in the device's memory, as the attention layer does
    with its KV cache."""
    from engine.devices import Device, emulated_gpus
    fixture_dir = hybrid_dir / fixture
    model = placed_model(fixture_dir / "F16.gguf", "-ngl 99 -ts 1,1",
                         [Device("CPU", "cpu", 64 << 30)] + emulated_gpus("16GiB,16GiB"))
    assert set(model.homes) == {"CUDA0", "CUDA1"}
    assert_states_on_their_homes(model)
    assert_check_1(model, fixture_dir)


def test_hybrid_placement_cpu_and_emulated_cuda_meets_check_1(hybrid_dir):
    """The first two layers on the CPU (the host mixer), the last two on an emulated GPU (its kernels)."""
    from engine.devices import Device, emulated_gpus
    fixture_dir = hybrid_dir / "qwen35"
    model = placed_model(fixture_dir / "F16.gguf", "-ngl 3", [Device("CPU", "cpu", 64 << 30)] + emulated_gpus("16GiB"))
    assert model.homes == ["CPU", "CPU", "CUDA0", "CUDA0"]
    assert_states_on_their_homes(model)
    assert_check_1(model, fixture_dir)


def test_on_an_emulated_cuda_device_with_llama_cpp_settings(hybrid_dir):
    """Check 2 (an F16 cache, llama.cpp's rounding of matmul inputs) with the mixer's kernels."""
    from engine.devices import Device, emulated_gpus
    fixture_dir = hybrid_dir / "qwen3next"
    devices = [Device("CPU", "cpu", 64 << 30)] + emulated_gpus("16GiB")
    model = placed_model(fixture_dir / "Q4_K_M.gguf", "-ngl 99", devices, "f16", "llama.cpp")
    parity.check_llama_cpp_default(fixture_dir, "Q4_K_M", model)


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["qwen35moe", "qwen3next", "qwen35"])
def test_on_the_gpu_and_hybrid_meets_check_1(hybrid_dir, fixture):
    """On a real GPU: every layer on CUDA0, then the first two layers on the CPU."""
    from engine.devices import Device, cpu_device
    fixture_dir = hybrid_dir / fixture
    devices = [cpu_device(), Device("CUDA0", "gpu", 16 << 30, "GPU")]
    for args in ("-ngl 99", "-ngl 3"):
        model = placed_model(fixture_dir / "F16.gguf", args, devices)
        assert_states_on_their_homes(model)
        assert_check_1(model, fixture_dir)
