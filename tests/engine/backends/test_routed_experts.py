"""The CPU's grouped routed experts (CpuBackend.routed_experts, one op per device segment of a
MoE layer) give exactly the numbers of one expert at a time (expert_feed_forward), and the
dispatcher uses them where it can: all-CPU, hybrid placements with experts on a simulated GPU,
both activation modes, the MoE fixtures of every family."""
import forward_parity as parity
import numpy as np
import pytest
from ggml_weights import random_weight
from gguf.constants import GGMLQuantizationType as QType

from engine.arch.layers import expert_feed_forward, geglu, swiglu
from engine.backends import Weight
from engine.backends.cpu import CpuBackend
from engine.devices import cpu_device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.placement import Placement, TensorRef
from engine.run.model import Model
from engine.run_config import RunConfig

N_EMBD, N_FF, N_EXPERT = 512, 256, 6
MOE_FIXTURES = [("qwen3moe", "F16"), ("qwen3moe", "Q4_K_M"), ("llama-moe", "F32"), ("llama-moe", "Q4_K_M"),
                ("llama4", "Q4_K_M"), ("deepseek2", "Q4_K_M")]


class PerExpertCpu(CpuBackend):
    """The CPU without the grouped op: the dispatcher runs one expert at a time."""

    def routed_experts(self, *args):
        return None


class CountingCpu(CpuBackend):
    calls = 0

    def routed_experts(self, *args):
        y = super().routed_experts(*args)
        CountingCpu.calls += y is not None
        return y


def expert_weight(rng, name: str, type_name: str, n_rows: int, n_cols: int) -> Weight:
    data = np.stack([random_weight(rng, type_name, n_rows, n_cols) for _ in range(N_EXPERT)])
    data.setflags(write=False)
    return Weight(name, data, int(QType[type_name]), (N_EXPERT, n_rows, n_cols))


@pytest.mark.parametrize("activations", ["llama.cpp", "f32"])
@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q5_0", "Q4_0"), ("F16", "F16", "F32")],
                         ids="-".join)
@pytest.mark.parametrize("counts", [[1, 1, 1, 1], [4, 1, 7, 2]], ids=["decode", "prefill"])
@pytest.mark.parametrize("activation", [swiglu, geglu], ids=lambda f: f.__name__)
def test_grouped_experts_are_bit_identical_to_one_expert_at_a_time(activations, types, counts, activation):
    rng = np.random.default_rng(11)
    gate = expert_weight(rng, "gate", types[0], N_FF, N_EMBD)
    up = expert_weight(rng, "up", types[1], N_FF, N_EMBD)
    down = expert_weight(rng, "down", types[2], N_EMBD, N_FF)
    spans, first = [], 0
    for expert, n in zip([5, 0, 3, 2], counts):
        spans.append((expert, first, first + n))
        first += n
    x = (rng.standard_normal((first, N_EMBD)) * 0.1).astype(np.float32)
    backend = CpuBackend(activations)
    grouped = backend.routed_experts(x, spans, gate, up, down, activation)
    one_at_a_time = np.concatenate([expert_feed_forward(backend, x[a:b], gate, up, down, e, activation)
                                    for e, a, b in spans])
    assert np.array_equal(grouped.view(np.uint32), one_at_a_time.view(np.uint32))


def test_types_without_grouped_kernels_are_left_to_the_dispatcher():
    rng = np.random.default_rng(3)
    slow = expert_weight(rng, "gate", "IQ2_XXS", N_FF, N_EMBD)
    down = expert_weight(rng, "down", "Q4_K", N_EMBD, N_FF)
    x = rng.standard_normal((2, N_EMBD)).astype(np.float32)
    assert CpuBackend().routed_experts(x, [(1, 0, 2)], slow, slow, down, swiglu) is None


def logits_of(model: Model, toks: np.ndarray) -> np.ndarray:
    """A prefill of all but 3 tokens, then 3 decode steps."""
    cache = model.new_cache()
    steps = [model.eval_logits(toks[:-3], cache)]
    steps += [model.eval_logits(toks[i:i + 1], cache) for i in range(len(toks) - 3, len(toks))]
    return np.concatenate(steps)


@pytest.mark.parametrize("activations", ["llama.cpp", "f32"])
@pytest.mark.parametrize("fixture,variant", MOE_FIXTURES)
def test_moe_fixtures_give_the_logits_of_one_expert_at_a_time(fixtures_dir, fixture, variant, activations):
    path = fixtures_dir / fixture / f"{variant}.gguf"
    run = RunConfig(n_ctx=256, n_ubatch=512, type_k="f32", type_v="f32", activations=activations)
    toks = parity.tokens(fixtures_dir / fixture)
    CountingCpu.calls = 0
    grouped = logits_of(Model.load(path, run, backend=CountingCpu(activations)), toks)
    assert CountingCpu.calls > 0
    reference = logits_of(Model.load(path, run, backend=PerExpertCpu(activations)), toks)
    assert np.array_equal(grouped, reference)


@pytest.mark.parametrize("activations", ["llama.cpp", "f32"])
def test_hybrid_placements_group_the_cpu_experts_and_match_all_cpu(fixtures_dir, monkeypatch, activations):
    """Half of every layer's experts on a simulated GPU (one expert at a time there), the other
    half grouped on the CPU: the logits of all-CPU, one expert at a time."""
    path = fixtures_dir / "qwen3moe" / "Q4_K_M.gguf"
    run = RunConfig(n_ctx=256, n_ubatch=512, type_k="f32", type_v="f32", activations=activations)
    toks = parity.tokens(fixtures_dir / "qwen3moe")
    reference = logits_of(Model.load(path, run, backend=PerExpertCpu(activations)), toks)
    inventory = Inventory.from_model_file(ModelFile(path))
    devices = [cpu_device()] + simulated_gpus("8GiB")
    placement = Placement(inventory, devices, ["CPU"] * (inventory.n_layer + 1))
    for t in inventory.tensors:
        for e in range(1, t.n_experts, 2):
            placement.assign(TensorRef(t.name, frozenset({e})), "CUDA0")
    monkeypatch.setattr("engine.backends.dispatch.CpuBackend", CountingCpu)
    CountingCpu.calls = 0
    model = Model.load(path, run, placement=placement)
    assert np.array_equal(logits_of(model, toks), reference)
    assert CountingCpu.calls > 0 and model.ops.transfers > 0
