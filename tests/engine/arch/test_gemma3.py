"""gemma3 against the llama.cpp fixtures, and its sliding-window cache."""
import numpy as np
import pytest

import forward_parity as parity
from engine.run_config import RunConfig
from engine.run.model import Model


@pytest.mark.parametrize("variant", ["F16", "Q8_0"])
def test_matches_llama_cpp_f32_reference(fixtures_dir, variant):
    found = parity.check_f32ref(fixtures_dir / "gemma3", variant)
    # an exact tanh GELU where llama.cpp uses an F16 lookup table: the README's calibration
    # puts this at <= 3.7e-4
    assert found["batch_rel"] < 4e-4


@pytest.mark.parametrize("variant", ["F16", "Q8_0"])
def test_matches_llama_cpp_default_settings(fixtures_dir, variant):
    parity.check_llama_cpp_default(fixtures_dir / "gemma3", variant)


def test_smoke(fixtures_dir):
    parity.smoke(fixtures_dir / "gemma3", "F16")


def test_sliding_layers_use_a_ring_cache_that_agrees_with_a_full_one(fixtures_dir):
    toks = np.tile(parity.tokens(fixtures_dir / "gemma3"), 4)[:300]      # longer than the 256-cell ring
    # exact activations: with llama.cpp's, the GELU input's f16 rounding turns the two ubatch
    # sizes' different summation orders into ~1e-4 differences that say nothing about the ring
    exact = RunConfig(n_ctx=512, type_k="f32", type_v="f32", activations="f32")
    ring = Model.load(fixtures_dir / "gemma3" / "F16.gguf", exact.replace(n_ubatch=16))
    full = Model.load(fixtures_dir / "gemma3" / "F16.gguf", exact.replace(n_ubatch=512))
    ring_cache = ring.new_cache()
    assert [len(k) for k in ring_cache.k] == [256, 256, 256, 256, 256, 512]
    assert [len(k) for k in full.new_cache().k] == [512] * 6
    ring_logits = ring.eval_logits(toks, ring_cache)
    assert parity.rel(ring_logits, full.eval_logits(toks)) < 1e-5
    with pytest.raises(ValueError, match="window cache"):
        ring_cache.truncate(60)         # the ring now holds positions 44..299; 60 needs 29..
    ring_cache.truncate(290)
    assert parity.rel(ring.eval_logits(toks[290:], ring_cache), ring_logits[290:]) < 1e-5


def test_final_logit_softcapping(fixtures_dir):
    model = parity.load(fixtures_dir / "gemma3", "F16")
    toks = parity.tokens(fixtures_dir / "gemma3")[:8]
    plain = model.eval_logits(toks)
    model.hparams = model.hparams.replace(final_logit_softcapping=2.0)
    np.testing.assert_allclose(model.eval_logits(toks), 2.0 * np.tanh(plain / 2.0), rtol=1e-5, atol=1e-6)
