"""Placement-driven execution: each weight lives on the device the placement names, and each op
runs on the device that holds its weight.

A routed-expert tensor whose experts are spread over devices is held as one part per device;
each selected expert runs where it lives and its output is summed on the layer's home device in
the same order as on one device, so any placement gives the same logits as all-CPU.

Simulated GPUs (`--sim-gpus`) are CPU backends that own copies of their weights and refuse to
touch weights of another device: a weight read from the wrong device is an error here, not a
silent slowdown.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.backends import Weight
from engine.backends.cpu import CpuBackend


class DeviceMismatchError(RuntimeError):
    pass


class SimulatedGpuBackend(CpuBackend):
    """A GPU that computes on the host: it holds its own copy of the weights placed on it."""

    def __init__(self, device: str, activations: str = "f32"):
        super().__init__(activations)
        self.name = device
        self.allocated_bytes = 0

    def upload(self, data: np.ndarray) -> np.ndarray:
        copy = np.array(data, copy=True)
        copy.setflags(write=False)
        self.allocated_bytes += copy.nbytes
        return copy

    def _check(self, w: Weight) -> None:
        if getattr(w, "device", self.name) != self.name:
            raise DeviceMismatchError(f"{w.name} lives on {w.device} but was used on {self.name}")

    def matmul(self, x, w):
        self._check(w)
        return super().matmul(x, w)

    def expert_matmul(self, x, w, expert, rows=None):
        self._check(w)
        return super().expert_matmul(x, w, expert, rows)

    def head_matmul(self, x, w):
        self._check(w)
        return super().head_matmul(x, w)

    def embedding(self, w, ids):
        self._check(w)
        return super().embedding(w, ids)


class HostBackend(CpuBackend):
    name = "CPU"
    allocated_bytes = 0

    @staticmethod
    def upload(data: np.ndarray) -> np.ndarray:
        return data         # the memory map is the CPU's copy


@dataclass(frozen=True, eq=False)
class PlacedWeight(Weight):
    device: str = "CPU"


@dataclass(frozen=True, eq=False)
class SplitExpertWeight(Weight):
    """A routed-expert tensor whose experts live on several devices: one part per device."""

    expert_device: tuple[str, ...] = ()
    parts: dict = field(default_factory=dict)           # device -> PlacedWeight (local experts)
    local_index: tuple[int, ...] = ()                   # expert -> its index inside its part


def place_weight(w: Weight, devices: str | tuple[str, ...], backends: dict) -> Weight:
    """`w` moved onto its device(s): a PlacedWeight, or a SplitExpertWeight for split experts."""
    if isinstance(devices, str):
        return PlacedWeight(w.name, backends[devices].upload(w.data), w.ggml_type, w.shape, devices)
    parts, local_index = {}, [0] * len(devices)
    for device in dict.fromkeys(devices):
        experts = [e for e, d in enumerate(devices) if d == device]
        for i, e in enumerate(experts):
            local_index[e] = i
        data = backends[device].upload(np.ascontiguousarray(w.data[experts]))
        parts[device] = PlacedWeight(w.name, data, w.ggml_type, (len(experts), *w.shape[1:]), device)
    return SplitExpertWeight(w.name, w.data[:0], w.ggml_type, w.shape, tuple(devices), parts, tuple(local_index))


class PlacedOps(CpuBackend):
    """The op set the families call, routed to the device of each weight.

    Activations are host arrays on every device this build runs (CPU and simulated GPUs);
    `transfers` counts the activation hand-overs between devices that a real multi-GPU run pays."""

    def __init__(self, backends: dict):
        super().__init__()
        self.backends = backends
        self.current = "CPU"
        self.transfers = 0
        self.transfer_bytes = 0

    def _on(self, device: str, x: np.ndarray):
        if device != self.current:
            self.transfers += 1
            self.transfer_bytes += x.nbytes
            self.current = device
        return self.backends[device]

    def matmul(self, x, w):
        return self._on(w.device, x).matmul(x, w)

    def expert_matmul(self, x, w, expert, rows=None):
        if isinstance(w, SplitExpertWeight):
            device = w.expert_device[expert]
            return self._on(device, x).expert_matmul(x, w.parts[device], w.local_index[expert], rows)
        return self._on(w.device, x).expert_matmul(x, w, expert, rows)

    def head_matmul(self, x, w):
        return self._on(w.device, x).head_matmul(x, w)

    def embedding(self, w, ids):
        return self._on(w.device, np.asarray(ids)).embedding(w, ids)

    def dequantize(self, w):
        return self.backends[getattr(w, "device", "CPU")].dequantize(w)

    def set_threads(self, n_threads: int) -> None:
        CpuBackend.set_threads(n_threads)

    def allocated_bytes(self) -> dict[str, int]:
        return {name: backend.allocated_bytes for name, backend in self.backends.items()}


class NoCudaBackendError(RuntimeError):
    pass


def make_backends(devices, activations: str = "f32") -> dict:
    """A backend per device: the host for the CPU, a simulated GPU for each simulated device.

    A real GPU is refused rather than quietly run on the CPU."""
    backends = {}
    for device in devices:
        if not device.is_gpu:
            backends[device.name] = HostBackend(activations)
        elif device.simulated:
            backends[device.name] = SimulatedGpuBackend(device.name, activations)
        else:
            raise NoCudaBackendError(f"{device.name} ({device.description}) needs the CUDA backend, which this "
                                     "build does not have yet: place everything on the CPU or use --sim-gpus")
    return backends
