"""offload-studio plan --check-against: llama.cpp's dry load beside our estimate.

A stand-in llama-perplexity prints the lines the real one printed for Gemma 3 270M Q4_K_M at
`-c 4096` (its --fit dry pass) and then hangs as a real load of a big file would: the command
must stop it after the dry pass. With LLAMA_PERPLEXITY pointing at a real build, the real one
runs too.
"""
from __future__ import annotations

import os
import stat
import sys
import time

import pytest

from app.cli import main
from engine.synth.default_model import gemma_path

FAKE = """#!{python}
import sys, time
with open({log!r}, "w") as log:
    log.write(" ".join(sys.argv[1:]))
print("0.00.443 I load_tensors:          CPU model buffer size =     0.00 MiB")
print("0.00.445 I llama_context:        CPU  output buffer size =     1.00 MiB")
print({refusal!r})
print("0.00.446 I resolve_fused_ops: Flash Attention enabled")
print("0.00.448 I sched_reserve:        CPU compute buffer size =   {compute} MiB")
print("0.00.448 I sched_reserve: graph: nodes = 727, splits = 1, input objects = 4, input tensors = 9", flush=True)
time.sleep(120)
"""


def fake_llama(tmp_path, compute="514.50", refusal=""):
    script = tmp_path / "llama-perplexity"
    script.write_text(FAKE.format(python=sys.executable, log=str(tmp_path / "argv.txt"), compute=compute,
                                  refusal=refusal))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_the_dry_pass_is_read_and_llama_cpp_stopped(tmp_path, capsys):
    started = time.monotonic()
    assert main(["plan", str(gemma_path()), "--check-against", str(fake_llama(tmp_path)), "-c", "4096"]) == 0
    assert time.monotonic() - started < 60, "llama.cpp was left running after its dry pass"
    out = capsys.readouterr().out
    assert "compute buffer    514.50         514.50" in out
    assert "output buffer       1.00           1.00" in out
    assert "727 nodes" in out and "flash attention on" in out
    argv = (tmp_path / "argv.txt").read_text().split()
    assert argv[argv.index("-c") + 1] == "4096" and argv[argv.index("-b") + 1] == "2048"
    assert "--fit" in argv and "--no-warmup" in argv


def test_a_difference_beyond_the_tolerance_fails(tmp_path, capsys):
    assert main(["plan", str(gemma_path()), "--check-against", str(fake_llama(tmp_path, compute="600.00")),
                 "-c", "4096"]) == 1
    assert "OUTSIDE 5 % and 64 MiB" in capsys.readouterr().out


def test_a_refusal_is_reported(tmp_path, capsys):
    refusal = "0.00.046 E llama_init_from_model: model does not support different K (q8_0) and V (f16) cache types"
    assert main(["plan", str(gemma_path()), "--check-against", str(fake_llama(tmp_path, refusal=refusal)),
                 "-c", "4096"]) == 2
    out = capsys.readouterr().out
    assert "does not support different K" in out and "refused these settings" in out


@pytest.mark.skipif(not os.environ.get("LLAMA_PERPLEXITY"), reason="set LLAMA_PERPLEXITY to a llama-perplexity build")
def test_against_the_real_llama_cpp(capsys):
    assert main(["plan", str(gemma_path()), "--check-against", os.environ["LLAMA_PERPLEXITY"], "-c", "8192",
                 "-fa", "off", "--full-load"]) == 0
    out = capsys.readouterr().out
    assert "KV cache           39.00          39.00" in out
