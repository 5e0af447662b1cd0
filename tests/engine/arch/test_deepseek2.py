"""deepseek2 (MLA, grouped sigmoid routing, shared experts) against the llama.cpp fixtures."""
import math

import pytest

import forward_parity as parity
from engine.arch import deepseek2
from engine.arch.layers import RopeScaling


@pytest.mark.parametrize("variant", ["F16", "Q4_K_M"])
def test_matches_llama_cpp_f32_reference(fixtures_dir, variant):
    parity.check_f32ref(fixtures_dir / "deepseek2", variant)


@pytest.mark.parametrize("variant", ["F16", "Q4_K_M"])
def test_matches_llama_cpp_default_settings(fixtures_dir, variant):
    parity.check_llama_cpp_default(fixtures_dir / "deepseek2", variant)


def test_smoke(fixtures_dir):
    parity.smoke(fixtures_dir / "deepseek2", "F16")


def test_mla_caches_latent_and_rope_key_only(fixtures_dir):
    model = parity.load(fixtures_dir / "deepseek2", "F16")
    cache = model.new_cache()
    assert [k.shape[1] for k in cache.k] == [256 + 64] * 3
    assert cache.v == [None, None, None]
    model.eval_logits(parity.tokens(fixtures_dir / "deepseek2"), cache)
    counts = model.expert_counts
    assert counts[0].sum() == 0 and (counts[1:].sum(axis=1) == 64 * 2).all()


def test_kq_scale_without_and_with_yarn():
    hp = deepseek2.DeepSeek2HyperParams(
        arch="deepseek2", n_vocab=8, n_ctx_train=4096, n_embd=8, n_layer=1, n_head=1, n_head_kv=(1,),
        n_embd_head_k=8, n_embd_head_v=8, n_ff=(8,), n_rot=64, rms_eps=1e-6, rope_freq_base=1e4,
        rope_freq_scale=1 / 40, n_embd_head_k_mla=192, rope_yarn_log_mul=0.707)
    assert deepseek2.kq_scale(hp, RopeScaling()) == pytest.approx(1 / math.sqrt(192))
    md = {"general.architecture": "deepseek2", "deepseek2.rope.scaling.type": "yarn"}
    scaling = RopeScaling.from_metadata(md, hp, yarn_mscale_is_log_mul=True, yarn_log_mul=0.707)
    # DeepSeek-V3's softmax_scale: (0.1 * 0.707 * ln(40) + 1)^2 / sqrt(192)
    expected = (0.1 * 0.707 * math.log(40) + 1) ** 2 / math.sqrt(192)
    assert deepseek2.kq_scale(hp, scaling) == pytest.approx(expected, rel=1e-6)
    # the rope op's own magnitude factor cancels: cos/sin keep unit length
    assert scaling.attn_factor * (1 + 0.1 * math.log(40)) == pytest.approx(1.0)
