"""The backends the conformance suite runs every op on: a name and a factory each.

A new device adds itself here with one entry (and `marks=pytest.mark.gpu` when it needs one);
`backend_params()` is what the suite parametrizes over.
"""
from __future__ import annotations

import pytest

from engine.backends.cpu import CpuBackend
from engine.backends.strict import StrictSimBackend


def _cpu(activations: str = "f32"):
    return CpuBackend(activations)


def _strict_sim(activations: str = "f32"):
    return StrictSimBackend("CUDA0", activations)


def _emulated_cuda(activations: str = "f32"):
    from engine.backends.cuda import emulated_backend
    return emulated_backend("CUDA0", activations, debug=True)


def _cupy_cuda(activations: str = "f32"):
    from engine.backends.cuda import gpu_backend
    return gpu_backend("CUDA0", 0, activations)


BACKENDS = {
    "cpu": (_cpu, ()),
    "strict-sim": (_strict_sim, ()),
    "emulated-cuda": (_emulated_cuda, ()),
    "cuda": (_cupy_cuda, (pytest.mark.gpu,)),
}


def backend_params() -> list:
    return [pytest.param(name, marks=marks, id=name) for name, (_, marks) in BACKENDS.items()]


def make_backend(name: str, activations: str = "f32"):
    return BACKENDS[name][0](activations)
