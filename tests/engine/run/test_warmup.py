"""The warm-up compiles what a prompt uses, and its marker says "warm" only for models of the kind
it ran on, in the cache directory Numba uses."""
import numba
import numpy as np
import pytest

from engine.gguf.model_file import ModelFile
from engine.run.model import Model
from engine.run.warmup import WARM_UP_STEPS, is_warm, marker_path, warm_up
from engine.run_config import RunConfig
from kernels.compile_progress import counting_compiles
from kernels.cpu.qgemm import PREFILL_MIN_TOKENS


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache directory of its own for the markers (the kernels already made keep theirs)."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "numba"))
    return tmp_path / "numba"


def test_a_warm_up_marks_its_kind_of_model_warm_and_no_other(fixtures_dir, cache_dir):
    moe = ModelFile(fixtures_dir / "llama-moe" / "Q4_K_M.gguf")
    dense = ModelFile(fixtures_dir / "llama-dense" / "Q8_0.gguf")     # other tensor types
    config = RunConfig(n_ctx=64)
    assert not is_warm(moe, config)
    warm_up(Model(moe, config))
    assert is_warm(moe, config)
    assert marker_path(moe, config).parent == cache_dir / "offload-studio"
    assert not is_warm(moe, config.replace(type_k="q8_0"))      # another KV cache type: other kernels
    assert not is_warm(dense, config)


def test_after_a_warm_up_prompts_of_every_length_compile_nothing(fixtures_dir, cache_dir):
    model = Model(ModelFile(fixtures_dir / "llama-moe" / "Q4_K_M.gguf"), RunConfig(n_ctx=256))
    warm_up(model)
    assert PREFILL_MIN_TOKENS in WARM_UP_STEPS and 1 in WARM_UP_STEPS
    with counting_compiles() as counter:
        for n_tokens in (1, 5, PREFILL_MIN_TOKENS + 7):
            model.eval_logits(np.arange(n_tokens, dtype=np.int32) % 50, model.new_cache(64))
    assert counter.compiled == 0
