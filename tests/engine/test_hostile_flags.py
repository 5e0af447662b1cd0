"""Flags that would hang the planner or exhaust memory end in a plan or a one-line error."""
import tracemalloc

import pytest

from app.cli import main
from engine.devices import simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.llama_args import parse_llama_args
from engine.plan.tensor_patterns import TensorPatternError, compile_pattern


@pytest.fixture(scope="module")
def moe_inventory(fixtures_dir):
    return Inventory.from_model_file(ModelFile(fixtures_dir / "llama-moe/Q4_K_M.gguf"))


def devices():
    return simulated_gpus("8GiB")


def test_a_backtracking_pattern_matches_in_linear_time():
    # Python's re takes ~2^n steps here: with n = 50,000 it would never finish
    assert compile_pattern(r"(a+)+$x").search("a" * 50_000 + "b") is None
    assert compile_pattern(r"blk\.(?!0\.)\d+\.ffn").search("blk.1.ffn_up")      # lookahead still works


def test_a_backtracking_override_plans(capsys, fixtures_dir):
    path = fixtures_dir / "llama-moe/Q4_K_M.gguf"
    assert main(["plan", str(path), "--sim-gpus", "8GiB", "-ot", r"(\w+)*(\w+)*(\w+)*\.Z=CPU"]) in (0, 1)


def test_huge_n_cpu_moe_makes_one_rule_per_model_layer(moe_inventory):
    tracemalloc.start()
    try:
        parsed = parse_llama_args(["--n-cpu-moe", "10000000"], moe_inventory, devices())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(parsed.overrides) == moe_inventory.n_layer and peak < 50 << 20


@pytest.mark.parametrize("value", ["nan", "inf", "1,nan", "-inf,1"])
def test_tensor_split_must_be_finite(moe_inventory, value):
    with pytest.raises(ValueError, match="proportions must be non-negative numbers"):
        parse_llama_args(["-ts", value], moe_inventory, simulated_gpus("8GiB,8GiB"))


@pytest.mark.parametrize("flag, value", [("-c", "100000000000000000000"), ("-c", "4294967296"),
                                         ("-ngl", "99999999999"), ("-ub", "9" * 5000)])
def test_integer_flags_out_of_range(moe_inventory, flag, value):
    with pytest.raises(ValueError) as info:
        parse_llama_args([flag, value], moe_inventory, devices())
    assert flag in str(info.value) and len(str(info.value)) < 200


def test_a_huge_context_is_a_plan_that_does_not_fit(capsys, fixtures_dir):
    path = fixtures_dir / "llama-moe/Q4_K_M.gguf"
    assert main(["plan", str(path), "--sim-gpus", "8GiB", "-ngl", "99", "-c", "1000000000"]) == 1
    assert "NO" in capsys.readouterr().out


def test_run_refuses_a_huge_context_before_allocating(capsys, fixtures_dir):
    path = fixtures_dir / "llama-moe/Q4_K_M.gguf"
    assert main(["run", "-m", str(path), "-p", "hi", "-n", "1", "-c", "1000000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "of KV cache" in err and "on CPU, which has" in err


@pytest.mark.parametrize("pattern", [r"(?=blk)(\w+)*\.Z", r"(a|aa)+(?!x)", r"(\w+\d*)+(?<=\.)x", r"((a+)b)*\1"])
def test_a_fallback_pattern_that_could_backtrack_exponentially_is_refused(pattern):
    with pytest.raises(TensorPatternError, match="exponential"):
        compile_pattern(pattern)


def test_fallback_patterns_without_nested_repeats_still_work():
    assert compile_pattern(r"blk\.(?!0\.)\d+\.ffn_(up|down)_exps").search("blk.12.ffn_down_exps")
    assert compile_pattern(r"(blk)\.\d+\.\1").search("blk.3.blk") is not None
