import json
import shlex

import pytest

from app.cli import main, split_llama_args, command_parser
from engine.gguf.model_file import ModelFile
from engine.synth.writer import write_synthetic

USER_LINES = [
    "-ngl 27 -ts 17,20,21,45",
    r'-ngl 100 -ts 17,20,21,45 -ot "ffn_down_exps=CPU,blk\.4[0-9]\.ffn_.*_exps=CPU,blk\.5[0-9]\.ffn_.*_exps=CPU,'
    r'blk\.6[0-9]\.ffn_.*_exps=CPU"',
    "--n-gpu-layers 63 --override-tensor exps=CPU -mla 2 -fa -amb 512 -fmoe --ctx-size 16384 -ctk f16",
]
GPUS = "24GiB,24GiB,24GiB,48GiB"


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("models") / "ds3.gguf", "deepseek-v3", quant="Q4_K_M", sparse=True)


def run_json(capsys, argv):
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_inspect_json(capsys, fixtures_dir):
    code, data = run_json(capsys, ["inspect", str(fixtures_dir / "llama-moe/Q4_K_M.gguf"), "--json"])
    assert code == 0 and data["architecture"] == "llama"
    assert data["quant_mix"]["Q4_K"]["tensors"] == 13
    assert data["tensor_bytes"] == sum(t["bytes"] for t in data["tensors"])
    up = next(t for t in data["tensors"] if t["name"] == "blk.0.ffn_up_exps.weight")
    assert (up["experts"], up["expert_bytes"]) == (4, up["bytes"] // 4)


@pytest.mark.parametrize("line", USER_LINES)
def test_plan_user_command_lines(capsys, deepseek_v3, line):
    code, data = run_json(capsys, ["plan", str(deepseek_v3), "--sim-gpus", GPUS, "--json", *shlex.split(line)])
    devices = {d["device"]: d for d in data["devices"]}
    assert set(devices) == {"CPU", "CUDA0", "CUDA1", "CUDA2", "CUDA3"}
    assert sum(d["weights_bytes"] for d in devices.values()) == ModelFile(deepseek_v3).tensor_bytes
    assert code == (0 if data["fits"] else 1)
    # the emitted line is equivalent: planning it again gives the same per-device bytes
    code2, again = run_json(capsys, ["plan", str(deepseek_v3), "--sim-gpus", GPUS, "--json",
                                     *shlex.split(data["command_line"])])
    assert [d["weights_bytes"] for d in again["devices"]] == [d["weights_bytes"] for d in data["devices"]]
    assert [d["kv_bytes"] for d in again["devices"]] == [d["kv_bytes"] for d in data["devices"]]


def test_plan_all_experts_on_cpu_puts_only_dense_weights_on_the_gpu(capsys, deepseek_v3):
    code, data = run_json(capsys, ["plan", str(deepseek_v3), "--sim-gpus", "24GiB", "--json", "-ngl", "99",
                                   "--cpu-moe", "-c", "32768"])
    gpu = next(d for d in data["devices"] if d["device"] == "CUDA0")
    assert gpu["kv_bytes"] == 2196 << 20              # MLA cache at 32768, f16 (llama.cpp's figure)
    assert gpu["fits"]
    assert code == (0 if data["fits"] else 1)
    assert "--cpu-moe" in data["command_line"] or "exps=CPU" in data["command_line"]


def test_plan_reports_ik_flags(capsys, deepseek_v3):
    code, data = run_json(capsys, ["plan", str(deepseek_v3), "--sim-gpus", "24GiB", "--json",
                                   *shlex.split(USER_LINES[2])])
    statuses = {f["flag"]: f["status"] for f in data["flags"]}
    assert statuses["-mla"] == "ignored" and statuses["-fmoe"] == "ignored"


def test_plan_table_output(capsys, deepseek_v3):
    main(["plan", str(deepseek_v3), "--sim-gpus", GPUS, *shlex.split(USER_LINES[0])])
    out = capsys.readouterr().out
    assert "weights MiB" in out and "CUDA3" in out and "llama.cpp equivalent:" in out


def test_unknown_buffer_is_a_one_line_error(capsys, deepseek_v3):
    assert main(["plan", str(deepseek_v3), "--sim-gpus", "24GiB", "-ot", "exps=CUDA7"]) == 2
    err = capsys.readouterr().err
    assert "CUDA7" in err and "CPU" in err and "Traceback" not in err


def test_bad_file_is_a_one_line_error(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    assert main(["inspect", str(bad)]) == 2
    assert capsys.readouterr().err.strip().endswith("not a GGUF file (starts with b'not ', expected b'GGUF')")


def test_our_options_are_separated_from_llama_flags():
    _, parser = command_parser("bench")
    ours, theirs = split_llama_args(parser, ["-m", "x.gguf", "-ngl", "99", "-p", "64", "-ot", "exps=CPU", "--planner"])
    assert ours == ["-m", "x.gguf", "-p", "64", "--planner"]
    assert theirs == ["-ngl", "99", "-ot", "exps=CPU"]


def test_bench_planner(capsys, deepseek_v3):
    assert main(["bench", "-m", str(deepseek_v3), "--planner", "-ngl", "27", "-ts", "17,20,21,45"]) == 0
    out = capsys.readouterr().out
    assert "full estimate" in out and "move one expert + re-estimate" in out


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["synth", "--preset", "tiny-qwen3-moe", "--quant", "Q4_K_M", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    code, data = run_json(capsys, ["inspect", str(out), "--json"])
    assert data["architecture"] == "qwen3moe" and not data["notes"]
