import pytest

from engine import arch
from engine.plan.memory import kv_cache_bytes, kv_cells, kv_layer_bytes
from engine.synth.presets import preset
from engine.run_config import RunConfig

MIB = 1 << 20


def hparams(name, **overrides):
    md = preset(name)
    md.update(overrides)
    return arch.family(md["general.architecture"]).hyperparams(md)


def deepseek_v3_without_mla_keys():
    md = preset("deepseek-v3")
    del md["deepseek2.attention.key_length_mla"], md["deepseek2.attention.value_length_mla"]
    md.update({"deepseek2.attention.head_count_kv": 128, "deepseek2.attention.key_length": 192,
               "deepseek2.attention.value_length": 128})
    return arch.family("deepseek2").hyperparams(md)


@pytest.mark.parametrize("hp, run_config, expected_mib", [
    (lambda: hparams("deepseek-v3"), RunConfig(n_ctx=65536, type_k="q8_0", type_v="q8_0"), 2333.25),
    (lambda: hparams("deepseek-v3"), RunConfig(n_ctx=32768), 2196.00),
    (deepseek_v3_without_mla_keys, RunConfig(n_ctx=8192), 39040),
    (lambda: hparams("llama-3-8b"), RunConfig(n_ctx=8192), 1024),
])
def test_kv_bytes_equal_llama_cpp(hp, run_config, expected_mib):
    assert kv_cache_bytes(hp(), run_config) == expected_mib * MIB


def test_mla_caches_the_latent_and_rope_key_only():
    hp = hparams("deepseek-v3")
    assert hp.is_mla
    k_bytes, v_bytes = kv_layer_bytes(hp, 0, RunConfig(n_ctx=256))
    assert (k_bytes, v_bytes) == ((512 + 64) * 2 * 256, 0)


def test_context_is_padded_to_256_cells():
    hp = hparams("llama-3-8b")
    assert kv_cache_bytes(hp, RunConfig(n_ctx=1000)) == kv_cache_bytes(hp, RunConfig(n_ctx=1024))


def test_gemma3_sliding_layers_use_the_window_cache():
    hp = hparams("gemma-3-1b")      # window 512, five sliding layers per global one
    rc = RunConfig(n_ctx=32768, n_ubatch=512)
    kinds = [kv_cells(hp, il, rc) for il in range(hp.n_layer)]
    assert kinds[:6] == [1024] * 5 + [32768]
    # llama.cpp: non-SWA 4 layers x 32768 cells, SWA 22 layers x 1024 cells; 1 KV head x 256, f16, K and V
    assert kv_cache_bytes(hp, rc) == (4 * 32768 + 22 * 1024) * 256 * 2 * 2


def test_llama4_chunked_layers_keep_one_chunk_plus_a_ubatch():
    hp = hparams("llama-4-scout")
    rc = RunConfig(n_ctx=65536, n_ubatch=512)
    assert [kv_cells(hp, il, rc) for il in range(4)] == [8704, 8704, 8704, 65536]
    assert kv_cache_bytes(hp, rc) == (12 * 65536 + 36 * 8704) * 8 * 128 * 2 * 2
    # a short context needs no window cache smaller than itself
    assert kv_cells(hp, 0, RunConfig(n_ctx=4096)) == 4096


@pytest.mark.parametrize("type_name, bytes_per_32", [("f32", 128), ("f16", 64), ("bf16", 64), ("q8_0", 34),
                                                     ("q4_0", 18), ("q4_1", 20), ("q5_0", 22), ("q5_1", 24),
                                                     ("iq4_nl", 18)])
def test_kv_types(type_name, bytes_per_32):
    hp = hparams("llama-3-8b")
    rc = RunConfig(n_ctx=256, type_k=type_name, type_v=type_name)
    assert kv_cache_bytes(hp, rc) == 32 * 2 * 256 * (1024 // 32) * bytes_per_32


def test_unknown_kv_type_is_refused():
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k'"):
        RunConfig(type_k="q3_k")


# --- overhead and the estimate's use of the compute-buffer graph -------------------------------

from engine.devices import Device, simulated_gpus                      # noqa: E402
from engine.gguf.model_file import ModelFile                           # noqa: E402
from engine.plan.inventory import Inventory                            # noqa: E402
from engine.plan.memory import MemoryOptions, estimate_memory, flash_attention_on, overhead_terms  # noqa: E402
from engine.plan.placement import Placement                            # noqa: E402
from engine.synth.writer import write_synthetic                        # noqa: E402

CPU = Device("CPU", "cpu", 1 << 40)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> Inventory:
    path = write_synthetic(tmp_path_factory.mktemp("memory") / "tiny-mixtral.gguf", "tiny-mixtral", sparse=True)
    return Inventory.from_model_file(ModelFile(path))


def test_flash_attention_auto_is_on_as_llama_cpp_resolves_it():
    # resolve_fused_ops turns "auto" on when every device runs it; the CPU and CUDA both do
    assert flash_attention_on(RunConfig(flash_attn="auto"), has_gpu=False)
    assert not flash_attention_on(RunConfig(flash_attn="off"), has_gpu=True)


def test_overhead_is_named_terms_for_llama_cpp_or_the_app():
    hp = hparams("deepseek-v3")
    rc = RunConfig(n_ctx=4096)
    host = overhead_terms(hp, rc, False, MemoryOptions())
    # llama.cpp's "CPU output buffer size = 0.49 MiB": one row of logits (129280 f32)
    assert [(t.name, t.n_bytes, t.derived) for t in host] == [("llama.cpp output buffer", 129280 * 4, False)]
    gpu = overhead_terms(hp, rc, True, MemoryOptions())
    assert [t.name for t in gpu] == ["CUDA context", "cuBLAS workspace"] and all(t.derived for t in gpu)
    app_host = overhead_terms(hp, rc, False, MemoryOptions(target="app"))
    assert [t.name for t in app_host] == ["engine process (Python, NumPy, Numba)", "Qt GUI"]
    assert "CuPy modules and pool" in [t.name for t in overhead_terms(hp, rc, True, MemoryOptions(target="app"))]
    fixed = overhead_terms(hp, rc, True, MemoryOptions(gpu_overhead_bytes=123))
    assert [(t.n_bytes, t.derived) for t in fixed] == [(123, False)]
    with pytest.raises(ValueError, match="memory target"):
        MemoryOptions(target="vllm")


def test_the_estimate_charges_the_graph_s_buffers_per_device(tiny_mixtral):
    devices = [CPU] + simulated_gpus("24GiB")
    rc = RunConfig(n_ctx=4096)
    all_cpu = Placement(tiny_mixtral, devices, ["CPU"] * (tiny_mixtral.n_layer + 1))
    est = estimate_memory(tiny_mixtral, all_cpu, rc, [CPU])
    hp = tiny_mixtral.hparams
    from engine.plan.compute_buffers import GraphShape, compute_buffer_bytes
    expected = compute_buffer_bytes(hp, GraphShape.of(hp, rc, True, kv_cells))["CPU"]
    assert est["CPU"].compute_bytes == expected and not est["CPU"].compute_derived
    assert est["CPU"].overhead_bytes == sum(t.n_bytes for t in est["CPU"].overhead_terms)
    on_gpu = Placement(tiny_mixtral, devices, ["CUDA0"] * (tiny_mixtral.n_layer + 1))
    est = estimate_memory(tiny_mixtral, on_gpu, rc, devices)
    assert est["CUDA0"].compute_derived and est["CUDA0"].compute_bytes >= hp.n_vocab * 512 * 4    # the logits
    assert est["CUDA0"].compute_bytes > est["CPU"].compute_bytes > 0
