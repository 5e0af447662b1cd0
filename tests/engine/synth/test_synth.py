"""Synthetic models: layout and sizes against the architecture tables, llama.cpp's quantization
mixes (checked against the types real llama-quantize gave the reference fixtures), random blocks
that dequantize to sensible weights, sparse files of full-size shapes, and the command line."""
import json
import os
import time

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as T, Keys
from gguf.quants import dequantize

from engine import arch
from engine.gguf.ggml_types import row_bytes
from engine.gguf.model_file import ModelFile
from engine.synth.presets import PRESETS, preset
from engine.synth.quant_recipe import fallback_type, parse_ftype, tensor_type_for, tensor_types, use_more_bits
from engine.synth.writer import (BLOCK_LAYOUTS, add_synth_arguments, plan_tensors, random_blocks, synth_main,
                                 vocab_metadata, weight_std, write_synthetic)

TINY_PRESETS = sorted(name for name in PRESETS if name.startswith("tiny-"))


def _hp(name_or_md):
    md = preset(name_or_md) if isinstance(name_or_md, str) else name_or_md
    return arch.family(md["general.architecture"]).hyperparams(md)


# --- written files --------------------------------------------------------------------------

@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0", "F16", "IQ4_XS", "Q2_K"])
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_writes_the_family_layout(tmp_path, name, quant):
    path = write_synthetic(tmp_path / f"{name}.gguf", name, quant=quant)
    hp = _hp(name)
    specs = arch.family(hp.arch).tensor_specs(hp)
    expected_types = tensor_types(((s.name, s.shape) for s in specs), quant, hp)
    with ModelFile(path) as mf:
        names = set(mf.tensors)
        assert {s.name for s in specs if not s.optional} <= names <= {s.name for s in specs}
        for s in specs:
            if s.name not in names:
                continue
            t = mf.tensors[s.name]
            assert t.shape == tuple(s.shape)
            assert t.ggml_type == expected_types[s.name]
            assert t.n_bytes == row_bytes(t.ggml_type, t.shape[-1]) * int(np.prod(t.shape[:-1]))
        assert mf.metadata[Keys.General.FILE_TYPE] == parse_ftype(quant)
        assert mf.metadata[Keys.General.QUANTIZATION_VERSION] == 2
        assert len(mf.metadata[Keys.Tokenizer.LIST]) == hp.n_vocab
        data_end = max(t.offset + t.n_bytes for t in mf.tensors.values())
        assert data_end <= mf.file_bytes < data_end + 32


def test_optional_tensors_real_files_carry_are_written(tmp_path):
    ds = write_synthetic(tmp_path / "ds.gguf", "tiny-deepseek-v3", quant="Q8_0")
    l4 = write_synthetic(tmp_path / "l4.gguf", "tiny-llama-4", quant="Q8_0")
    with ModelFile(ds) as mf:
        assert "blk.1.exp_probs_b.bias" in mf.tensors and "blk.0.exp_probs_b.bias" not in mf.tensors
        assert "output.weight" in mf.tensors
    with ModelFile(l4) as mf:
        rope = mf.tensors["rope_freqs.weight"]
        factors = np.frombuffer(mf.tensor_data(rope.name).tobytes(), dtype=np.float32)
        assert factors[0] == 1.0 and factors[-1] == 8.0       # llama3 scaling: high freqs kept, low divided


def test_gguf_package_reader_reads_a_synthetic_file(tmp_path):
    path = write_synthetic(tmp_path / "m.gguf", "tiny-qwen3-moe", quant="Q4_K_M")
    reader = GGUFReader(path)
    with ModelFile(path) as mf:
        assert {t.name: int(t.tensor_type) for t in reader.tensors} == \
               {n: t.ggml_type for n, t in mf.tensors.items()}
        assert {t.name: int(t.n_bytes) for t in reader.tensors} == {n: t.n_bytes for n, t in mf.tensors.items()}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_synthetic(tmp_path / "a.gguf", "tiny-mixtral", quant="Q4_K_M", seed=3)
    b = write_synthetic(tmp_path / "b.gguf", "tiny-mixtral", quant="Q4_K_M", seed=3)
    c = write_synthetic(tmp_path / "c.gguf", "tiny-mixtral", quant="Q4_K_M", seed=4)
    assert a.read_bytes() == b.read_bytes()
    with ModelFile(a) as ma, ModelFile(c) as mc:
        name = "blk.0.ffn_up_exps.weight"
        assert not np.array_equal(ma.tensor_data(name), mc.tensor_data(name))


def test_progress_reaches_the_total(tmp_path):
    calls = []
    write_synthetic(tmp_path / "m.gguf", "tiny-gemma-3", quant="Q8_0", progress=lambda d, t: calls.append((d, t)))
    _, tensors = plan_tensors(preset("tiny-gemma-3"), "Q8_0")
    assert calls[-1] == (sum(t.n_bytes for t in tensors),) * 2
    assert all(d1 <= d2 for (d1, _), (d2, _) in zip(calls, calls[1:]))


def test_without_vocab_no_tokenizer_keys(tmp_path):
    path = write_synthetic(tmp_path / "m.gguf", "tiny-mixtral", quant="Q8_0", vocab=False)
    with ModelFile(path) as mf:
        assert not any(k.startswith("tokenizer.") for k in mf.metadata)
        assert mf.metadata["llama.vocab_size"] == 512


def test_dense_write_refuses_types_without_random_blocks_but_sparse_writes(tmp_path):
    with pytest.raises(ValueError, match="IQ1_M"):
        write_synthetic(tmp_path / "m.gguf", "tiny-mixtral", quant="IQ1_M")
    path = write_synthetic(tmp_path / "s.gguf", "tiny-mixtral", quant="IQ1_M", sparse=True)
    with ModelFile(path) as mf:
        assert mf.tensors["blk.0.ffn_up_exps.weight"].type_name == "IQ1_M"


# --- weights --------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", sorted(BLOCK_LAYOUTS, key=lambda t: t.name), ids=lambda t: t.name)
def test_random_blocks_dequantize_to_the_target_std(qtype):
    std = 0.0125
    blocks = random_blocks(qtype, 512, std, np.random.default_rng(7))
    values = dequantize(blocks, qtype)
    assert np.isfinite(values).all()
    assert 0.8 * std < values.std() < 1.25 * std
    assert abs(values.mean()) < 0.1 * std          # no offset: dot products stay centred


def test_written_weights_dequantize_to_their_intended_scale(tmp_path):
    path = write_synthetic(tmp_path / "m.gguf", "tiny-llama-4", quant="Q4_K_M")
    hp = _hp("tiny-llama-4")
    with ModelFile(path) as mf:
        for name in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.attn_v.weight",
                     "blk.1.ffn_down_exps.weight", "blk.1.ffn_gate_inp.weight", "blk.0.ffn_down.weight"):
            t = mf.tensors[name]
            values = dequantize(np.array(mf.tensor_data(name)).reshape(-1), T(t.ggml_type))
            assert np.isfinite(values).all()
            target = weight_std(name, t.shape, hp)
            assert target / 2 < values.std() < target * 2, name
        norm = dequantize(np.array(mf.tensor_data("blk.2.attn_norm.weight")).reshape(-1), T.F32)
        assert 0.9 <= norm.min() and norm.max() <= 1.1
    assert weight_std("blk.0.ffn_gate_inp.weight", (8, 256), hp) == pytest.approx(3 / 16)
    assert weight_std("blk.0.attn_k.weight", (128, 256), hp) == pytest.approx(1.6 / 16)


def test_gemma3_post_norms_are_stored_with_the_one_added(tmp_path):
    path = write_synthetic(tmp_path / "g.gguf", "tiny-gemma-3", quant="F16")
    with ModelFile(path) as mf:
        post = np.frombuffer(mf.tensor_data("blk.0.post_ffw_norm.weight").tobytes(), dtype=np.float32)
        pre = np.frombuffer(mf.tensor_data("blk.0.attn_norm.weight").tobytes(), dtype=np.float32)
    assert 1.8 <= post.min() and post.max() <= 2.2
    assert 0.9 <= pre.min() and pre.max() <= 1.1


# --- vocabulary -----------------------------------------------------------------------------

def test_vocab_is_sentencepiece_style_with_byte_fallback():
    md = vocab_metadata(512)
    tokens, types = md[Keys.Tokenizer.LIST], md[Keys.Tokenizer.TOKEN_TYPE]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>" and set(types[3:259]) == {6}
    assert tokens[259] == "\u2581" and tokens[260] == "\u2581the"
    assert len(set(tokens)) == 512 and set(types[259:]) == {1}
    assert md[Keys.Tokenizer.BOS_ID] == 1 and md[Keys.Tokenizer.ADD_BOS] is True


def test_large_vocab_is_generated_quickly_and_unique():
    start = time.perf_counter()
    tokens = vocab_metadata(262144)[Keys.Tokenizer.LIST]
    assert time.perf_counter() - start < 2.0
    assert len(tokens) == len(set(tokens)) == 262144


# --- quantization mixes ---------------------------------------------------------------------

def test_mixes_match_the_types_llama_quantize_gave_the_fixtures(fixtures_dir):
    checked = 0
    for meta_path in sorted(fixtures_dir.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        hp = _hp(meta["gguf_metadata"])
        shapes = [(name, tuple(reversed(ne))) for name, ne in meta["tensors"].items()]    # ggml ne -> numpy
        for variant, info in meta["variants"].items():
            got = {name: t.name for name, t in tensor_types(shapes, variant, hp).items()}
            assert got == info["tensor_types"], f"{meta_path.parent.name} {variant}"
            checked += 1
    assert checked >= 15


def test_use_more_bits_layers_of_a_32_layer_model():
    assert [il for il in range(32) if use_more_bits(il, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize("preset_name, quant, name, expected", [
    # Llama-3-8B Q4_K_M: Q4_K base, output Q6_K, attn_v / ffn_down Q6_K on use_more_bits layers
    ("llama-3-8b", "Q4_K_M", "output.weight", "Q6_K"),
    ("llama-3-8b", "Q4_K_M", "token_embd.weight", "Q4_K"),
    ("llama-3-8b", "Q4_K_M", "blk.0.attn_v.weight", "Q6_K"),
    ("llama-3-8b", "Q4_K_M", "blk.4.attn_v.weight", "Q4_K"),
    ("llama-3-8b", "Q4_K_M", "blk.6.attn_v.weight", "Q6_K"),
    ("llama-3-8b", "Q4_K_M", "blk.10.ffn_down.weight", "Q4_K"),
    ("llama-3-8b", "Q4_K_M", "blk.31.ffn_down.weight", "Q6_K"),
    ("llama-3-8b", "Q4_K_M", "blk.10.attn_q.weight", "Q4_K"),
    ("llama-3-8b", "Q4_K_M", "blk.10.ffn_norm.weight", "F32"),
    # Q4_K_S: the first 4 attn_v and the first eighth of ffn_down get Q5_K
    ("llama-3-8b", "Q4_K_S", "blk.3.attn_v.weight", "Q5_K"),
    ("llama-3-8b", "Q4_K_S", "blk.4.attn_v.weight", "Q4_K"),
    ("llama-3-8b", "Q4_K_S", "blk.3.ffn_down.weight", "Q5_K"),
    # Q3_K_M: attn_v Q5_K for the first two, Q4_K after; ffn_down Q5_K for the first 16th; attn_output Q4_K
    ("llama-3-8b", "Q3_K_M", "blk.1.attn_v.weight", "Q5_K"),
    ("llama-3-8b", "Q3_K_M", "blk.2.attn_v.weight", "Q4_K"),
    ("llama-3-8b", "Q3_K_M", "blk.1.ffn_down.weight", "Q5_K"),
    ("llama-3-8b", "Q3_K_M", "blk.2.ffn_down.weight", "Q4_K"),
    ("llama-3-8b", "Q3_K_M", "blk.2.attn_output.weight", "Q4_K"),
    ("llama-3-8b", "Q3_K_M", "blk.2.ffn_up.weight", "Q3_K"),
    # Q2_K with GQA 4: attn_v Q4_K, ffn_down Q3_K, attn_output Q3_K, the rest Q2_K
    ("llama-3-8b", "Q2_K", "blk.9.attn_v.weight", "Q4_K"),
    ("llama-3-8b", "Q2_K", "blk.9.ffn_down.weight", "Q3_K"),
    ("llama-3-8b", "Q2_K", "blk.9.attn_output.weight", "Q3_K"),
    ("llama-3-8b", "Q2_K", "blk.9.ffn_gate.weight", "Q2_K"),
    # IQ4_XS with GQA 4: attn_v Q5_K, early ffn_down Q5_K
    ("llama-3-8b", "IQ4_XS", "blk.9.attn_v.weight", "Q5_K"),
    ("llama-3-8b", "IQ4_XS", "blk.3.ffn_down.weight", "Q5_K"),
    ("llama-3-8b", "IQ4_XS", "blk.9.ffn_down.weight", "IQ4_XS"),
    ("llama-3-8b", "IQ4_XS", "output.weight", "Q6_K"),
    ("llama-3-8b", "Q6_K", "blk.9.ffn_down.weight", "Q6_K"),
    ("llama-3-8b", "Q8_0", "output.weight", "Q8_0"),
    ("llama-3-8b", "Q4_0", "output.weight", "Q6_K"),
    ("llama-3-8b", "BF16", "blk.0.attn_q.weight", "BF16"),
    ("llama-3-8b", "BF16", "blk.0.attn_norm.weight", "F32"),
    # Mixtral (8 experts): attn_v and attn_k Q8_0, attn_output Q5_K; router F32
    ("mixtral-8x7b", "Q4_K_M", "blk.5.attn_v.weight", "Q8_0"),
    ("mixtral-8x7b", "Q4_K_M", "blk.5.attn_k.weight", "Q8_0"),
    ("mixtral-8x7b", "Q4_K_M", "blk.5.attn_output.weight", "Q5_K"),
    ("mixtral-8x7b", "Q4_K_M", "blk.5.ffn_gate_inp.weight", "F32"),
    ("mixtral-8x7b", "Q4_K_M", "blk.6.ffn_down_exps.weight", "Q6_K"),
    # Gemma-3-1B: tied embedding takes the output rule, n_embd 1152 rows fall back (Q4_K -> Q5_0, Q6_K -> Q8_0)
    ("gemma-3-1b", "Q4_K_M", "token_embd.weight", "Q8_0"),
    ("gemma-3-1b", "Q4_K_M", "blk.0.attn_q.weight", "Q5_0"),
    ("gemma-3-1b", "Q4_K_M", "blk.0.attn_v.weight", "Q8_0"),
    ("gemma-3-1b", "Q4_K_M", "blk.0.ffn_down.weight", "Q6_K"),
    ("gemma-3-1b", "Q4_K_M", "blk.3.ffn_down.weight", "Q4_K"),
    ("gemma-3-1b", "Q4_K_M", "blk.3.attn_output.weight", "Q4_K"),
    # DeepSeek-V3 (61 layers, 256 experts): k_b rows of 128 fall back to Q5_0; experts by layer
    ("deepseek-v3", "Q4_K_M", "blk.0.attn_k_b.weight", "Q5_0"),
    ("deepseek-v3", "Q4_K_M", "blk.0.attn_v_b.weight", "Q4_K"),
    ("deepseek-v3", "Q4_K_M", "blk.0.attn_output.weight", "Q4_K"),
    ("deepseek-v3", "Q4_K_M", "blk.3.ffn_down_exps.weight", "Q6_K"),
    ("deepseek-v3", "Q4_K_M", "blk.7.ffn_down_exps.weight", "Q4_K"),
    ("deepseek-v3", "Q4_K_M", "blk.9.ffn_down_exps.weight", "Q6_K"),
    ("deepseek-v3", "Q4_K_M", "blk.60.ffn_down_shexp.weight", "Q6_K"),
    ("deepseek-v3", "Q4_K_M", "blk.9.ffn_up_exps.weight", "Q4_K"),
    ("deepseek-v3", "Q4_K_M", "blk.9.exp_probs_b.bias", "F32"),
    ("deepseek-v3", "Q4_K_M", "token_embd.weight", "Q4_K"),
    ("deepseek-v3", "Q4_K_M", "output.weight", "Q6_K"),
])
def test_named_tensor_types(preset_name, quant, name, expected):
    hp, tensors = plan_tensors(preset(preset_name), quant)
    shape = next(t.shape for t in tensors if t.name == name)
    assert tensor_type_for(name, shape, quant, hp).name == expected
    assert next(t.ggml_type for t in tensors if t.name == name).name == expected


def test_70b_llama_gives_attn_v_more_bits():
    md = preset("llama-3-8b") | {"llama.block_count": 80, "llama.embedding_length": 8192,
                                 "llama.attention.head_count": 64}
    hp = _hp(md)
    assert tensor_type_for("blk.10.attn_v.weight", (1024, 8192), "Q4_K_M", hp) == T.Q5_K   # Q4_K bumped
    assert tensor_type_for("blk.10.attn_v.weight", (1024, 8192), "Q3_K_M", hp) == T.Q5_K


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_single_tensor_answers_agree_with_the_whole_model(name):
    hp, tensors = plan_tensors(preset(name), "Q3_K_M")
    assert all(tensor_type_for(t.name, t.shape, "Q3_K_M", hp) == t.ggml_type for t in tensors)


def test_fallbacks_follow_llama_cpp():
    assert fallback_type(T.Q4_K, 1152) == T.Q5_0
    assert fallback_type(T.Q5_K, 1152) == T.Q5_1
    assert fallback_type(T.Q6_K, 1152) == T.Q8_0
    assert fallback_type(T.Q2_K, 1152) == T.Q4_0
    assert fallback_type(T.IQ4_XS, 1152) == T.IQ4_NL
    assert fallback_type(T.Q4_K, 100) == T.F16
    assert fallback_type(T.Q4_K, 4096) == T.Q4_K


# --- full-size shapes -----------------------------------------------------------------------

def test_sparse_deepseek_v3_is_quick_tiny_on_disk_and_exact(tmp_path):
    start = time.perf_counter()
    path = write_synthetic(tmp_path / "ds.gguf", "deepseek-v3", quant="Q4_K_M", sparse=True)
    elapsed_s = time.perf_counter() - start
    st = os.stat(path)
    assert elapsed_s < 10
    assert st.st_blocks * 512 < 32 << 20 and st.st_size > 350e9
    _, tensors = plan_tensors(preset("deepseek-v3"), "Q4_K_M")
    with ModelFile(path) as mf:
        assert len(mf.tensors) == len(tensors)
        assert 380e9 < mf.tensor_bytes < 410e9
        assert mf.tensor_bytes == sum(t.n_bytes for t in tensors)
        experts = mf.tensors["blk.30.ffn_up_exps.weight"]
        assert experts.shape == (256, 2048, 7168) and experts.expert_bytes == 2048 * 7168 // 256 * 144
        assert len(mf.metadata[Keys.Tokenizer.LIST]) == 129280


# --- command line ---------------------------------------------------------------------------

def test_command_line_writes_and_checks_the_architecture(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert synth_main(["--arch", "llama", "--preset", "tiny-mixtral", "--quant", "q8_0", "-o", str(out), "--seed", "2"]) == 0
    with ModelFile(out) as mf:
        assert mf.tensors["blk.0.attn_q.weight"].type_name == "Q8_0"
    assert "tiny-mixtral" in capsys.readouterr().out
    with pytest.raises(ValueError, match="deepseek2"):
        synth_main(["--arch", "llama", "--preset", "tiny-deepseek-v3", "-o", str(tmp_path / "x.gguf")])


def test_help_lists_presets_with_their_architectures():
    import argparse
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    text = " ".join(parser.format_help().split())      # argparse wraps the list anywhere
    assert "deepseek-v3 (deepseek2)" in text and "tiny-gemma-3 (gemma3)" in text and "IQ4_XS" in text
