import numpy as np
import pytest

from app.cli import main


@pytest.fixture
def moe(fixtures_dir):
    return fixtures_dir / "llama-moe"


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_eval_batched_matches_llama_cpp_reference(tmp_path, moe, capsys):
    out = tmp_path / "logits.npy"
    assert main(["eval", "-m", str(moe / "F32.gguf"), "--tokens-file", str(moe / "tokens.npy"),
                 "--logits-out", str(out), "-ctk", "f32", "-ctv", "f32"]) == 0
    logits = np.load(out)
    reference = np.load(moe / "F32.logits_batch_f32ref.npy")
    assert logits.dtype == np.float32 and logits.shape == reference.shape
    assert rel(logits, reference) < 1e-4


def test_eval_incremental_writes_the_last_k_rows(tmp_path, moe):
    out = tmp_path / "logits.npy"
    tokens = ",".join(map(str, np.load(moe / "tokens.npy")))
    assert main(["eval", "-m", str(moe / "F32.gguf"), "--tokens", tokens, "--logits-out", str(out),
                 "--incremental", "8"]) == 0
    logits = np.load(out)
    assert logits.shape == (8, 512)
    # default settings (f16 KV cache) against llama.cpp's own incremental logits
    assert rel(logits, np.load(moe / "F32.logits_incr.npy")) < 0.01


def test_eval_on_simulated_gpus_gives_the_same_logits(tmp_path, moe):
    cpu, gpus = tmp_path / "cpu.npy", tmp_path / "gpus.npy"
    args = ["eval", "-m", str(moe / "Q4_K_M.gguf"), "--tokens-file", str(moe / "tokens.npy")]
    assert main([*args, "--logits-out", str(cpu)]) == 0
    assert main([*args, "--logits-out", str(gpus), "--sim-gpus", "1GiB,1GiB", "-ngl", "99", "-ts", "1,1",
                 "-ot", r"blk\.1\.ffn_down_exps=CPU"]) == 0
    assert np.array_equal(np.load(cpu), np.load(gpus))


def test_tokenize_matches_the_vocabulary(moe, capsys):
    assert main(["tokenize", "-m", str(moe / "F32.gguf"), "-p", "hello", "--add-special"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    assert ids[0] == 1 and len(ids) > 1 and all(0 <= i < 512 for i in ids)


def test_run_streams_a_greedy_completion(moe, capsys):
    assert main(["run", "-m", str(moe / "F32.gguf"), "-p", "hello", "-n", "5", "--temp", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("hello")
    assert "5 generated" in captured.err and "finished: length" in captured.err


def test_perplexity_prints_llama_cpp_lines(tmp_path, moe, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 60))
    assert main(["perplexity", "-m", str(moe / "F32.gguf"), "-f", str(text), "-c", "64", "--chunks", "3"]) == 0
    out = capsys.readouterr().out
    assert "[1]" in out and "[3]" in out and "Final estimate: PPL = " in out
    value = float(out.split("Final estimate: PPL = ")[1].split()[0])
    assert np.isfinite(value) and value > 1


def test_kl_divergence_of_a_model_against_itself_is_zero(tmp_path, moe, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["a stitch in time saves nine"] * 120))
    base = tmp_path / "base.kld"
    common = ["perplexity", "-m", str(moe / "F32.gguf"), "-f", str(text), "-c", "64", "--chunks", "5"]
    assert main([*common, "--kl-divergence-base", str(base)]) == 0
    assert base.exists()
    capsys.readouterr()
    assert main([*common, "--kl-divergence-base", str(base), "--kl-divergence"]) == 0
    out = capsys.readouterr().out
    assert "Mean    KLD:" in out or "Mean KLD" in out
    assert "Same top p" in out


def test_context_overflow_is_a_clear_error(moe, capsys, tmp_path):
    tokens = ",".join(["5"] * 300)
    out = tmp_path / "logits.npy"
    assert main(["eval", "-m", str(moe / "F32.gguf"), "--tokens", tokens, "--logits-out", str(out),
                 "-c", "256"]) == 2
    assert not out.exists()
    assert "context" in capsys.readouterr().err
