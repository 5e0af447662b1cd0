import pytest

from engine import arch
from engine.arch.base import AttentionKind, HyperParamError, RopeType
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory, Role, role_of
from engine.synth.presets import PRESETS, preset

FIXTURE_FILES = ["llama-dense/F32", "llama-moe/F32", "qwen3/F32", "qwen3moe/F16", "gemma3/F16", "llama4/F16",
                 "deepseek2/F16"]


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_fixture_tensors_match_the_family_tables(fixtures_dir, name):
    mf = ModelFile(fixtures_dir / f"{name}.gguf")
    family = arch.family(mf.architecture)
    hp = family.hyperparams(mf.metadata)
    specs = {s.name: s for s in family.tensor_specs(hp, tied_output="output.weight" not in mf.tensors)}
    assert set(mf.tensors) <= set(specs)
    assert all(mf.tensors[n].shape == specs[n].shape for n in mf.tensors)
    assert all(n in mf.tensors for n, s in specs.items() if not s.optional)


def test_hyperparams_from_fixtures(fixtures_dir):
    qwen3 = arch.family("qwen3").hyperparams(ModelFile(fixtures_dir / "qwen3/F32.gguf").metadata)
    assert (qwen3.n_embd, qwen3.n_head, qwen3.n_head_kv[0], qwen3.n_embd_head_k) == (256, 4, 2, 128)
    assert qwen3.rope_type is RopeType.NEOX and qwen3.qk_norm
    gemma = arch.family("gemma3").hyperparams(ModelFile(fixtures_dir / "gemma3/F16.gguf").metadata)
    assert gemma.sliding_window == 32 and gemma.rope_freq_base_swa == 10000.0
    assert [gemma.attention_kind(il) for il in range(6)] == [AttentionKind.SLIDING] * 5 + [AttentionKind.FULL]
    ds = arch.family("deepseek2").hyperparams(ModelFile(fixtures_dir / "deepseek2/F16.gguf").metadata)
    assert ds.is_mla and ds.kv_lora_rank == 256 and ds.n_embd_head_k_mla == 128
    assert ds.expert_gating_func == 2 and ds.n_expert_shared == 1


def test_mla_needs_both_keys():
    md = preset("deepseek-v3")
    del md["deepseek2.attention.value_length_mla"]
    assert not arch.family("deepseek2").hyperparams(md).is_mla


def test_llama4_layer_pattern():
    hp = arch.family("llama4").hyperparams(preset("llama-4-maverick"))
    assert [hp.attention_kind(il) is AttentionKind.CHUNKED for il in range(4)] == [True, True, True, False]
    assert [hp.uses_rope(il) for il in range(4)] == [True, True, True, False]
    assert [hp.is_moe_layer(il) for il in range(4)] == [False, True, False, True]
    assert not hp.use_kq_norm          # llama.cpp turns the q/k norm off for the 128-expert model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses(name):
    md = preset(name)
    family = arch.family(md["general.architecture"])
    specs = family.tensor_specs(family.hyperparams(md))
    assert len({s.name for s in specs}) == len(specs)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(arch.UnsupportedArchitectureError, match="'mamba' is not supported; supported: deepseek2"):
        arch.family("mamba")


def test_missing_key_is_named():
    md = preset("llama-3-8b")
    del md["llama.block_count"]
    with pytest.raises(HyperParamError, match="'llama.block_count' is missing"):
        arch.family("llama").hyperparams(md)


@pytest.mark.parametrize("name, role", [
    ("token_embd.weight", Role.EMBEDDING), ("output.weight", Role.OUTPUT), ("output_norm.weight", Role.OUTPUT_NORM),
    ("blk.3.attn_q.weight", Role.ATTENTION), ("blk.3.attn_kv_a_mqa.weight", Role.ATTENTION),
    ("blk.3.attn_norm.weight", Role.NORM), ("blk.3.attn_q_a_norm.weight", Role.NORM),
    ("blk.3.ffn_gate_inp.weight", Role.ROUTER), ("blk.3.exp_probs_b.bias", Role.ROUTER),
    ("blk.3.ffn_up.weight", Role.DENSE_FFN), ("blk.3.ffn_down_shexp.weight", Role.SHARED_EXPERT),
    ("blk.3.ffn_down_exps.weight", Role.ROUTED_EXPERTS), ("rope_freqs.weight", Role.OTHER),
])
def test_roles(name, role):
    assert role_of(name) is role


def test_unknown_architecture_still_gets_an_inventory(tmp_path):
    import numpy as np
    from gguf import GGUFWriter
    path = tmp_path / "mamba.gguf"
    writer = GGUFWriter(str(path), "mamba")
    for il in range(3):
        writer.add_tensor(f"blk.{il}.ssm_in.weight", np.zeros((8, 32), np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    inventory = Inventory.from_model_file(ModelFile(path))
    assert inventory.n_layer == 3 and inventory.total_bytes == 3 * 8 * 32 * 4 + 16 * 32 * 4
    assert not inventory.runnable and "cannot run" in inventory.notes[0]
