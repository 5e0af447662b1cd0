"""Any placement gives logits bit-identical to all-CPU, and weights really live where placed."""
import numpy as np
import pytest

from engine.devices import cpu_device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.memory import kv_cache_bytes
from engine.run.model import Model
from engine.backends.dispatch import DeviceMismatchError, NoCudaBackendError, SimulatedGpuBackend
from engine.plan.placement import Placement, TensorRef
from engine.run_config import RunConfig
from engine.synth.writer import write_synthetic
from engine.devices import Device

DEVICES = [cpu_device()] + simulated_gpus("8GiB,8GiB,16GiB")
RUN = RunConfig(n_ctx=256, n_ubatch=16, type_k="f32", type_v="f32")


@pytest.fixture(scope="module", params=["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-llama-4", "tiny-gemma-3"])
def model_path(request, tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("placed") / f"{request.param}.gguf", request.param,
                           quant="Q4_K_M", seed=7)


def logits_of(path, placement, tokens):
    model = Model.load(path, RUN, placement=placement)
    cache = model.new_cache()
    prefill = model.eval_logits(tokens[:-3], cache)
    steps = [model.eval_logits(tokens[i:i + 1], cache) for i in range(len(tokens) - 3, len(tokens))]
    return np.concatenate([prefill, *steps]), model


def random_placement(inventory, rng):
    names = [d.name for d in DEVICES]
    placement = Placement(inventory, DEVICES, [str(rng.choice(names)) for _ in range(inventory.n_layer + 1)])
    for t in inventory.tensors:
        if t.n_experts and rng.random() < 0.6:          # split this tensor's experts over devices
            for e in range(t.n_experts):
                placement.assign(TensorRef(t.name, frozenset({e})), str(rng.choice(names)))
        elif rng.random() < 0.3:
            placement.assign(TensorRef(t.name), str(rng.choice(names)))
    return placement


def test_random_placements_give_bit_identical_logits(model_path):
    mf = ModelFile(model_path)
    inventory = Inventory.from_model_file(mf)
    tokens = np.random.default_rng(1).integers(3, inventory.hparams.n_vocab, 40).astype(np.int32)
    reference, _ = logits_of(model_path, None, tokens)
    rng = np.random.default_rng(2024)
    for _ in range(4):
        placement = random_placement(inventory, rng)
        assert placement.split_tensors() or inventory.n_expert == 0
        logits, model = logits_of(model_path, placement, tokens)
        assert np.array_equal(logits, reference)
        # each simulated GPU holds exactly the weight bytes the planner puts there (2-D and 3-D tensors)
        planned = placement.weight_bytes()
        small = {d: 0 for d in planned}
        for t in inventory.tensors:
            if len(t.shape) == 1:
                small[placement.device_of(t.name)] += t.n_bytes
        for device, allocated in model.ops.allocated_bytes().items():
            if device != "CPU":
                assert allocated == planned[device] - small[device]
        assert model.ops.transfers > 0


def test_a_weight_used_on_the_wrong_device_is_an_error(fixtures_dir):
    model = Model.load(fixtures_dir / "llama-dense/F32.gguf", RUN, placement=None)
    backend = SimulatedGpuBackend("CUDA1")
    from engine.backends.dispatch import PlacedWeight
    w = model.layers[0].attn_q
    placed = PlacedWeight(w.name, w.data, w.ggml_type, w.shape, "CUDA0")
    with pytest.raises(DeviceMismatchError, match="lives on CUDA0 but was used on CUDA1"):
        backend.matmul(np.zeros((1, w.n_cols), np.float32), placed)


def test_a_real_gpu_without_the_cuda_backend_is_refused(fixtures_dir):
    mf = ModelFile(fixtures_dir / "llama-dense/F32.gguf")
    real = [cpu_device(), Device("CUDA0", "gpu", 24 << 30, "NVIDIA RTX 4090")]
    placement = Placement(Inventory.from_model_file(mf), real, ["CUDA0"] * 3)
    with pytest.raises(NoCudaBackendError, match="CUDA0 .NVIDIA RTX 4090. needs the CUDA backend"):
        Model.load(mf, RUN, placement=placement)


def test_kv_cache_size_matches_the_planner(model_path):
    model = Model.load(model_path, RUN)
    assert model.new_cache().nbytes == kv_cache_bytes(model.hparams, RUN)
