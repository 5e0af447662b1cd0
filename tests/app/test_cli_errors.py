"""The command line's error boundary: every error of ours, and every OSError, ends in one line on
stderr and exit status 2; `--debug` keeps the traceback; outputs are written atomically."""
import errno
import os
import stat

import numpy as np
import pytest

from app.cli import main
from engine.files import atomic_path, atomic_write
from gguf_bytes import rewrite_gguf


def one_line_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def llama_dense(fixtures_dir):
    return fixtures_dir / "llama-dense/F32.gguf"


@pytest.mark.parametrize("argv", [["frobnicate"], ["inspct", "x.gguf"], ["evals"]])
def test_a_mistyped_command_is_not_taken_for_a_model(capsys, argv):
    err = one_line_error(capsys, argv)
    assert f"unknown command {argv[0]!r}" in err


def test_a_close_command_is_suggested(capsys):
    assert "did you mean 'inspect'" in one_line_error(capsys, ["inspct"])


def test_a_refused_template_is_one_line_and_debug_keeps_the_traceback(capsys, tmp_path, llama_dense):
    path = rewrite_gguf(llama_dense, tmp_path / "t.gguf", {"tokenizer.chat_template": "{% for %}"})
    err = one_line_error(capsys, ["chat", "-m", str(path), "-n", "1"])
    assert "chat template" in err
    with pytest.raises(Exception) as info:
        main(["chat", "-m", str(path), "-n", "1", "--debug"])
    assert type(info.value).__name__ == "ChatTemplateError"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder(capsys, tmp_path, llama_dense):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    err = one_line_error(capsys, ["eval", "-m", str(llama_dense), "--tokens", "1,2", "--logits-out",
                                  str(folder / "x.npy")])
    assert "Permission denied" in err


def test_an_output_under_a_file_is_one_line(capsys, tmp_path, llama_dense):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, ["synth", "--preset", "tiny-qwen3-moe", "-o", str(tmp_path / "file" / "m.gguf")])
    assert "Not a directory" in err or "File exists" in err


@pytest.mark.parametrize("target", ["/dev/full", "/dev/null"])
def test_logits_out_to_a_device_is_refused_before_running(capsys, llama_dense, target):
    err = one_line_error(capsys, ["eval", "-m", str(llama_dense), "--tokens", "1,2", "--logits-out", target])
    assert "not a regular file" in err and not os.path.exists(target + ".npy")


def test_eval_writes_exactly_the_path_given(capsys, tmp_path, llama_dense):
    out = tmp_path / "logits.bin"
    assert main(["eval", "-m", str(llama_dense), "--tokens", "1,2,3", "--logits-out", str(out)]) == 0
    assert f"wrote {out}:" in capsys.readouterr().out
    assert np.load(out).shape[0] == 3 and not (tmp_path / "logits.bin.npy").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["logits.bin"]


@pytest.mark.parametrize("ids, bad", [("1,2147483648", "2147483648"), ("4294967301", "4294967301"),
                                      ("-1,2", "-1")])
def test_token_ids_out_of_int32_are_refused(capsys, tmp_path, llama_dense, ids, bad):
    err = one_line_error(capsys, ["eval", "-m", str(llama_dense), f"--tokens={ids}", "--logits-out",
                                  str(tmp_path / "x.npy")])
    assert f"token id {bad}" in err


def test_npy_token_ids_out_of_int32_are_refused(capsys, tmp_path, llama_dense):
    np.save(tmp_path / "ids.npy", np.array([1, 1 << 31], dtype=np.int64))
    err = one_line_error(capsys, ["eval", "-m", str(llama_dense), "--tokens-file", str(tmp_path / "ids.npy"),
                                  "--logits-out", str(tmp_path / "x.npy")])
    assert "token id 2147483648" in err


class FullDisk(Exception):
    pass


def test_a_full_disk_leaves_the_previous_output_intact(tmp_path):
    target = tmp_path / "out.npy"
    np.save(target, np.arange(4))
    with pytest.raises(OSError) as info:
        with atomic_write(target) as f:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(target)
    assert np.array_equal(np.load(target), np.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["out.npy"]


def test_synth_on_a_full_disk_keeps_the_earlier_model(tmp_path, monkeypatch):
    import engine.synth.writer as writer
    target = tmp_path / "m.gguf"
    target.write_bytes(b"earlier model")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "_write_data", fail)
    with pytest.raises(OSError):
        writer.write_synthetic(target, "tiny-qwen3-moe", quant="Q8_0")
    assert target.read_bytes() == b"earlier model" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    with atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"x")
    mode = (tmp_path / "new.bin").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_escape_sequences_in_a_model_name_are_not_printed(capsys, tmp_path, llama_dense):
    path = rewrite_gguf(llama_dense, tmp_path / "n.gguf", {"general.name": "\x1b]0;owned\x07\x1b[2Jname"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b]0;owned\\x07\\x1b[2Jname" in out
    assert main(["plan", str(path), "--sim-gpus", "8GiB"]) in (0, 1)
    assert "\x1b" not in capsys.readouterr().out
