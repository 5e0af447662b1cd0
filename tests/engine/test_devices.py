import sys
import types

import pytest

from engine.devices import available_devices, parse_size, simulated_gpus


@pytest.mark.parametrize("text, n_bytes", [("24GiB", 24 << 30), ("24G", 24 << 30), ("12GB", 12 * 10 ** 9),
                                           ("512MiB", 512 << 20), ("1.5GiB", 3 << 29), ("1024", 1024)])
def test_parse_size(text, n_bytes):
    assert parse_size(text) == n_bytes


def test_bad_size():
    with pytest.raises(ValueError, match="cannot read size '24 apples'"):
        parse_size("24 apples")


def test_simulated_gpus_are_named_like_llama_cpp_buffers():
    gpus = simulated_gpus("24GiB,24GiB,48GiB")
    assert [(g.name, g.total_bytes, g.simulated) for g in gpus] == [
        ("CUDA0", 24 << 30, True), ("CUDA1", 24 << 30, True), ("CUDA2", 48 << 30, True)]


def test_available_devices_start_with_the_cpu():
    devices = available_devices("8GiB")
    assert devices[0].name == "CPU" and devices[0].total_bytes > 0 and not devices[0].is_gpu
    assert [d.name for d in devices[1:]] == ["CUDA0"]


class FakeNvml:
    """pynvml as a machine presents it: without a driver nvmlInit fails; with one, its GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus=None):
        self.gpus = gpus            # None: no driver
        self.shut_down = False

    def nvmlInit(self):
        if self.gpus is None:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, handle):
        return handle[0].encode()

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=handle[1])

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return (9, 0)


def test_no_driver_means_just_the_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus=None))
    devices = available_devices()
    assert [d.name for d in devices] == ["CPU"] and devices[0].kind == "cpu"


def test_a_driver_lists_its_gpus_after_the_cpu(monkeypatch):
    nvml = FakeNvml(gpus=[("NVIDIA H100", 80 << 30), ("NVIDIA L4", 24 << 30)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    devices = available_devices()
    assert [(d.name, d.description, d.total_bytes, d.simulated) for d in devices[1:]] == [
        ("CUDA0", "NVIDIA H100", 80 << 30, False), ("CUDA1", "NVIDIA L4", 24 << 30, False)]
    assert devices[1].compute_capability == (9, 0) and nvml.shut_down