"""`offload-studio plan` says in one line whether the plan fits, the same line the designer shows,
in the table output and in --json."""
import json

import pytest

from app.cli import main
from engine.synth.writer import write_synthetic
from engine.units import format_bytes


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("models") / "ds3.gguf", "deepseek-v3", quant="Q4_K_M", sparse=True)


def plan_json(capsys, path, *argv):
    code = main(["plan", str(path), "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


def expected_over(devices) -> str:
    """The verdict rebuilt from the table's own numbers: each device over, by how much."""
    over = [d for d in devices if not d["fits"]]
    return "Does not fit: " + ", ".join(
        f"{d['device']} over by {format_bytes(d['total_bytes'] + d['margin_bytes'] - d['capacity_bytes'])}"
        for d in over) + "."


def test_a_plan_over_capacity_names_each_device_over_and_by_how_much(capsys, deepseek_v3):
    code, data = plan_json(capsys, deepseek_v3, "--sim-gpus", "4GiB,4GiB", "-ngl", "99", "-ts", "1,3")
    assert code == 1 and not data["fits"]
    over = [d["device"] for d in data["devices"] if not d["fits"]]
    assert "CUDA1" in over
    assert data["verdict"] == expected_over(data["devices"])
    main(["plan", str(deepseek_v3), "--sim-gpus", "4GiB,4GiB", "-ngl", "99", "-ts", "1,3"])
    lines = capsys.readouterr().out.splitlines()
    assert data["verdict"] in lines


def test_a_plan_that_fits_says_so_with_the_least_room_left(capsys, fixtures_dir):
    small = fixtures_dir / "llama-moe" / "Q4_K_M.gguf"
    code, data = plan_json(capsys, small, "--sim-gpus", "1GiB", "-ngl", "99")
    assert code == 0 and data["fits"]
    tightest = min(data["devices"], key=lambda d: d["capacity_bytes"] - d["total_bytes"] - d["margin_bytes"])
    free = tightest["capacity_bytes"] - tightest["total_bytes"] - tightest["margin_bytes"]
    assert data["verdict"] == (f"Fits: every device within its memory; least room on {tightest['device']}, "
                               f"{format_bytes(free)} free.")
    main(["plan", str(small), "--sim-gpus", "1GiB", "-ngl", "99"])
    assert data["verdict"] in capsys.readouterr().out.splitlines()
