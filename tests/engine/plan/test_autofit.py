"""Auto-fit: every plan fits the GPUs, and GPU memory goes first to what serves speed most."""
import time

import pytest

from engine.plan.autofit import AutoFitOptions, auto_fit, layer_ranges
from engine.devices import Device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory, Role
from engine.plan.llama_args import emit_llama_args, parse_llama_args
from engine.plan.memory import MemoryOptions, estimate_memory
from engine.run_config import RunConfig
from engine.synth.writer import write_synthetic

GIB = 1 << 30
MIB = 1 << 20
CPU = Device("CPU", "cpu", 1024 * GIB)
TINY_RUN = RunConfig(n_ctx=256, n_batch=64, n_ubatch=64)
NO_OVERHEAD = MemoryOptions(gpu_overhead_bytes=0, cpu_baseline_bytes=0)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Inventory:
    path = write_synthetic(tmp_path_factory.mktemp("autofit") / "deepseek-v3.gguf", "deepseek-v3", sparse=True)
    return Inventory.from_model_file(ModelFile(path))


@pytest.fixture(scope="module", params=["tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-mixtral", "tiny-llama-4",
                                        "tiny-gemma-3"])
def tiny(request, tmp_path_factory) -> Inventory:
    path = write_synthetic(tmp_path_factory.mktemp("autofit") / f"{request.param}.gguf", request.param, sparse=True)
    return Inventory.from_model_file(ModelFile(path))


def devices(spec: str) -> list[Device]:
    return [CPU] + simulated_gpus(spec)


def gpu_names(devs) -> set[str]:
    return {d.name for d in devs if d.is_gpu}


def assert_gpus_fit(result, devs):
    for d in result.estimate.devices:
        if d.device in gpu_names(devs):
            assert d.fits, f"{d.device} over by {-d.free_bytes} bytes"


def expert_tensors(inventory):
    return [t for t in inventory.tensors if t.role is Role.ROUTED_EXPERTS and t.n_experts]


def gpu_bytes(placement, name, gpus) -> int:
    return sum(n for d, n in placement.device_bytes(name).items() if d in gpus)


# --- fitting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["24GiB,24GiB,24GiB,48GiB", "24GiB", "12GiB,8GiB", "8GiB",
                                  "96GiB,96GiB,96GiB,96GiB"])
@pytest.mark.parametrize("split", [False, True])
def test_deepseek_plans_fit_every_gpu(deepseek, spec, split):
    devs = devices(spec)
    result = auto_fit(deepseek, devs, RunConfig(), AutoFitOptions(allow_expert_split=split))
    assert_gpus_fit(result, devs)
    # the estimate in the result is the one a caller would compute
    again = estimate_memory(deepseek, result.placement, RunConfig(), devs)
    assert again == result.estimate
    assert bool(result.placement.split_tensors()) <= split


def test_a_gpu_too_small_for_the_offloaded_matmuls_is_named(deepseek):
    """With every weight on the CPU, llama.cpp still runs the ubatch's matmuls on the first GPU,
    copying each weight into its compute buffer: a 2 GiB card cannot hold the largest expert."""
    devs = devices("2GiB")
    result = auto_fit(deepseek, devs, RunConfig())
    assert set(result.placement.layer_devices) == {"CPU"}
    gpu = result.estimate["CUDA0"]
    assert gpu.weights_bytes == 0 and not gpu.fits
    largest_expert_tensor = max(t.n_bytes for t in expert_tensors(deepseek))
    assert gpu.compute_bytes > largest_expert_tensor
    assert "CUDA0 is" in result.explanation and "--no-op-offload" in result.explanation
    small_ubatch = auto_fit(deepseek, devs, RunConfig(n_ubatch=16))
    assert small_ubatch.estimate["CUDA0"].compute_bytes < 64 * MIB


def test_a_model_that_fits_goes_entirely_to_the_gpus(tiny):
    devs = devices("24GiB,24GiB")
    result = auto_fit(tiny, devs, TINY_RUN)
    assert_gpus_fit(result, devs)
    for t in tiny.tensors:
        want_cpu = t.name.startswith("token_embd")      # llama.cpp's input layer stays on the CPU
        assert (result.placement.device_of(t.name) == "CPU") == want_cpu, t.name
    assert "All attention" in result.explanation
    if expert_tensors(tiny):
        assert "all routed experts on GPUs" in result.explanation


def test_the_biggest_gpu_that_fits_whole_models_spreads_layers_in_order(tiny):
    devs = devices("24GiB,24GiB,24GiB")
    placement = auto_fit(tiny, devs, TINY_RUN).placement
    order = [placement.layer_home_device(il) for il in range(tiny.n_layer)]
    assert order == sorted(order), "layers go to the GPUs in order, like -ts"


def test_without_a_gpu_everything_stays_on_the_cpu(deepseek):
    result = auto_fit(deepseek, [CPU], RunConfig())
    assert set(result.placement.weight_bytes()) == {"CPU"}
    assert result.explanation == "No GPU: everything on the CPU."


def test_a_gpu_too_small_for_its_context_gets_nothing(deepseek):
    devs = devices("400MiB")        # less than the CUDA context itself
    result = auto_fit(deepseek, devs, RunConfig())
    assert result.placement.weight_bytes()["CUDA0"] == 0
    assert "Nothing fits on the GPUs" in result.explanation


# --- what gets the GPU first ------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["24GiB,24GiB,24GiB,48GiB", "24GiB", "16GiB,8GiB"])
def test_dense_parts_and_kv_of_every_layer_come_before_any_expert(deepseek, spec):
    devs = devices(spec)
    placement = auto_fit(deepseek, devs, RunConfig()).placement
    gpus = gpu_names(devs)
    assert any(gpu_bytes(placement, t.name, gpus) for t in expert_tensors(deepseek))
    for t in deepseek.tensors:
        if t.role is not Role.ROUTED_EXPERTS and not t.name.startswith("token_embd"):
            assert placement.device_of(t.name) in gpus, t.name
    for il in range(deepseek.n_layer):
        home = placement.layer_home_device(il)        # where the KV cache lives
        assert home in gpus
        for t in deepseek.layers[il].tensors:
            if t.role is not Role.ROUTED_EXPERTS:
                assert placement.device_of(t.name) == home, f"{t.name} away from its layer's attention"


@pytest.mark.parametrize("spec", ["24GiB,24GiB,24GiB,48GiB", "24GiB", "40GiB", "96GiB,96GiB,96GiB,96GiB"])
def test_early_layers_get_their_experts_on_gpu_first(deepseek, spec):
    """Per kind of expert tensor, a later layer's is on a GPU while an earlier one's is not only
    where the earlier one is bigger (Q4_K_M gives some ffn_down_exps Q6_K, others Q4_K) and
    did not fit the space the later one filled."""
    devs = devices(spec)
    placement = auto_fit(deepseek, devs, RunConfig()).placement
    gpus = gpu_names(devs)
    by_group: dict[str, list] = {}
    for t in expert_tensors(deepseek):
        by_group.setdefault(t.group, []).append((t, gpu_bytes(placement, t.name, gpus) == t.n_bytes))
    n_on_gpu = 0
    for group, tensors in by_group.items():
        for i, (earlier, earlier_on_gpu) in enumerate(tensors):
            n_on_gpu += earlier_on_gpu
            for later, later_on_gpu in tensors[i + 1:]:
                if later_on_gpu and not earlier_on_gpu:
                    assert earlier.n_bytes > later.n_bytes, f"{later.name} on a GPU before {earlier.name}"
    assert n_on_gpu > 0


@pytest.mark.parametrize("spec", ["24GiB,24GiB,24GiB,48GiB", "24GiB", "40GiB"])
def test_gate_and_up_of_a_layer_stay_together(deepseek, spec):
    placement = auto_fit(deepseek, devices(spec), RunConfig()).placement
    for il in range(3, deepseek.n_layer):
        assert placement.device_of(f"blk.{il}.ffn_gate_exps.weight") == \
            placement.device_of(f"blk.{il}.ffn_up_exps.weight"), il


def test_four_gpus_put_a_quarter_of_the_experts_on_gpu(deepseek):
    devs = devices("24GiB,24GiB,24GiB,48GiB")
    result = auto_fit(deepseek, devs, RunConfig())
    total = sum(t.n_bytes for t in expert_tensors(deepseek))
    on_gpu = sum(gpu_bytes(result.placement, t.name, gpu_names(devs)) for t in expert_tensors(deepseek))
    # 120 GiB of GPU memory, of which ~8 GiB go to attention, KV, dense layers and buffers
    assert 0.25 < on_gpu / total < 0.32
    free = [d.free_bytes for d in result.estimate.devices if d.device != "CPU"]
    assert max(free) < 3 * GIB, "a whole expert tensor (2-3 GiB) more would have fit somewhere"
    assert result.explanation.startswith("All attention, KV and dense weights on 4 GPUs; routed experts of layers 3–")
    assert "% of expert bytes on GPU" in result.explanation and "free on CUDA" in result.explanation


def test_a_small_gpu_takes_whole_layers_from_the_end_like_ngl(deepseek):
    devs = devices("8GiB")
    result = auto_fit(deepseek, devs, RunConfig())
    layer_devices = result.placement.layer_devices
    first_gpu = layer_devices.index("CUDA0")
    assert 0 < first_gpu < deepseek.n_layer
    assert set(layer_devices[:first_gpu]) == {"CPU"} and set(layer_devices[first_gpu:]) == {"CUDA0"}
    assert all(result.placement.device_of(t.name) == "CPU" for t in expert_tensors(deepseek))
    n_gpu_layers = deepseek.n_layer + 1 - first_gpu
    assert f"(-ngl {n_gpu_layers})" in result.explanation
    emitted = emit_llama_args(result.placement, RunConfig(), devs)
    assert emitted.exact and emitted.args[:2] == ["-ngl", str(n_gpu_layers)]
    assert parse_llama_args(emitted.text, deepseek, devs).placement == result.placement


def test_the_margin_is_left_free_on_every_gpu(deepseek):
    devs = devices("24GiB,24GiB,24GiB,48GiB")
    margin = 3 * GIB
    options = MemoryOptions(gpu_margin_bytes=margin)
    result = auto_fit(deepseek, devs, RunConfig(), AutoFitOptions(options))
    for d in result.estimate.devices:
        if d.device != "CPU":
            assert d.total_bytes + margin <= d.capacity_bytes
    without = auto_fit(deepseek, devs, RunConfig())
    gpus = gpu_names(devs)
    assert sum(result.placement.weight_bytes()[g] for g in gpus) < sum(without.placement.weight_bytes()[g] for g in gpus)


def test_a_longer_context_leaves_less_room_for_experts(deepseek):
    devs = devices("24GiB,24GiB,24GiB,48GiB")
    short = auto_fit(deepseek, devs, RunConfig(n_ctx=4096))
    long = auto_fit(deepseek, devs, RunConfig(n_ctx=131072))
    assert_gpus_fit(long, devs)
    gpus = gpu_names(devs)
    assert sum(long.estimate[g].kv_bytes for g in gpus) > 30 * sum(short.estimate[g].kv_bytes for g in gpus)
    assert sum(long.placement.weight_bytes()[g] for g in gpus) < sum(short.placement.weight_bytes()[g] for g in gpus)


def test_expert_splits_fill_what_whole_tensors_leave(deepseek):
    devs = devices("24GiB,24GiB,24GiB,48GiB")
    whole = auto_fit(deepseek, devs, RunConfig())
    split = auto_fit(deepseek, devs, RunConfig(), AutoFitOptions(allow_expert_split=True))
    assert not whole.placement.split_tensors()
    assert split.placement.split_tensors()
    gpus = gpu_names(devs)
    assert sum(split.placement.weight_bytes()[g] for g in gpus) > sum(whole.placement.weight_bytes()[g] for g in gpus)
    for d in split.estimate.devices:
        if d.device in gpus:
            assert 0 <= d.free_bytes < 64 * MIB, "splits fill each GPU to within about one expert"
    assert not emit_llama_args(split.placement, RunConfig(), devs).exact


def test_partial_fit_on_tiny_models(tiny):
    """A GPU holding about half of a tiny model: it still fits, dense parts first."""
    rc = TINY_RUN
    total = sum(t.n_bytes for t in tiny.tensors if not t.name.startswith("token_embd"))
    devs = [CPU, Device("CUDA0", "gpu", total // 2 + 4 * MIB, simulated=True)]
    result = auto_fit(tiny, devs, rc, AutoFitOptions(NO_OVERHEAD))
    assert_gpus_fit(result, devs)
    assert 0 < result.placement.weight_bytes()["CUDA0"] <= total // 2 + 4 * MIB


def test_auto_fit_is_fast_on_deepseek(deepseek):
    devs = devices("24GiB,24GiB,24GiB,48GiB")
    auto_fit(deepseek, devs, RunConfig())
    start = time.perf_counter()
    auto_fit(deepseek, devs, RunConfig())
    assert time.perf_counter() - start < 1.0     # about 10 ms on a laptop core; generous for loaded CI


def test_layer_ranges():
    assert layer_ranges([3, 4, 5, 9, 11, 12]) == "3–5, 9, 11–12"
    assert layer_ranges([7]) == "7"
    assert layer_ranges([]) == ""
