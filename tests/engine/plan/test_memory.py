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
