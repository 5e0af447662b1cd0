"""llama4 against the llama.cpp fixtures, and its rope/temperature/chunk pattern."""
import numpy as np
import pytest

import forward_parity as parity


@pytest.mark.parametrize("variant", ["F16", "Q4_K_M"])
def test_matches_llama_cpp_f32_reference(fixtures_dir, variant):
    parity.check_f32ref(fixtures_dir / "llama4", variant)


@pytest.mark.parametrize("variant", ["F16", "Q4_K_M"])
def test_matches_llama_cpp_default_settings(fixtures_dir, variant):
    parity.check_llama_cpp_default(fixtures_dir / "llama4", variant)


def test_smoke(fixtures_dir):
    parity.smoke(fixtures_dir / "llama4", "F16")


def test_every_fourth_layer_skips_rope_and_scales_by_temperature(fixtures_dir):
    hp = parity.load(fixtures_dir / "llama4", "F16").hparams
    assert [hp.uses_rope(il) for il in range(hp.n_layer)] == [True, True, True, False]
    temperature = hp.attention_temperature(np.array([0, 8190, 8191, 3 * 8192 - 1]))
    np.testing.assert_allclose(temperature, [1.0, 1.0, 1.0 + 0.1 * np.log(2.0), 1.0 + 0.1 * np.log(4.0)], rtol=1e-6)


def test_chunked_layers_see_only_their_chunk(fixtures_dir):
    model = parity.load(fixtures_dir / "llama4", "F16")
    toks = parity.tokens(fixtures_dir / "llama4")[:32]
    wide = model.eval_logits(toks)
    model.hparams = model.hparams.replace(attention_chunk=16)
    narrow = model.eval_logits(toks)
    assert parity.rel(narrow[:16], wide[:16]) < 1e-6       # the first chunk is the whole past anyway
    assert (parity.row_rel(narrow[16:], wide[16:]) > 1e-3).all()


def test_moe_layers_route_one_expert_per_token(fixtures_dir):
    model = parity.load(fixtures_dir / "llama4", "F16")
    toks = parity.tokens(fixtures_dir / "llama4")
    model.eval_logits(toks)
    moe = [il for il in range(model.hparams.n_layer) if model.hparams.is_moe_layer(il)]
    assert moe == [1, 3]
    assert (model.expert_counts[moe].sum(axis=1) == len(toks)).all()
    assert model.expert_counts[[0, 2]].sum() == 0
