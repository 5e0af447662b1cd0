"""llama (dense and Mixtral-style MoE) against the llama.cpp fixtures."""
import numpy as np
import pytest

import forward_parity as parity

VARIANTS = [("llama-dense", v) for v in ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q6_K")] + \
           [("llama-moe", v) for v in ("F32", "Q4_K_M")]


@pytest.mark.parametrize("fixture,variant", VARIANTS)
def test_matches_llama_cpp_f32_reference(fixtures_dir, fixture, variant):
    parity.check_f32ref(fixtures_dir / fixture, variant)


@pytest.mark.parametrize("fixture,variant", VARIANTS)
def test_matches_llama_cpp_default_settings(fixtures_dir, fixture, variant):
    parity.check_llama_cpp_default(fixtures_dir / fixture, variant)


@pytest.mark.parametrize("fixture", ["llama-dense", "llama-moe"])
def test_smoke(fixtures_dir, fixture):
    parity.smoke(fixtures_dir / fixture, "F32")


def test_rope_freqs_divide_the_rotation_frequencies(fixtures_dir):
    model = parity.load(fixtures_dir / "llama-dense", "F32")
    toks = parity.tokens(fixtures_dir / "llama-dense")[:16]
    plain = model.eval_logits(toks)
    model.globals["rope_freqs.weight"] = np.ones(model.hparams.n_rot // 2, dtype=np.float32)
    assert parity.rel(model.eval_logits(toks), plain) < 1e-6
    model.globals["rope_freqs.weight"] = np.full(model.hparams.n_rot // 2, 4.0, dtype=np.float32)
    slowed = model.eval_logits(toks)
    assert parity.rel(slowed[:1], plain[:1]) < 1e-6      # position 0 does not rotate
    assert parity.rel(slowed, plain) > 1e-3
