"""Runtimes for the CUDA kernel tests: the CPU emulation always (debug mode: guard pages, canaries,
fixed seeds), CuPy on a GPU for the cases marked `gpu`."""
from __future__ import annotations

import pytest

from kernels.cuda.runtime import EmulatedRuntime


@pytest.fixture
def emu_rt():
    return EmulatedRuntime(debug=True, seed=12345)


def _cupy_runtime():
    from kernels.cuda.runtime import CupyRuntime
    return CupyRuntime()


@pytest.fixture(params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def rt(request):
    """Each kernel test runs on the emulator and, where CuPy has a GPU, on the GPU."""
    if request.param == "emulated":
        return EmulatedRuntime(debug=True, seed=12345)
    return _cupy_runtime()
