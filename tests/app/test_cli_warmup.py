"""`offload-studio warmup` and the one line other commands print when they start compiling kernels.

Compiles are Numba's own "numba:compile" events, raised here around nothing, as a cold cache
would raise them."""
import io
import re
from types import SimpleNamespace

import numba
from numba.core import event

from app.cli import COMPILE_NOTICE, compile_notice, main
from app.commands.warmup import ProgressLine
from engine.run.warmup import marker_path
from engine.run_config import RunConfig
from kernels.compile_progress import CompileProgress


def qmatmul_kernel():
    """Stands for the kernel being compiled: the compile events name it."""


def fake_compiles(n: int) -> None:
    for _ in range(n):
        with event.trigger_event("numba:compile", data={"dispatcher": SimpleNamespace(py_func=qmatmul_kernel)}):
            pass


def test_a_command_that_runs_a_model_says_once_that_it_compiles(capsys):
    with compile_notice(SimpleNamespace(ACCEPTS_LLAMA_ARGS=True)):
        fake_compiles(3)
    assert capsys.readouterr().err == COMPILE_NOTICE + "\n"
    with compile_notice(SimpleNamespace(ACCEPTS_LLAMA_ARGS=True)):
        pass                    # a warm cache: nothing to say
    assert capsys.readouterr().err == ""


def test_warmup_and_commands_that_run_no_model_print_no_notice(capsys):
    for module in (SimpleNamespace(ACCEPTS_LLAMA_ARGS=True, REPORTS_COMPILES=True), SimpleNamespace()):
        with compile_notice(module):
            fake_compiles(1)
    assert capsys.readouterr().err == ""


def test_the_progress_line_in_a_log_is_one_line_per_kernel():
    out = io.StringIO()
    line = ProgressLine("m.gguf", out)
    for progress in (CompileProgress(0, "qmatmul_kernel"), CompileProgress(3, "qmatmul_kernel"),
                     CompileProgress(4, ""), CompileProgress(4, "attend_cache")):
        line(progress)
    line.done("m.gguf: 9 kernels compiled in 1.0 s")
    assert out.getvalue().splitlines() == ["m.gguf: compiling CPU kernels: 0 compiled, now qmatmul_kernel",
                                           "m.gguf: compiling CPU kernels: 4 compiled, now attend_cache",
                                           "m.gguf: 9 kernels compiled in 1.0 s"]


def test_warmup_compiles_a_model_and_marks_its_kind_warm(capsys, monkeypatch, tmp_path, moe_path):
    from engine.gguf.model_file import ModelFile
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))      # the markers' directory only
    assert main(["warmup", "-m", str(moe_path)]) == 0
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"Q4_K_M\.gguf: (\d+ kernels compiled|kernels already compiled) .*s\)?", last), last
    assert marker_path(ModelFile(moe_path), RunConfig()).exists()
