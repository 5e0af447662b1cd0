"""Quantized KV caches: logits close to f16, memory exactly the planner's, and a clear NaN error."""
import numpy as np
import pytest

from engine.run.generate import Session, generate
from engine.plan.memory import kv_cache_bytes
from engine.run.model import Model
from engine.run_config import RunConfig
from engine.run.sampling import SamplerSettings

# rel error of the last 8 rows against an f16 cache on these random-weight models (measured on
# llama-dense: f32 2.1e-3 (the f16 cache's decode rounds queries and its running V sum to f16, as
# llama.cpp's flash attention does; 7.5e-4 without), bf16 6.3e-3, q8_0 1.8e-2, q5_x 0.14-0.16, q4_x/iq4_nl 0.29-0.31); a wrong
# block layout, scale or row mapping gives ~1 or more. Perplexity with each cache type matches
# llama-perplexity's to within 0.3% (docs/benchmarks.md).
BUDGET = {"f32": 4e-3, "bf16": 1.5e-2, "q8_0": 4e-2, "q5_1": 0.3, "q5_0": 0.3, "q4_1": 0.5, "q4_0": 0.5,
          "iq4_nl": 0.5}


def incremental_logits(path, type_k, type_v):
    model = Model.load(path, RunConfig(n_ctx=256, type_k=type_k, type_v=type_v))
    tokens = np.load(path.parent / "tokens.npy")
    cache = model.new_cache()
    model.eval_logits(tokens[:-8], cache, last_only=True)
    rows = [model.eval_logits(tokens[i:i + 1], cache) for i in range(len(tokens) - 8, len(tokens))]
    return np.concatenate(rows), model, cache


@pytest.mark.parametrize("fixture", ["llama-dense/F16", "qwen3/F32", "deepseek2/F16", "gemma3/F16"])
@pytest.mark.parametrize("kv_type", sorted(BUDGET))
def test_quantized_cache_logits_are_close_to_f16(fixtures_dir, fixture, kv_type):
    path = fixtures_dir / f"{fixture}.gguf"
    reference, _, _ = incremental_logits(path, "f16", "f16")
    logits, model, cache = incremental_logits(path, kv_type, kv_type)
    rel = np.linalg.norm(logits - reference) / np.linalg.norm(reference)
    # MLA caches the compressed latent, which every head's keys and values are expanded from
    assert rel < BUDGET[kv_type] * (3 if fixture.startswith("deepseek2") else 1)
    if kv_type != "f32":
        assert rel > 0          # the cache really is stored in the narrower type
    assert cache.nbytes == kv_cache_bytes(model.hparams, model.run_config)


def test_quantized_cache_bytes_equal_the_planner(fixtures_dir):
    model = Model.load(fixtures_dir / "llama-dense/F32.gguf", RunConfig(n_ctx=512, type_k="q8_0", type_v="q4_0"))
    cache = model.new_cache()
    # 2 layers x 512 cells x 128 values: K q8_0 34 bytes per 32, V q4_0 18 bytes per 32
    assert cache.nbytes == kv_cache_bytes(model.hparams, model.run_config) == 2 * 512 * 4 * (34 + 18)


def test_non_finite_logits_name_the_kv_type_and_a_fix(fixtures_dir):
    model = Model.load(fixtures_dir / "llama-dense/F32.gguf", RunConfig(n_ctx=256, type_k="q4_0", type_v="q4_0"))
    session = Session(model)
    session.prefill([1, 5, 9])
    session.cache.k[1][:] = 0xFF        # scales of NaN: what an overflowing quantized cache looks like
    session.tokens.pop()
    session.cache.truncate(2)
    with pytest.raises(Exception) as info:
        list(generate(session, [1, 5, 9], SamplerSettings(temperature=0), max_tokens=2))
    message = str(info.value)
    assert "layer 1 produced non-finite values" in message
    assert "KV cache q4_0/q4_0: try -ctk q8_0" in message
