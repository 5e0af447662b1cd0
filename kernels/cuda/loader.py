"""One cached loader for the `.cu` sources: read as package data, compiled once per process.

Every source gets `#line 1 "kernels/cuda/<file>"` prepended so that compiler errors point at the
real file and line. C++ templates are instantiated through `name_expressions` (CuPy's mechanism),
never by formatting source text.
"""
from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources

PACKAGE = "kernels.cuda"
KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+'
                       r'(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(')
INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def source_names() -> list[str]:
    """The kernel sources shipped with the package, e.g. ['matvec.cu', 'norm.cu', ...]."""
    return sorted(p.name for p in resources.files(PACKAGE).iterdir() if p.name.endswith(".cu"))


def source_dir() -> str:
    """The folder of the sources and their headers (the include path of every compile)."""
    return str(resources.files(PACKAGE))


@functools.lru_cache(maxsize=None)
def read_raw(name: str) -> str:
    return resources.files(PACKAGE).joinpath(name).read_text()


def read_source(name: str) -> str:
    """The source of `name` with a #line directive naming the real file."""
    return f'#line 1 "kernels/cuda/{name}"\n' + read_raw(name)


def extern_c_kernels(name: str) -> list[str]:
    """Names of the `extern "C" __global__` kernels defined in a source."""
    return KERNEL_RE.findall(read_raw(name))


def source_digest(name: str) -> str:
    """A hash of a source and every header it includes (one level of quotes-includes, recursively)."""
    digest = hashlib.sha256()
    seen: set[str] = set()

    def add(file: str) -> None:
        if file in seen:
            return
        seen.add(file)
        text = read_raw(file)
        digest.update(file.encode() + b"\0" + text.encode())
        for included in INCLUDE_RE.findall(text):
            add(included)

    add(name)
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def load_module(name: str, name_expressions: tuple[str, ...] = (), options: tuple[str, ...] = ()):
    """A `cupy.RawModule` for the source `name`, compiled once per process (CuPy also caches on disk)."""
    import cupy

    # CuPy's disk cache keys on the code text alone: name the headers' digest in it so that an
    # edited header never brings back a stale binary
    code = f"// sources {source_digest(name)}\n" + read_source(name)
    return cupy.RawModule(code=code, options=("-std=c++17", f"-I{source_dir()}", *options),
                          name_expressions=name_expressions or None)
