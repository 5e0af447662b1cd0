"""offload-studio warmup [-m MODEL]: compile the CPU kernels now, not at the first prompt.

Numba compiles the kernels on a machine's first run (about a minute for Gemma 3 270M on two
cores) and caches them. Packagers and CI run this once: it warms the cache for MODEL's kind, or
for the built-in models (the chat model the app opens and the base model), with a progress line.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from engine.gguf.model_file import ModelFile
from engine.run.model import Model
from engine.run.warmup import warm_up
from kernels.compile_progress import CompileProgress

REPORTS_COMPILES = True     # its own progress line instead of the one-line notice of other commands


def add_arguments(p) -> None:
    p.add_argument("-m", "--model", action="append", default=[],
                   help="GGUF file whose kernels to compile (repeatable; default: the built-in models)")


def built_in_models() -> list[Path]:
    from engine.synth.default_model import chat_model_path, default_model_path
    def note(text: str) -> None:
        print(text, file=sys.stderr)
    return list(dict.fromkeys((chat_model_path(note), default_model_path(note))))


class ProgressLine:
    """One line rewritten in place on a terminal; in a log, one line per kernel."""

    def __init__(self, name: str, out=None):
        self.name = name
        self.out = out or sys.stderr
        self._last = ""

    def __call__(self, progress: CompileProgress) -> None:
        if not progress.current or progress.current == self._last:
            return
        self._last = progress.current
        line = f"{self.name}: compiling CPU kernels: {progress.describe()}"
        if self.out.isatty():
            self.out.write(f"\r\033[K{line}")
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self, text: str) -> None:
        self.out.write(("\r\033[K" if self.out.isatty() else "") + text + "\n")


def run(args) -> int:
    for path in [Path(p) for p in args.model] or built_in_models():
        started_s = time.perf_counter()
        line = ProgressLine(path.name)
        counter = warm_up(Model(ModelFile(path)), report=line)
        elapsed_s = time.perf_counter() - started_s
        line.done(f"{path.name}: {counter.compiled} kernels compiled in {elapsed_s:.1f} s" if counter.compiled
                  else f"{path.name}: kernels already compiled ({elapsed_s:.1f} s)")
    return 0
