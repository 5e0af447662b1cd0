"""Build a `.cu` source for the CPU: g++ against `cuda_emu.h`, cached by the sources' hash.

For each kernel (the `extern "C"` ones found in the source, and C++ template instances named by
`name_expressions`, as with CuPy) a small entry point `emu_launch_<name>` is appended; it takes a
launch configuration and the argument pointers, and checks the count and byte size of every
argument against the kernel's own signature before running the grid.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from kernels.cuda import loader

CXX_FLAGS = ("-std=c++17", "-O2", "-g0", "-shared", "-fPIC", "-fno-weak", "-fvisibility=hidden",
             "-fno-strict-aliasing", "-fwrapv", "-Wall", "-Wno-sign-compare", "-Wno-unused-function",
             "-Wno-unused-variable", "-Wno-unknown-pragmas")
ENTRY = ('extern "C" __attribute__((visibility("default"))) int {symbol}('
         'const emu::LaunchConfig* c, void** a, const long* s, int n) {{ return emu::launch(c, &{expr}, a, s, n); }}\n')


class EmulationBuildError(RuntimeError):
    pass


class LaunchConfig(ctypes.Structure):
    """emu::LaunchConfig in cuda_emu.h."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("seed", ctypes.c_uint), ("debug", ctypes.c_int)]


def entry_symbol(expression: str) -> str:
    return "emu_launch_" + re.sub(r"\W", "_", expression)


def header_path() -> Path:
    return Path(str(resources.files("kernels.cuda.emu").joinpath("cuda_emu.h")))


def cache_dir() -> Path:
    base = os.environ.get("OFFLOAD_STUDIO_CUDA_EMU_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload-studio" / "cuda-emu"


@functools.lru_cache(maxsize=None)
def compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


class EmulatedModule:
    """A compiled source: `kernel(expression)` gives the ctypes entry point of one kernel."""

    def __init__(self, name: str, library_path: Path, expressions: tuple[str, ...]):
        self.name = name
        self.library = ctypes.CDLL(str(library_path))
        self.library.emu_last_error.restype = ctypes.c_char_p
        self.expressions = expressions

    def kernel(self, expression: str):
        if expression not in self.expressions:
            raise KeyError(f"{self.name} has no kernel {expression!r} (it has {', '.join(self.expressions)})")
        entry = getattr(self.library, entry_symbol(expression))
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.POINTER(ctypes.c_void_p),
                          ctypes.POINTER(ctypes.c_long), ctypes.c_int]
        return entry

    def last_error(self) -> str:
        return self.library.emu_last_error().decode(errors="replace")


def emulation_source(name: str, expressions: tuple[str, ...]) -> str:
    return loader.read_source(name) + "\n" + "".join(
        ENTRY.format(symbol=entry_symbol(e), expr=e) for e in expressions)


@functools.lru_cache(maxsize=None)
def build(name: str, name_expressions: tuple[str, ...] = ()) -> EmulatedModule:
    """Compile `name` for the CPU (or reuse the cached build) and load it."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise EmulationBuildError(f"the CUDA emulation needs a C++ compiler; {cxx!r} is not on PATH")
    expressions = tuple(loader.extern_c_kernels(name)) + tuple(name_expressions)
    source = emulation_source(name, expressions)
    key = hashlib.sha256("\0".join([source, loader.source_digest(name), header_path().read_text(),
                                    " ".join(CXX_FLAGS), compiler_version(cxx)]).encode()).hexdigest()[:24]
    target = cache_dir() / f"{Path(name).stem}-{key}.so"
    if not target.exists():
        compile_library(cxx, source, target)
    return EmulatedModule(name, target, expressions)


def compile_library(cxx: str, source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / (target.stem + ".cpp")
        src.write_text(source)
        out = Path(tmp) / target.name
        cmd = [cxx, *CXX_FLAGS, f"-I{loader.source_dir()}", "-include", str(header_path()), "-x", "c++",
               str(src), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulationBuildError(f"building {target.stem} for the CUDA emulation failed:\n{result.stderr}")
        os.replace(out, target)     # atomic: a concurrent build of the same key writes the same bytes
