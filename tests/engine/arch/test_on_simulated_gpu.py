"""The whole llama.cpp fixture suite on a strict simulated GPU: every family's forward pass runs
on non-NumPy device arrays and gives the CPU's logits bit for bit (so it is within every
fixture's tolerance too)."""
from pathlib import Path

import pytest

import forward_parity as parity

FIXTURES = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures"     # as tests/conftest.py finds them

VARIANTS = sorted((path.parent.name, path.stem) for path in FIXTURES.glob("*/*.gguf")
                  if (path.parent / "meta.json").exists())


@pytest.mark.parametrize("fixture,variant", VARIANTS)
def test_f32_math_is_bit_identical_on_a_simulated_gpu(fixtures_dir, fixture, variant):
    parity.check_on_simulated_gpu(fixtures_dir / fixture, variant)


@pytest.mark.parametrize("fixture,variant", [("llama-moe", "Q4_K_M"), ("gemma3", "Q8_0"), ("deepseek2", "Q4_K_M")])
def test_llama_cpp_settings_are_bit_identical_on_a_simulated_gpu(fixtures_dir, fixture, variant):
    parity.check_on_simulated_gpu(fixtures_dir / fixture, variant, kv_type="q8_0", activations="llama.cpp")
