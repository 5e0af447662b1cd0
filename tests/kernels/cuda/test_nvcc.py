"""Every .cu source compiles with the local nvcc for sm_80, sm_86, sm_89 and sm_90, with every
template instance the launchers use, and the decode kernels spill no registers (ptxas -v).
Skipped where nvcc is missing."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from kernels.cuda import loader, ops

ARCHS = ("80", "86", "89", "90")
DECODE_SOURCES = ("matvec.cu", "attention.cu", "delta_net.cu")
SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
FUNCTION_RE = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")

pytestmark = [pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed"), pytest.mark.slow]


def instances(source: str) -> tuple[str, ...]:
    if source == "attention.cu":        # the same-type pairs and f16 keys with each value type
        pairs = {(t, t) for t in ops.CACHE_TYPES.values()} | {(1, t) for t in ops.CACHE_TYPES.values()}
        return tuple(f"{kernel}<{k},{v}>" for kernel in ("attention_split", "attention_tiled") for k, v in sorted(pairs))
    return ops.NAME_EXPRESSIONS.get(source, ())


def compile_all_archs(source: str, tmp_path) -> str:
    """ptxas's report for the source built for every arch, template instances included."""
    wrapper = tmp_path / f"all_{source}"
    keep = ", ".join(f"(void*)&{e}" for e in instances(source))
    wrapper.write_text(loader.read_source(source) + (f"\nstatic void* const instances_used[] = {{{keep}}};\n" if keep else ""))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = ["nvcc", "-std=c++17", "--fatbin", *gencode, "--threads", "2", "-Xptxas", "-v", f"-I{loader.source_dir()}",
           "-o", str(tmp_path / "out.fatbin"), str(wrapper)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.mark.parametrize("source", loader.source_names())
def test_source_compiles_for_every_arch(source, tmp_path):
    report = compile_all_archs(source, tmp_path)
    built = {arch for _, arch in FUNCTION_RE.findall(report)}
    assert built == {f"sm_{a}" for a in ARCHS}
    if source in DECODE_SOURCES:
        spills = [line for line in report.splitlines()
                  if (m := SPILL_RE.search(line)) and (m.group(1) != "0" or m.group(2) != "0")]
        assert not spills, "\n".join(spills)


def test_compile_errors_point_at_the_real_file_and_line(tmp_path):
    source = loader.read_source("matvec.cu").replace("float amax = warp_max(fabsf(v));", "float amax = undefined_name;")
    path = tmp_path / "broken.cu"
    path.write_text(source)
    result = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_80", "-cubin", f"-I{loader.source_dir()}", "-o",
                             str(tmp_path / "x.cubin"), str(path)], capture_output=True, text=True)
    line = 1 + loader.read_raw("matvec.cu").splitlines().index("    float amax = warp_max(fabsf(v));")
    assert f"kernels/cuda/matvec.cu({line})" in result.stderr
