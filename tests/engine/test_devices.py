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


def test_no_driver_means_just_the_cpu():
    # this machine has no NVIDIA driver: the real device list is the CPU alone, without an error
    devices = available_devices()
    assert devices[0].name == "CPU"
    assert all(d.is_gpu and not d.simulated for d in devices[1:])
