"""deepseek2 files from before the MLA split: one unsplit attn_kv_b per layer, no
attention.key_length_mla / value_length_mla keys, head_count_kv = n_head and key/value_length
holding the decompressed per-head sizes. llama.cpp runs them as plain multi-head attention over
decompressed K and V (the non-MLA branch of llm_build_deepseek2) and computes the same function
as for the split file.

The legacy twin of the deepseek2 fixture is rebuilt here exactly: per head, attn_kv_b's rows are
[k_nope rows ; v rows] over the latent, and the converter made attn_k_b by transposing the k_nope
block, so

    attn_kv_b (numpy)  (n_head * (nope + v_dim), kv_lora)   = per head [k_b[h].T ; v_b[h]]
    attn_k_b  (numpy)  (n_head, kv_lora, nope)               ggml {nope, kv_lora, n_head}
    attn_v_b  (numpy)  (n_head, v_dim, kv_lora)              ggml {kv_lora, v_dim, n_head}
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import Keys

import forward_parity as parity
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.memory import kv_cache_bytes
from engine.run.model import Model
from engine.run_config import RunConfig

ARCH = "deepseek2"
F32_RUN = RunConfig(n_ctx=512, type_k="f32", type_v="f32", activations="f32")
F16_KV_RUN = RunConfig(n_ctx=512, type_k="f16", type_v="f16", activations="f32")


def arch_key(key: str) -> str:
    return key.format(arch=ARCH)


def legacy_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """(n_head, kv_lora, nope) and (n_head, v_dim, kv_lora) -> (n_head * (nope + v_dim), kv_lora)."""
    n_head, kv_lora, _ = k_b.shape
    per_head = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)     # (n_head, nope + v_dim, kv_lora)
    return np.ascontiguousarray(per_head.reshape(-1, kv_lora))


def legacy_metadata(reader: gguf.GGUFReader) -> dict[str, tuple]:
    """key -> (value, type, sub_type) of the legacy file: the MLA keys gone, the MHA sizes in place."""
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == Keys.General.ARCHITECTURE:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        fields[key] = (field.contents(), field.types[0], sub_type)
    k_mla = fields.pop(arch_key(Keys.Attention.KEY_LENGTH_MLA))[0]
    v_mla = fields.pop(arch_key(Keys.Attention.VALUE_LENGTH_MLA))[0]
    n_head = fields[arch_key(Keys.Attention.HEAD_COUNT)][0]
    u32 = gguf.GGUFValueType.UINT32
    fields[arch_key(Keys.Attention.HEAD_COUNT_KV)] = (n_head, u32, None)
    fields[arch_key(Keys.Attention.KEY_LENGTH)] = (k_mla, u32, None)
    fields[arch_key(Keys.Attention.VALUE_LENGTH)] = (v_mla, u32, None)
    return fields


def legacy_tensors(reader: gguf.GGUFReader) -> list[tuple[str, np.ndarray]]:
    """The fixture's tensors in file order, each layer's attn_k_b + attn_v_b as one attn_kv_b."""
    by_name = {t.name: t for t in reader.tensors}
    tensors = []
    for t in reader.tensors:
        assert t.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32), t.name
        if t.name.endswith(".attn_v_b.weight"):
            continue
        if t.name.endswith(".attn_k_b.weight"):
            v_b = by_name[t.name.replace("attn_k_b", "attn_v_b")]
            tensors.append((t.name.replace("attn_k_b", "attn_kv_b"), legacy_kv_b(t.data, v_b.data)))
        else:
            tensors.append((t.name, np.array(t.data)))    # float16 stays F16, float32 stays F32
    return tensors


def write_legacy_twin(source: Path, path: Path) -> Path:
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, ARCH)
    for key, (value, value_type, sub_type) in legacy_metadata(reader).items():
        writer.add_key_value(key, value, value_type, sub_type)
    for name, data in legacy_tensors(reader):
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def fixture_dir(fixtures_dir) -> Path:
    return fixtures_dir / ARCH


@pytest.fixture(scope="module")
def legacy_path(fixture_dir, tmp_path_factory) -> Path:
    return write_legacy_twin(fixture_dir / "F16.gguf", tmp_path_factory.mktemp("deepseek2-legacy") / "F16-legacy.gguf")


@pytest.fixture(scope="module")
def legacy_model(legacy_path) -> Model:
    return Model.load(legacy_path, F32_RUN)


@pytest.fixture(scope="module")
def legacy_logits(legacy_model, fixture_dir) -> tuple[np.ndarray, np.ndarray]:
    return parity.batch_and_incremental(legacy_model, parity.tokens(fixture_dir))


def test_twin_is_an_exact_unsplit_copy(fixture_dir, legacy_path):
    split, legacy = gguf.GGUFReader(fixture_dir / "F16.gguf"), gguf.GGUFReader(legacy_path)
    split_t = {t.name: t for t in split.tensors}
    legacy_t = {t.name: t for t in legacy.tensors}
    assert len(legacy_t) == len(split_t) - 3
    kv_b = legacy_t["blk.1.attn_kv_b.weight"]
    assert kv_b.tensor_type == gguf.GGMLQuantizationType.F16 and list(kv_b.shape) == [256, 4 * (64 + 64)]
    per_head = np.asarray(kv_b.data).reshape(4, 64 + 64, 256)
    # head 2's k_nope rows are k_b[2] transposed, its v rows v_b[2], bit for bit
    assert np.array_equal(per_head[2, :64], split_t["blk.1.attn_k_b.weight"].data[2].T)
    assert np.array_equal(per_head[2, 64:], split_t["blk.1.attn_v_b.weight"].data[2])
    assert legacy_t["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert arch_key(Keys.Attention.KEY_LENGTH_MLA) not in legacy.fields
    assert legacy.fields[Keys.Tokenizer.LIST].contents() == split.fields[Keys.Tokenizer.LIST].contents()


def test_hyperparams_fall_back_to_multi_head_attention(legacy_model):
    hp = legacy_model.hparams
    assert not hp.is_mla
    assert (hp.n_head_kv, hp.n_embd_head_k_mla, hp.n_embd_head_v_mla, hp.n_embd_head_qk_nope) == ((4,) * 3, 128, 64, 64)
    assert (hp.n_embd_k_gqa(0), hp.n_embd_v_gqa(0)) == (4 * 128, 4 * 64)


def test_legacy_matches_llama_cpp_f32_reference(legacy_logits, fixture_dir):
    """Check 1 of the fixtures README, batched and through the KV cache."""
    batch, incr = legacy_logits
    ref = np.load(fixture_dir / "F16.logits_batch_f32ref.npy")
    tail = ref[-parity.INCR_STEPS:]
    assert batch.shape == ref.shape and batch.dtype == np.float32
    found = dict(batch_rel=parity.rel(batch, ref), batch_worst=float(parity.row_rel(batch, ref).max()),
                 incr_rel=parity.rel(incr, tail), incr_worst=float(parity.row_rel(incr, tail).max()),
                 self_rel=parity.rel(incr, batch[-parity.INCR_STEPS:]))
    assert found["batch_rel"] <= 1e-3 and found["batch_worst"] <= 3e-3, found
    assert found["incr_rel"] <= 1e-3 and found["incr_worst"] <= 3e-3, found
    assert found["self_rel"] <= 1e-4, found


def test_legacy_and_mla_files_compute_the_same_function(legacy_logits, fixture_dir):
    # the absorbed and the decompressed forms differ only in float32 summation order
    mla = Model.load(fixture_dir / "F16.gguf", F32_RUN).eval_logits(parity.tokens(fixture_dir))
    batch, _ = legacy_logits
    assert parity.rel(batch, mla) <= 1e-5
    assert parity.row_rel(batch, mla).max() <= 3e-5


def test_planner_sizes_the_full_per_head_cache(legacy_path, fixture_dir):
    n_layer, n_ctx, n_head, key_length, value_length, f16_bytes = 3, 512, 4, 128, 64, 2
    with ModelFile(legacy_path) as model_file:
        planned = kv_cache_bytes(Inventory.from_model_file(model_file).hparams, F16_KV_RUN)
    assert planned == n_layer * n_ctx * n_head * (key_length + value_length) * f16_bytes
    model = Model.load(legacy_path, F16_KV_RUN)
    cache = model.new_cache()
    assert cache.nbytes == kv_cache_bytes(model.hparams, F16_KV_RUN) == planned
    assert [(k.shape, v.shape) for k, v in zip(cache.k, cache.v)] == [((512, 512), (512, 256))] * n_layer
    # the split file caches only the latent and the rope key: kv_lora + n_rot per token
    mla_hp = Model.load(fixture_dir / "F16.gguf", F16_KV_RUN).hparams
    assert kv_cache_bytes(mla_hp, F16_KV_RUN) == n_layer * n_ctx * (256 + 64) * f16_bytes
