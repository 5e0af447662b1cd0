"""Any placement gives logits bit-identical to all-CPU on the strict simulated GPUs, weights
really live where placed, and activations really move (and are counted)."""
import numpy as np
import pytest

from engine.backends import Weight
from engine.backends.dispatch import NoCudaBackendError, PlacedOps, SplitExpertWeight, make_backends
from engine.backends.strict import DeviceMismatchError, StrictSimBackend
from engine.devices import Device, cpu_device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.memory import kv_cache_bytes
from engine.plan.placement import Placement, TensorRef
from engine.run.model import Model
from engine.run_config import RunConfig
from engine.synth.writer import write_synthetic

DEVICES = [cpu_device()] + simulated_gpus("8GiB,8GiB,16GiB")
RUN = RunConfig(n_ctx=256, n_ubatch=16, type_k="f32", type_v="f32")
PRESETS = ["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-llama-4", "tiny-gemma-3", "tiny-mixtral"]
# every family and flag among the llama.cpp fixtures: dense llama, qwen3 (q/k norms, NEOX), MLA
FIXTURES = [("llama-dense", "Q4_K_M"), ("qwen3", "Q5_K_M"), ("deepseek2", "Q4_K_M"), ("llama4", "Q4_K_M")]


@pytest.fixture(scope="module", params=PRESETS + [f"{f}/{v}" for f, v in FIXTURES])
def model_path(request, tmp_path_factory, fixtures_dir):
    if "/" in request.param:
        return fixtures_dir / f"{request.param}.gguf"
    return write_synthetic(tmp_path_factory.mktemp("placed") / f"{request.param}.gguf", request.param,
                           quant="Q4_K_M", seed=7)


def logits_of(path, placement, tokens, run=RUN):
    model = Model.load(path, run, placement=placement)
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
    for _ in range(2):
        placement = random_placement(inventory, rng)
        assert placement.split_tensors() or inventory.n_expert == 0
        logits, model = logits_of(model_path, placement, tokens)
        assert np.array_equal(logits, reference)
        # each simulated GPU holds exactly the weight bytes the planner puts there (2-D and 3-D
        # tensors; the 1-D ones go to the home device of their layer)
        planned = placement.weight_bytes()
        small = {d: 0 for d in planned}
        for t in inventory.tensors:
            if len(t.shape) == 1:
                small[placement.device_of(t.name)] += t.n_bytes
        for device, allocated in model.ops.allocated_bytes().items():
            if device != "CPU":
                assert allocated == planned[device] - small[device]
        assert model.ops.transfers > 0 and model.ops.transfer_bytes > 0


def test_everything_on_one_simulated_gpu_keeps_every_array_there(model_path):
    """All layers on CUDA1 (the token table stays on the CPU, as llama.cpp keeps it): the only
    moves are the embedded rows going in, and for a tied output the head's matmul on the CPU."""
    inventory = Inventory.from_model_file(ModelFile(model_path))
    placement = Placement(inventory, DEVICES, ["CUDA1"] * (inventory.n_layer + 1))
    tokens = np.random.default_rng(3).integers(3, inventory.hparams.n_vocab, 12).astype(np.int32)
    reference, _ = logits_of(model_path, None, tokens)
    logits, model = logits_of(model_path, placement, tokens)
    assert np.array_equal(logits, reference)
    tied = "output.weight" not in model.file.tensors
    assert model.ops.transfers == 4 * (1 + (2 if tied else 0))         # 4 evaluations
    assert all(isinstance(b, StrictSimBackend) for d, b in model.ops.backends.items() if d != "CPU")
    assert all(lw.attn_norm.device == model.ops.backends["CUDA1"].device for lw in model.layers
               if "attn_norm" in lw)


def test_llama_cpp_rounding_is_placement_independent_too(fixtures_dir):
    path = fixtures_dir / "qwen3moe" / "Q4_K_M.gguf"
    inventory = Inventory.from_model_file(ModelFile(path))
    run = RUN.replace(activations="llama.cpp", type_k="q8_0", type_v="q8_0")
    tokens = np.load(fixtures_dir / "qwen3moe" / "tokens.npy")[:20]
    reference, _ = logits_of(path, None, tokens, run)
    logits, _ = logits_of(path, random_placement(inventory, np.random.default_rng(5)), tokens, run)
    assert np.array_equal(logits, reference)


# --- the MoE layer's moves ---------------------------------------------------------------------------


def test_a_moe_layer_moves_once_in_and_once_out_per_expert_device(fixtures_dir):
    """Decode one token with its experts split over three devices and everything else on the CPU:
    each device holding a selected expert costs exactly two moves."""
    path = fixtures_dir / "llama-moe" / "F32.gguf"
    inventory = Inventory.from_model_file(ModelFile(path))
    placement = Placement(inventory, DEVICES, ["CPU"] * (inventory.n_layer + 1))
    names = ["CPU", "CUDA0", "CUDA1", "CUDA2"]
    for t in inventory.tensors:
        for e in range(t.n_experts):
            placement.assign(TensorRef(t.name, frozenset({e})), names[e % 4])
    model = Model.load(path, RUN, placement=placement)
    cache = model.new_cache()
    toks = np.load(fixtures_dir / "llama-moe" / "tokens.npy")
    model.eval_logits(toks[:5], cache)
    before_counts, before_moves = model.expert_counts.copy(), model.ops.transfers
    model.eval_logits(toks[5:6], cache)
    chosen = [np.nonzero(model.expert_counts[il] - before_counts[il])[0] for il in range(inventory.n_layer)]
    devices_used = sum(len({names[e % 4] for e in experts} - {"CPU"}) for experts in chosen)
    assert model.ops.transfers - before_moves == 2 * devices_used


def test_split_experts_are_uploaded_as_parts():
    backends = make_backends(DEVICES)
    data = np.arange(4 * 2 * 8, dtype=np.float32).reshape(4, 2, 8).view(np.uint8)
    from engine.backends.dispatch import place_weight
    w = place_weight(Weight("blk.0.ffn_up_exps.weight", data, 0, (4, 2, 8)), ("CUDA0", "CPU", "CUDA0", "CUDA2"),
                     backends)
    assert isinstance(w, SplitExpertWeight)
    assert {d: p.shape for d, p in w.parts.items()} == {"CUDA0": (2, 2, 8), "CPU": (1, 2, 8), "CUDA2": (1, 2, 8)}
    assert w.local_index == (0, 0, 1, 0)
    assert backends["CUDA0"].allocated_bytes == 2 * 2 * 8 * 4 and backends["CUDA1"].allocated_bytes == 0


# --- strictness -------------------------------------------------------------------------------------


def test_a_weight_used_on_the_wrong_device_is_an_error(fixtures_dir):
    model = Model.load(fixtures_dir / "llama-dense/F32.gguf", RUN, placement=None)
    backend = StrictSimBackend("CUDA1")
    w = model.layers[0].attn_q
    placed = StrictSimBackend("CUDA0").upload(w)
    with pytest.raises(DeviceMismatchError, match="lives on CUDA0 but was used on CUDA1"):
        backend.matmul(backend.to_device(np.zeros((1, w.n_cols), np.float32)), placed)


def test_host_arrays_and_other_devices_arrays_are_refused():
    gpu0, gpu1 = StrictSimBackend("CUDA0", index=0), StrictSimBackend("CUDA1", index=1)
    x = np.ones((1, 4), np.float32)
    w = gpu0.upload(Weight("w", np.ones((2, 4), np.float32).view(np.uint8), 0, (2, 4)))
    with pytest.raises(DeviceMismatchError, match="not one of its own arrays"):
        gpu0.matmul(x, w)
    with pytest.raises(DeviceMismatchError, match="was used on CUDA0"):
        gpu0.matmul(gpu1.to_device(x), w)
    y = gpu0.matmul(gpu0.to_device(x), w)
    with pytest.raises(RuntimeError, match="Can't convert"):
        np.asarray(y)                       # no implicit way back to NumPy
    with pytest.raises(ValueError):
        y + gpu1.to_device(np.ones((1, 2), np.float32))     # no op across devices
    assert np.array_equal(gpu0.to_host(y), np.full((1, 2), 4.0, np.float32))


def test_moves_are_counted_with_their_bytes():
    ops = PlacedOps(make_backends(DEVICES))
    x = ops.backends["CPU"].to_device(np.ones((3, 5), np.float32))
    on_gpu = ops.move(x, "CPU", "CUDA2")
    assert (ops.transfers, ops.transfer_bytes) == (1, 60)
    assert ops.move(on_gpu, "CUDA2", "CUDA2") is on_gpu and ops.transfers == 1


def test_a_real_gpu_without_the_cuda_backend_is_refused(fixtures_dir):
    mf = ModelFile(fixtures_dir / "llama-dense/F32.gguf")
    real = [cpu_device(), Device("CUDA0", "gpu", 24 << 30, "NVIDIA RTX 4090")]
    placement = Placement(Inventory.from_model_file(mf), real, ["CUDA0"] * 3)
    with pytest.raises(NoCudaBackendError, match="CUDA0 .NVIDIA RTX 4090. needs the CUDA backend"):
        Model.load(mf, RUN, placement=placement)


def test_kv_cache_size_matches_the_planner(model_path):
    model = Model.load(model_path, RUN)
    assert model.new_cache().nbytes == kv_cache_bytes(model.hparams, RUN)
