"""The CPU's lean decode step (engine.backends.cpu_decode) against the family's own forward pass.

Each case prefills a fixture's tokens but the last INCR_STEPS and decodes those one at a time,
once through the lean step and once with it turned off: the logits and the expert counts must be
bit-identical, since both run the same kernels on the same inputs. The cases cover each way the
step runs a layer: the chained kernels (kernels.cpu.decode_step) with a dense FFN and with routed
experts, its per-op form (float weights, exact activations, a quantized cache) and the family's
MoE fallback."""
from __future__ import annotations

import numpy as np
import pytest

import engine.run.graph_decode as graph_decode
from forward_parity import INCR_STEPS, tokens
from engine.run.model import Model, NonFiniteError
from engine.run_config import RunConfig

# (fixture, variant, activations, cache type, how its layers run: chained, experts by decode_experts)
CASES = [
    ("gemma3", "Q8_0", "llama.cpp", "f16", True, False),
    ("qwen3moe", "Q4_K_M", "llama.cpp", "f16", True, True),
    ("llama-dense", "Q4_K_M", "llama.cpp", "f32", True, False),
    ("llama-dense", "F16", "llama.cpp", "f16", False, False),
    ("llama-dense", "Q4_K_M", "llama.cpp", "q8_0", False, False),
    ("llama-moe", "Q4_K_M", "f32", "f16", False, False),
]


def decode(path, config: RunConfig, toks, lean: bool, monkeypatch) -> tuple[np.ndarray, np.ndarray, object]:
    with monkeypatch.context() as patch:
        if not lean:
            patch.setattr(graph_decode, "lean_blocker", lambda backend, plan: "turned off for the comparison")
        model = Model.load(path, config)
        cache = model.new_cache()
        model.eval_logits(toks[:-INCR_STEPS], cache)
        rows = [model.eval_logits(toks[i:i + 1], cache) for i in range(len(toks) - INCR_STEPS, len(toks))]
        return np.concatenate(rows), model.expert_counts.copy(), graph_decode._DECODERS.get(model)


@pytest.mark.parametrize("fixture, variant, activations, cache_type, chained, experts", CASES)
def test_lean_decode_is_bit_identical_with_the_family_pass(fixtures_dir, monkeypatch, fixture, variant,
                                                          activations, cache_type, chained, experts):
    path = fixtures_dir / fixture / f"{variant}.gguf"
    toks = tokens(fixtures_dir / fixture)
    config = RunConfig(n_ctx=512, activations=activations, type_k=cache_type, type_v=cache_type)
    logits, counts, decoder = decode(path, config, toks, True, monkeypatch)
    (step,) = [r.lean for r in decoder.ranges]
    assert [layer.chain is not None for layer in step.bound] == [chained] * len(step.bound)
    assert any(layer.experts is not None for layer in step.bound) == experts
    family_logits, family_counts, family_decoder = decode(path, config, toks, False, monkeypatch)
    assert not family_decoder.has_steps
    assert np.array_equal(logits, family_logits), np.abs(logits - family_logits).max()
    assert np.array_equal(counts, family_counts)


def test_a_non_finite_lean_step_names_its_layer(fixtures_dir):
    path = fixtures_dir / "gemma3" / "Q8_0.gguf"
    model = Model.load(path, RunConfig(n_ctx=512))
    cache = model.new_cache()
    model.eval_logits([1, 5, 9], cache)
    model.eval_logits([4], cache)           # the step is bound and has run
    norm = model.layers[2].ffn_norm.copy()
    norm[3] = np.nan
    model.layers[2].tensors["ffn_norm"] = norm
    with pytest.raises(NonFiniteError, match="layer 2 "):
        model.eval_logits([7], cache)
