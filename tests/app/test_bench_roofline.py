"""offload-studio bench's decode roofline: the active bytes it prints per device are the
placement's (engine.plan.active_bytes), and the roofline share is their read time at the
measured copy bandwidth x the measured tokens per second."""
from __future__ import annotations

import pytest

from app.cli import main
from app.commands.inference_bench import DeviceRoofline, roofline_rows
from engine.devices import cpu_device, emulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.active_bytes import active_bytes_per_token
from engine.plan.inventory import Inventory
from engine.plan.llama_args import parse_llama_args


def test_roofline_rows_add_the_devices_read_times():
    rooflines = [DeviceRoofline("CPU", 2_000_000, 20e9, "host copy"),
                 DeviceRoofline("CUDA0", 6_000_000, 1000e9, "cupy device copy")]
    rows = roofline_rows(rooflines, tokens_per_s=50.0)
    # token: 2 MB / 20 GB/s + 6 MB / 1000 GB/s = 100 us + 6 us; at 50 t/s (20 ms) that is 0.53%
    assert rows[0] == ["CPU", "2.00", "20.0 (host copy)", "0.10", "0.5%"]
    assert rows[1] == ["CUDA0", "6.00", "1000.0 (cupy device copy)", "0.30", "0.0%"]
    assert rows[2] == ["token", "8.00", "roofline 9434.0 t/s", "0.40", "0.5%"]


def test_bench_prints_active_bytes_of_a_hybrid_moe_placement(capsys, fixtures_dir):
    model = fixtures_dir / "qwen3moe" / "Q4_K_M.gguf"
    flags = ["-ngl", "99", "-ot", "exps=CPU"]
    assert main(["bench", "-m", str(model), "-p", "8", "-n", "2", "-r", "1", "--emulate-cuda", "4GiB", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("decode roofline"))
    printed = {line.split()[0]: line.split() for line in lines[start + 3:]}
    inventory = Inventory.from_model_file(ModelFile(model))
    placement = parse_llama_args(flags, inventory, [cpu_device()] + emulated_gpus("4GiB")).placement
    expected = active_bytes_per_token(inventory, placement)
    assert set(printed) == {"CPU", "CUDA0", "token"}
    for device in ("CPU", "CUDA0"):
        assert float(printed[device][1]) == pytest.approx(expected[device] / 1e6, abs=0.006)
    assert "emulated device copy" in " ".join(printed["CUDA0"])
    tg = float(next(line for line in lines if " tg2 " in line).split()[3])
    achieved = float(printed["token"][-2])
    assert achieved == pytest.approx(sum(expected.values()) * tg / 1e9, abs=0.006)
