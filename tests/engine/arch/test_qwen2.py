"""qwen2's bias path: the qwen3 fixture's weights as a qwen2 model (no q/k norms, q/k/v biases
added) against an independent float64 NumPy forward pass."""
import numpy as np
import pytest
from gguf import GGUFWriter

import forward_parity as parity
import reference_qwen2
from engine.gguf.model_file import ModelFile
from engine.run.model import Model
from engine.run_config import RunConfig

BIAS_STD = 0.5


@pytest.fixture(scope="module")
def qwen2_path(fixtures_dir, tmp_path_factory):
    """The qwen3 F32 fixture rewritten as qwen2: same metadata under qwen2.*, q/k norms dropped,
    random q/k/v biases added."""
    source = ModelFile(fixtures_dir / "qwen3" / "F32.gguf")
    path = tmp_path_factory.mktemp("qwen2") / "qwen2-bias.gguf"
    writer = GGUFWriter(path, "qwen2")
    for key, value in source.metadata.items():
        if key == "general.architecture":
            continue
        writer.add_key_value(key.replace("qwen3.", "qwen2.", 1), value, _value_type(key, value))
    rng = np.random.default_rng(2)
    for name, info in source.tensors.items():
        if "attn_q_norm" in name or "attn_k_norm" in name:
            continue
        values = np.asarray(source.tensor_data(name)).view(np.float32).reshape(info.shape)
        writer.add_tensor(name, np.ascontiguousarray(values))
        if name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")):
            bias = (rng.standard_normal(info.shape[0]) * BIAS_STD).astype(np.float32)
            writer.add_tensor(name.replace(".weight", ".bias"), bias)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _value_type(key, value):
    from gguf import GGUFValueType
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    return GGUFValueType.ARRAY


def test_qwen2_biases_match_an_independent_float64_forward(qwen2_path, fixtures_dir):
    toks = parity.tokens(fixtures_dir / "qwen3")[:40]
    model = Model.load(qwen2_path, RunConfig(n_ctx=128, type_k="f32", type_v="f32"))
    assert model.hparams.qkv_bias and not model.hparams.qk_norm and "attn_q.bias" in model.layers[0]
    batch, incr = parity.batch_and_incremental(model, toks)
    reference = reference_qwen2.forward(qwen2_path, toks)
    assert parity.rel(batch, reference) < 1e-5
    assert parity.row_rel(incr, reference[-parity.INCR_STEPS:]).max() < 1e-5
    # the biases matter: without them the logits are far from the reference
    for layer in model.layers:
        for name in ("attn_q.bias", "attn_k.bias", "attn_v.bias"):
            layer.tensors[name] = layer.tensors[name] * 0
    assert parity.rel(model.eval_logits(toks), reference) > 1e-2
