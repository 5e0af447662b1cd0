"""The CUDA backend on emulated GPUs: llama.cpp fixture parity (check 1 of the fixtures README)
with the layers spread over two emulated devices, a hybrid placement with the routed experts on
the CPU (llama.cpp's -ot exps=CPU), and the command line's --emulate-cuda. The same parity runs
on a real GPU through CuPy where there is one (marked gpu)."""
from __future__ import annotations

import numpy as np
import pytest

from forward_parity import INCR_STEPS, batch_and_incremental, rel, row_rel, tokens
from engine.backends.cuda import CudaBackend
from engine.devices import Device, cpu_device, emulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.placement import Placement, TensorRef
from engine.run.model import Model
from engine.run_config import RunConfig

EXACT = RunConfig(n_ctx=512, n_ubatch=512, type_k="f32", type_v="f32", activations="f32")
FIXTURES = [("llama-dense", "Q4_K_M"),
            pytest.param("qwen3moe", "Q4_K_M", marks=pytest.mark.slow),
            pytest.param("gemma3", "Q8_0", marks=pytest.mark.slow),
            pytest.param("llama4", "Q4_K_M", marks=pytest.mark.slow),
            pytest.param("deepseek2", "Q4_K_M", marks=pytest.mark.slow)]


def split_over(inventory, devices, names):
    """Layers (and the output head) cut into len(names) contiguous runs, one per device."""
    n = inventory.n_layer + 1
    return Placement(inventory, devices, [names[i * len(names) // n] for i in range(n)])


def assert_check_1(model, fixture_dir, variant):
    batch, incr = batch_and_incremental(model, tokens(fixture_dir))
    ref = np.load(fixture_dir / f"{variant}.logits_batch_f32ref.npy")
    found = dict(batch=rel(batch, ref), worst=float(row_rel(batch, ref).max()),
                 incr=rel(incr, ref[-INCR_STEPS:]), self=rel(incr, batch[-INCR_STEPS:]))
    assert found["batch"] <= 1e-3 and found["worst"] <= 3e-3 and found["incr"] <= 1e-3, found
    assert found["self"] <= 1e-4, found


@pytest.mark.parametrize("fixture, variant", FIXTURES)
def test_fixture_parity_on_two_emulated_gpus(fixtures_dir, fixture, variant):
    path = fixtures_dir / fixture / f"{variant}.gguf"
    inventory = Inventory.from_model_file(ModelFile(path))
    placement = split_over(inventory, [cpu_device()] + emulated_gpus("4GiB,4GiB"), ["CUDA0", "CUDA1"])
    model = Model.load(path, EXACT, placement=placement)
    assert {type(model.ops.backends[d]) for d in ("CUDA0", "CUDA1")} == {CudaBackend}
    assert_check_1(model, fixtures_dir / fixture, variant)
    planned = placement.weight_bytes()
    small = {d: 0 for d in planned}
    for t in inventory.tensors:
        if len(t.shape) == 1:
            small[placement.device_of(t.name)] += t.n_bytes
    for device in ("CUDA0", "CUDA1"):            # each device holds the weight bytes the planner puts there
        assert model.ops.allocated_bytes()[device] == planned[device] - small[device]


def test_hybrid_routed_experts_on_the_cpu(fixtures_dir):
    """Attention, norms and router on an emulated GPU, routed experts on the CPU (-ot exps=CPU)."""
    fixture_dir = fixtures_dir / "qwen3moe"
    path = fixture_dir / "Q4_K_M.gguf"
    inventory = Inventory.from_model_file(ModelFile(path))
    placement = split_over(inventory, [cpu_device()] + emulated_gpus("4GiB"), ["CUDA0"])
    for t in inventory.tensors:
        if t.n_experts:
            placement.assign(TensorRef(t.name), "CPU")
    model = Model.load(path, EXACT, placement=placement)
    assert_check_1(model, fixture_dir, "Q4_K_M")
    assert model.ops.transfers > 0


def test_llama_cpp_activations_round_through_q8_1(fixtures_dir):
    """With activations="llama.cpp" decode takes the integer-dot-product path: close to the exact
    logits (the fixtures' check 2 tolerance of this file), and not identical to them."""
    fixture_dir = fixtures_dir / "llama-dense"
    path = fixture_dir / "Q4_0.gguf"
    inventory = Inventory.from_model_file(ModelFile(path))
    placement = split_over(inventory, [cpu_device()] + emulated_gpus("4GiB"), ["CUDA0"])
    toks = tokens(fixture_dir)[:12]
    logits = {}
    for activations in ("f32", "llama.cpp"):
        model = Model.load(path, EXACT.replace(activations=activations, type_k="f16", type_v="f16"), placement=placement)
        cache = model.new_cache()
        logits[activations] = np.concatenate([model.eval_logits(toks[i:i + 1], cache) for i in range(len(toks))])
    gap = rel(logits["llama.cpp"], logits["f32"])
    assert 1e-5 < gap < 0.1, gap


def test_llama_cpp_settings_land_within_the_default_logits_tolerance(fixtures_dir):
    """Check 2 of the fixtures README on an emulated GPU: f16 cache, q8_1 decode activations."""
    from forward_parity import kl_mean, meta

    fixture_dir = fixtures_dir / "llama-dense"
    path = fixture_dir / "Q4_K_M.gguf"
    inventory = Inventory.from_model_file(ModelFile(path))
    placement = split_over(inventory, [cpu_device()] + emulated_gpus("4GiB"), ["CUDA0"])
    model = Model.load(path, EXACT.replace(activations="llama.cpp", type_k="f16", type_v="f16"), placement=placement)
    batch, incr = batch_and_incremental(model, tokens(fixture_dir))
    tolerance = meta(fixture_dir)["variants"]["Q4_K_M"]["recommended_tolerance"]
    for name, mine in (("logits_batch", batch), ("logits_incr", incr)):
        ref, tol = np.load(fixture_dir / f"Q4_K_M.{name}.npy"), tolerance[name]
        keep = [r for r in range(len(ref)) if r not in tol["exclude_rows"]]
        found = (rel(mine[keep], ref[keep]), float(np.median(row_rel(mine[keep], ref[keep]))), kl_mean(mine[keep], ref[keep]))
        assert found[0] <= tol["rel"] and found[1] <= tol["row_median_rel"] and found[2] <= tol["kl_mean"], (name, found)


def test_quantized_keys_meet_q8_1_queries_with_llama_cpp_activations():
    """With llama.cpp's rounding a q8_0 cache is read by q8_1-rounded queries (its CUDA attention);
    with exact activations the query is used as it is."""
    from engine.arch.base import AttentionKind
    from engine.backends.cuda import emulated_backend, q8_1_rounded
    from engine.backends.protocol import AttentionStep, KVLayout

    rng = np.random.default_rng(4)
    q = rng.standard_normal((3, 4, 64)).astype(np.float32)
    k, v = (rng.standard_normal((3, 2, 64)).astype(np.float32) for _ in range(2))
    positions = np.arange(3, dtype=np.int64)
    step = AttentionStep(positions, 3, AttentionKind.FULL, 0)
    outs = {}
    for activations, query in (("llama.cpp", q), ("f32", None)):
        b = emulated_backend("CUDA0", activations)
        if query is None:
            query = b.to_host(q8_1_rounded(b.namespace, b.to_device(q)))
        kv = b.new_kv_layer(KVLayout(8, 128, 128, "q8_0", "q8_0"))
        outs[activations] = b.to_host(b.attend(kv, step, b.to_device(positions), b.to_device(query), b.to_device(k),
                                               b.to_device(v), 0.125))
    assert not np.array_equal(q8_1_rounded(np, q), q)
    np.testing.assert_allclose(outs["llama.cpp"], outs["f32"], rtol=1e-6, atol=1e-7)


def test_run_command_on_emulated_gpus(fixtures_dir, capsys):
    from app.cli import main

    path = fixtures_dir / "llama-dense" / "Q8_0.gguf"
    code = main(["run", "-m", str(path), "-p", "hi", "-n", "4", "--temp", "0", "--emulate-cuda", "1GiB,1GiB",
                 "-ngl", "99", "-ts", "1,1"])
    assert code in (0, None)
    assert "generated" in capsys.readouterr().err


def test_emulated_devices_plan_like_gpus():
    devices = emulated_gpus("24GiB,12GiB")
    assert [(d.name, d.is_gpu, d.emulated, d.total_bytes) for d in devices] == \
        [("CUDA0", True, True, 24 << 30), ("CUDA1", True, True, 12 << 30)]


@pytest.mark.gpu
@pytest.mark.parametrize("fixture, variant", [("llama-dense", "Q4_K_M"), ("qwen3moe", "Q4_K_M"), ("deepseek2", "Q4_K_M")])
def test_fixture_parity_on_the_gpu_and_hybrid(fixtures_dir, fixture, variant):
    """On a real GPU: everything on CUDA0, then the routed experts on the CPU."""
    path = fixtures_dir / fixture / f"{variant}.gguf"
    inventory = Inventory.from_model_file(ModelFile(path))
    devices = [cpu_device(), Device("CUDA0", "gpu", 16 << 30, "GPU")]
    placement = split_over(inventory, devices, ["CUDA0"])
    assert_check_1(Model.load(path, EXACT, placement=placement), fixtures_dir / fixture, variant)
    for t in inventory.tensors:
        if t.n_experts:
            placement.assign(TensorRef(t.name), "CPU")
    assert_check_1(Model.load(path, EXACT, placement=placement), fixtures_dir / fixture, variant)


@pytest.mark.gpu
def test_two_logical_gpus_on_one_physical_gpu(fixtures_dir, monkeypatch):
    """The cross-device path on one GPU: CUDA1 mapped onto GPU 0, layers split over CUDA0/CUDA1."""
    monkeypatch.setenv("OFFLOAD_STUDIO_CUDA_DEVICE_MAP", "CUDA1=0")
    path = fixtures_dir / "llama-moe" / "Q4_K_M.gguf"
    inventory = Inventory.from_model_file(ModelFile(path))
    devices = [cpu_device(), Device("CUDA0", "gpu", 8 << 30, "GPU"), Device("CUDA1", "gpu", 8 << 30, "GPU")]
    model = Model.load(path, EXACT, placement=split_over(inventory, devices, ["CUDA0", "CUDA1"]))
    assert_check_1(model, fixtures_dir / "llama-moe", "Q4_K_M")
    assert model.ops.transfers > 0


def test_logical_to_physical_gpu_map(monkeypatch):
    from engine.backends.cuda import physical_device
    assert physical_device("CUDA1", 1) == 1
    monkeypatch.setenv("OFFLOAD_STUDIO_CUDA_DEVICE_MAP", "CUDA1=0, CUDA2=1")
    assert (physical_device("CUDA1", 1), physical_device("CUDA2", 2), physical_device("CUDA0", 0)) == (0, 1, 0)
