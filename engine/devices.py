"""The devices a plan can use: the CPU (psutil), NVIDIA GPUs (pynvml), and simulated GPUs.

Simulated GPUs (`--sim-gpus 24GiB,12GiB`) plan like real ones and run on the CPU backend, so
every multi-device path is testable on a machine without a GPU. Emulated GPUs (`--emulate-cuda
24GiB`) plan the same way and run the CUDA backend's own kernels on the CPU emulation. Device
names are llama.cpp's buffer names: `CPU`, `CUDA0`, `CUDA1`, ...
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import psutil

UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1 << 10, "M": 1000 ** 2, "MB": 1000 ** 2,
         "MIB": 1 << 20, "G": 1 << 30, "GB": 1000 ** 3, "GIB": 1 << 30, "T": 1 << 40, "TB": 1000 ** 4,
         "TIB": 1 << 40}
SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Device:
    name: str                   # CPU, CUDA0, CUDA1, ...
    kind: str                   # "cpu" or "gpu"
    total_bytes: int
    description: str = ""
    simulated: bool = False
    compute_capability: tuple[int, int] | None = None
    emulated: bool = False      # a simulated GPU that runs the CUDA kernels on the CPU (--emulate-cuda)

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"


def parse_size(text: str) -> int:
    """'24GiB' -> bytes. A bare G, like llama.cpp's and most users' habit, means GiB."""
    m = SIZE_RE.match(text)
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"cannot read size {text!r} (examples: 24GiB, 12GB, 8G, 512MiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def cpu_device() -> Device:
    return Device("CPU", "cpu", psutil.virtual_memory().total,
                  f"{psutil.cpu_count(logical=False) or psutil.cpu_count()} cores")


def nvidia_gpus() -> list[Device]:
    """Real NVIDIA GPUs; an empty list when there is no driver or no pynvml."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            except Exception:
                cc = None
            gpus.append(Device(f"CUDA{i}", "gpu", int(memory.total), name, compute_capability=cc))
        return gpus
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def simulated_gpus(spec: str) -> list[Device]:
    """`24GiB,24GiB,48GiB` -> three simulated GPUs named CUDA0..CUDA2."""
    sizes = [s for s in spec.split(",") if s.strip()]
    if not sizes:
        raise ValueError("--sim-gpus needs at least one size, e.g. --sim-gpus 24GiB,12GiB")
    return [Device(f"CUDA{i}", "gpu", parse_size(s), f"simulated {s.strip()}", simulated=True)
            for i, s in enumerate(sizes)]


def emulated_gpus(spec: str) -> list[Device]:
    """`24GiB,24GiB` -> two GPUs named CUDA0, CUDA1 whose CUDA kernels run on the CPU emulation."""
    sizes = [s for s in spec.split(",") if s.strip()]
    if not sizes:
        raise ValueError("--emulate-cuda needs at least one size, e.g. --emulate-cuda 24GiB,24GiB")
    return [Device(f"CUDA{i}", "gpu", parse_size(s), f"emulated CUDA {s.strip()}", simulated=True, emulated=True)
            for i, s in enumerate(sizes)]


def available_devices(sim_gpus: str | None = None, emulate_cuda: str | None = None) -> list[Device]:
    """The CPU first, then the GPUs: simulated or emulated ones when a spec is given, else the real ones."""
    if sim_gpus and emulate_cuda:
        raise ValueError("--sim-gpus and --emulate-cuda both name the GPUs: give one of them")
    if emulate_cuda:
        return [cpu_device()] + emulated_gpus(emulate_cuda)
    return [cpu_device()] + (simulated_gpus(sim_gpus) if sim_gpus else nvidia_gpus())
