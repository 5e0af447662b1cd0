"""Metadata overrides (llama.cpp's --override-kv): parsing, checks, and their effect on a model."""
from __future__ import annotations

import numpy as np
import pytest

from engine import arch
from engine.gguf.model_file import ModelFile
from engine.run.model import Model
from engine.arch.overrides import (MetadataOverride, OverrideError, apply_overrides, known_key_kind, parse_override_kv,
                                   parse_override_kv_list)
from engine.synth.presets import preset
from engine.run_config import RunConfig
from engine.synth.writer import vocab_metadata
from reference_llama4 import Llama4Reference


@pytest.fixture
def llama4_md():
    """tiny-llama-4: 4 layers, 8 experts top-1, MoE every 2nd layer, with a 512-token vocabulary."""
    return {**preset("tiny-llama-4"), **vocab_metadata(512)}


def hparams(md):
    return arch.family(md["general.architecture"]).hyperparams(md)


def refused(md, *overrides) -> str:
    with pytest.raises(OverrideError) as info:
        apply_overrides(md, overrides)
    return str(info.value)


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("llama4.expert_used_count=int:2", MetadataOverride("llama4.expert_used_count", "int", 2)),
    ("llama4.context_length=int:-5", MetadataOverride("llama4.context_length", "int", -5)),
    ("llama4.rope.freq_base=float:1e6", MetadataOverride("llama4.rope.freq_base", "float", 1e6)),
    ("tokenizer.ggml.add_bos_token=bool:false", MetadataOverride("tokenizer.ggml.add_bos_token", "bool", False)),
    ("general.name=str:a=b:c", MetadataOverride("general.name", "str", "a=b:c")),     # split at the first '='
    ("general.name=str:", MetadataOverride("general.name", "str", "")),
])
def test_parse(text, expected):
    assert parse_override_kv(text) == expected


def test_str_gives_llama_cpp_syntax_back():
    for text in ("llama4.expert_used_count=int:2", "tokenizer.ggml.add_bos_token=bool:true", "general.name=str:x"):
        assert str(parse_override_kv(text)) == text


def test_comma_separated_list_with_quoted_commas():
    parsed = parse_override_kv_list(
        'llama4.expert_used_count=int:2,"general.name=str:a,b",tokenizer.ggml.add_bos_token=bool:false')
    assert [(o.key, o.value) for o in parsed] == [("llama4.expert_used_count", 2), ("general.name", "a,b"),
                                                  ("tokenizer.ggml.add_bos_token", False)]


@pytest.mark.parametrize("text, message", [
    ("llama4.expert_used_count", "expected KEY=TYPE:VALUE"),
    ("=int:2", "expected KEY=TYPE:VALUE"),
    ("llama4.expert_used_count=2", "must start with int:, float:, bool: or str:"),
    ("llama4.expert_used_count=long:2", "must start with int:, float:, bool: or str:"),
    ("llama4.expert_used_count=int:2x", "'2x' is not an integer"),
    ("llama4.expert_used_count=int:", "'' is not an integer"),
    ("llama4.expert_used_count=int:99999999999999999999", "does not fit a 64-bit integer"),
    ("llama4.rope.freq_base=float:fast", "'fast' is not a number"),
    ("llama4.rope.freq_base=float:inf", "finite number"),
    ("tokenizer.ggml.add_bos_token=bool:True", "true or false, not 'True'"),
    ("tokenizer.ggml.add_bos_token=bool:1", "true or false, not '1'"),
    ("general.name=str:" + "x" * 128, "cannot exceed 127 bytes (this one has 128)"),
    ("k" * 128 + "=int:1", "is 128 bytes; llama.cpp allows at most 127"),
])
def test_malformed_overrides_are_refused_with_the_expected_form(text, message):
    with pytest.raises(OverrideError) as info:
        parse_override_kv(text)
    assert message in str(info.value)


def test_str_limit_counts_utf8_bytes_like_strlen():
    assert parse_override_kv("general.name=str:" + "é" * 63).value == "é" * 63      # 126 bytes
    with pytest.raises(OverrideError, match="128"):
        parse_override_kv("general.name=str:" + "é" * 64)


# --- applying: effects -------------------------------------------------------------------------


def test_expert_used_count_override_changes_the_hyperparameters(llama4_md):
    assert hparams(llama4_md).n_expert_used == 1
    changed = apply_overrides(llama4_md, [parse_override_kv("llama4.expert_used_count=int:2")])
    assert hparams(changed).n_expert_used == 2
    assert llama4_md["llama4.expert_used_count"] == 1, "the input metadata must not change"
    assert changed is not llama4_md


def test_several_overrides_and_strings_are_accepted(llama4_md):
    changed = apply_overrides(llama4_md, ["llama4.rope.freq_base=float:10000", "llama4.context_length=int:8192",
                                          "tokenizer.ggml.add_bos_token=bool:false", "general.name=str:renamed"])
    hp = hparams(changed)
    assert (hp.rope_freq_base, hp.n_ctx_train) == (10000.0, 8192)
    assert changed["tokenizer.ggml.add_bos_token"] is False and changed["general.name"] == "renamed"


def test_sliding_window_zero_turns_llama4_chunking_off(llama4_md):
    hp = hparams(apply_overrides(llama4_md, ["llama4.attention.sliding_window=int:0"]))
    assert hp.attention_chunk == 0 and not any(hp.chunked_layers)
    assert [hp.uses_rope(il) for il in range(4)] == [True, True, True, False]


def test_absent_but_known_key_is_accepted_like_llama_cpp(llama4_md):
    assert "llama4.rope.freq_base_swa" not in llama4_md
    hp = hparams(apply_overrides(llama4_md, ["llama4.rope.freq_base_swa=float:10000"]))
    assert hp.rope_freq_base_swa == 10000.0
    assert known_key_kind("llama4", "llama4.rope.freq_base_swa") == "float"
    assert known_key_kind("llama4", "general.base_model.0.name") == "str"
    assert known_key_kind("llama4", "llama4.no_such_key") is None


def test_no_overrides_returns_an_equal_copy(llama4_md):
    same = apply_overrides(llama4_md, [])
    assert same == llama4_md and same is not llama4_md


# --- applying: errors --------------------------------------------------------------------------


def test_unknown_key_lists_close_matches(llama4_md):
    message = refused(llama4_md, "llama4.expert_use_count=int:2")
    assert "unknown metadata key 'llama4.expert_use_count'" in message
    assert "did you mean llama4.expert_used_count" in message


def test_key_of_another_architecture_is_unknown(llama4_md):
    message = refused(llama4_md, "llama.expert_used_count=int:2")
    assert "not a known llama4 key" in message and "llama4.expert_used_count" in message


def test_unknown_key_without_close_matches(llama4_md):
    message = refused(llama4_md, "foo.bar=int:1")
    assert message.endswith("not in this file and not a known llama4 key")


@pytest.mark.parametrize("override, message", [
    ("llama4.expert_used_count=str:2", "is an integer key but the override gives str:2, which llama.cpp would "
                                       "ignore; write llama4.expert_used_count=int:VALUE"),
    ("llama4.expert_used_count=float:2", "write llama4.expert_used_count=int:2"),
    ("llama4.rope.freq_base=int:10000", "is a float key but the override gives int:10000"),
    ("llama4.rope.freq_base=int:10000", "write llama4.rope.freq_base=float:10000.0"),
    ("tokenizer.ggml.add_bos_token=int:0", "is a bool key"),
    ("general.name=int:3", "is a string key"),
    ("llama4.rope.freq_base_swa=int:1", "is a float key"),          # absent key: the known type applies
    ("tokenizer.ggml.tokens=str:x", "holds an array"),
])
def test_wrong_type_is_refused(llama4_md, override, message):
    assert message in refused(llama4_md, override)


@pytest.mark.parametrize("override, message", [
    ("llama4.expert_used_count=int:9",
     "llama4.expert_used_count=9 is out of range: the model has 8 experts, so it must be 1..8"),
    ("llama4.expert_used_count=int:0", "must be 1..8"),
    ("llama4.block_count=int:3", "llama4.block_count cannot change (4 -> 3)"),
    ("llama4.context_length=int:-5", "llama4.context_length=-5 is negative, but the key is unsigned (llama.cpp would "
                                     "wrap it to 4294967291)"),
    ("llama4.context_length=int:0", "llama4.context_length must be at least 1, got 0"),
    ("llama4.context_length=int:4294967296", "out of range: the key holds 0..4294967295"),
    ("llama4.rope.freq_base=float:0", "llama4.rope.freq_base must be positive"),
    ("llama4.attention.layer_norm_rms_epsilon=float:-1e-5", "must be positive"),
    ("llama4.rope.scaling.type=str:yarnn", "not a rope scaling type llama.cpp knows: none, linear, yarn, longrope"),
    ("tokenizer.ggml.bos_token_id=int:512", "not a token of the vocabulary (ids 0..511)"),
    ("general.architecture=str:llama", "general.architecture cannot be overridden"),
])
def test_out_of_range_values_are_refused(llama4_md, override, message):
    assert message in refused(llama4_md, override)


@pytest.mark.parametrize("override, tensor", [
    ("llama4.embedding_length=int:128", "token_embd.weight would need shape (512, 128), the file's is (512, 256)"),
    ("llama4.attention.head_count_kv=int:4", "blk.0.attn_k.weight would need shape (256, 256)"),
    ("llama4.expert_count=int:16", "blk.1.ffn_gate_inp.weight would need shape (16, 256), the file's is (8, 256)"),
    ("llama4.interleave_moe_layer_step=int:1",
     "the model would no longer use blk.0.ffn_gate.weight, which the file holds"),
])
def test_overrides_that_change_tensor_shapes_are_refused(llama4_md, override, tensor):
    message = refused(llama4_md, override)
    assert "changes the tensors the model needs" in message and tensor in message


def test_same_key_twice_is_refused(llama4_md):
    assert "overridden more than once" in refused(llama4_md, "llama4.expert_used_count=int:2",
                                                  "llama4.expert_used_count=int:3")


def test_a_model_without_experts_takes_no_expert_count(llama4_md):
    dense = {k: v for k, v in preset("llama-3-8b").items()}
    assert "needs experts, and this model has none" in refused(dense, "llama.expert_used_count=int:2")


# --- the override reaches the forward pass -------------------------------------------------------


def test_top2_override_runs_and_matches_a_top2_reference(fixtures_dir):
    path = fixtures_dir / "llama4" / "F16.gguf"
    tokens = np.load(fixtures_dir / "llama4" / "tokens.npy")
    model_file = ModelFile(path)
    model_file.metadata = apply_overrides(model_file.metadata, ["llama4.expert_used_count=int:2"])
    model = Model(model_file, RunConfig(n_ctx=256, type_k="f32", type_v="f32"))
    assert model.hparams.n_expert_used == 2
    engine = model.eval_logits(tokens).astype(np.float64)

    ref = Llama4Reference(path)
    top1 = ref.forward(tokens)
    ref.config.n_expert_used = 2
    top2 = ref.forward(tokens)
    rel = np.linalg.norm(engine - top2, axis=1) / np.linalg.norm(top2, axis=1)
    assert rel.max() < 1e-3
    assert np.linalg.norm(top2 - top1) / np.linalg.norm(top1) > 0.05, "top-2 should move the logits"
    assert model.expert_counts[1].sum() == 2 * len(tokens)
