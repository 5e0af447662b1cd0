"""Metadata that lies about the model: every number that sizes something is confirmed by the
tensors first, so a small file cannot make us allocate gigabytes; the errors are one line."""
import tracemalloc

import pytest

from app.cli import main
from engine.arch import family
from engine.arch.base import HyperParamError
from engine.arch.plausible import checked_hyperparams
from engine.gguf.model_file import ModelFile, ModelFileError
from engine.plan.inventory import Inventory
from engine.text.tokenizer import Tokenizer
from gguf_bytes import rewrite_gguf

PEAK_BYTES = 200 << 20          # generous: the fixtures are a few MB


@pytest.fixture(scope="module")
def llama_dense(fixtures_dir):
    return fixtures_dir / "llama-dense/F32.gguf"


def hyperparams_error(path) -> str:
    mf = ModelFile(path)
    with pytest.raises(HyperParamError) as info:
        checked_hyperparams(family(mf.architecture), mf.metadata, {n: t.shape for n, t in mf.tensors.items()})
    message = str(info.value)
    assert "\n" not in message and len(message) < 500
    return message


def inventory_within_memory(path) -> Inventory:
    tracemalloc.start()
    try:
        inventory = Inventory.from_model_file(ModelFile(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES
    return inventory


@pytest.mark.parametrize("block_count", [10**9, 2**32 - 1, 2**63, 0, 3])
def test_block_count_must_match_the_layer_tensors(tmp_path, llama_dense, block_count):
    path = rewrite_gguf(llama_dense, tmp_path / "m.gguf", {"llama.block_count": block_count})
    assert f"says {block_count} layers" in hyperparams_error(path) or "layers" in hyperparams_error(path)
    inventory = inventory_within_memory(path)
    assert inventory.hparams is None and inventory.n_layer == 2
    assert any("blk.1 (2 layers)" in note for note in inventory.notes)


def test_string_block_count_is_refused(tmp_path, llama_dense):
    path = rewrite_gguf(llama_dense, tmp_path / "m.gguf", {"llama.block_count": "2"})
    assert "must be an integer" in hyperparams_error(path)


def test_a_huge_layer_index_in_a_tensor_name_is_refused(tmp_path, llama_dense):
    path = rewrite_gguf(llama_dense, tmp_path / "m.gguf",
                        rename_tensors={"blk.1.attn_norm.weight": "blk.1000000000.attn_norm.weight"})
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError) as info:
            Inventory.from_model_file(ModelFile(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "blk.1000000000" in str(info.value) and peak < PEAK_BYTES


@pytest.mark.parametrize("key, value, expected", [
    ("llama.rope.dimension_count", 2**32 - 1, "rope dimension count"),
    ("llama.rope.dimension_count", 3, "must be even"),
    ("llama.rope.freq_base", 0.0, "rope frequency base 0.0"),
    ("llama.rope.freq_base", float("nan"), "rope frequency base nan"),
    ("llama.attention.head_count", 2**40, "tensor"),
    ("llama.attention.head_count_kv", 1000, "n_head_kv"),
    ("llama.embedding_length", 7, "tensor"),
    ("llama.context_length", 2**40, "training context"),
    ("llama.expert_used_count", 3, "n_expert_used"),
])
def test_hyperparameters_are_checked_against_the_tensors(tmp_path, llama_dense, key, value, expected):
    path = rewrite_gguf(llama_dense, tmp_path / "m.gguf", {key: value})
    assert expected in hyperparams_error(path)


def test_a_model_without_tensors_gets_a_note_not_a_crash(tmp_path, llama_dense, capsys):
    mf = ModelFile(llama_dense)
    path = rewrite_gguf(llama_dense, tmp_path / "empty.gguf", drop_tensors=list(mf.tensors))
    assert "no layer tensors" in hyperparams_error(path)
    assert main(["inspect", str(path)]) == 0
    assert "no layer tensors" in capsys.readouterr().out
    code = main(["plan", str(path), "--sim-gpus", "8GiB"])
    assert code in (0, 1, 2)
    assert "Traceback" not in capsys.readouterr().err


def test_gemma_sliding_pattern_of_the_wrong_length(tmp_path, fixtures_dir):
    path = rewrite_gguf(fixtures_dir / "gemma3/F16.gguf", tmp_path / "g.gguf",
                        {"gemma3.attention.sliding_window_pattern": [1, 0, 1]})
    assert "has 3 values for" in hyperparams_error(path)


@pytest.mark.parametrize("change, expected", [
    (dict(drop_kv=["tokenizer.ggml.tokens"]), "is missing"),
    (dict(set_kv={"tokenizer.ggml.scores": [0.5, 0.25]}), "has 2 numbers for"),
    (dict(set_kv={"tokenizer.ggml.token_type": [1]}), "has 1 numbers for"),
])
def test_inconsistent_vocabulary(tmp_path, llama_dense, change, expected):
    path = rewrite_gguf(llama_dense, tmp_path / "v.gguf", **change)
    with pytest.raises(ValueError) as info:
        Tokenizer.from_metadata(ModelFile(path).metadata)
    assert expected in str(info.value)


@pytest.mark.parametrize("argv", [["inspect"], ["plan"], ["plan", "--json"]])
def test_cli_reports_huge_block_count_in_one_line(tmp_path, llama_dense, capsys, argv):
    path = rewrite_gguf(llama_dense, tmp_path / "m.gguf", {"llama.block_count": 10**9})
    code = main([argv[0], str(path), *argv[1:], *(["--sim-gpus", "8GiB"] if argv[0] == "plan" else [])])
    err = capsys.readouterr().err
    assert code in (0, 1, 2) and "Traceback" not in err


def test_cli_run_refuses_a_huge_rope_dimension(tmp_path, llama_dense, capsys):
    path = rewrite_gguf(llama_dense, tmp_path / "m.gguf", {"llama.rope.dimension_count": 2**32 - 1})
    assert main(["run", "-m", str(path), "-p", "hi", "-n", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rope dimension count" in err
