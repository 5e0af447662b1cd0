"""qwen3 and qwen3moe against the llama.cpp fixtures."""
import pytest

import forward_parity as parity

VARIANTS = [("qwen3", "F32"), ("qwen3", "Q5_K_M"), ("qwen3moe", "F16"), ("qwen3moe", "Q4_K_M")]


@pytest.mark.parametrize("fixture,variant", VARIANTS)
def test_matches_llama_cpp_f32_reference(fixtures_dir, fixture, variant):
    parity.check_f32ref(fixtures_dir / fixture, variant)


@pytest.mark.parametrize("fixture,variant", VARIANTS)
def test_matches_llama_cpp_default_settings(fixtures_dir, fixture, variant):
    parity.check_llama_cpp_default(fixtures_dir / fixture, variant)


@pytest.mark.parametrize("fixture,variant", [("qwen3", "F32"), ("qwen3moe", "F16")])
def test_smoke(fixtures_dir, fixture, variant):
    parity.smoke(fixtures_dir / fixture, variant)


def test_qwen3moe_counts_every_selection(fixtures_dir):
    model = parity.load(fixtures_dir / "qwen3moe", "F16")
    toks = parity.tokens(fixtures_dir / "qwen3moe")
    model.eval_logits(toks)
    hp = model.hparams
    assert model.expert_counts.shape == (hp.n_layer, hp.n_expert)
    assert (model.expert_counts.sum(axis=1) == len(toks) * hp.n_expert_used).all()
