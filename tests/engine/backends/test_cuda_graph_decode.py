"""The model's own decode step as a CUDA graph (engine.run.graph_decode) on emulated GPUs.

Tokens are decoded across a GRAPH_CELL_PADDING boundary (the cache positions start just below
it, the cells before them empty, so no long prefill is needed): the replayed graph is
bit-identical to direct launches of the same step, agrees with the eager CUDA path and with the
CPU to float rounding, and meets the fixtures' llama.cpp tolerances. Placements that keep a
range from being a graph fall back with their reason; layers over two devices run one graph
per device range."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from forward_parity import INCR_STEPS, kl_mean, meta, rel, row_rel, tokens
from engine.backends.cuda import GRAPH_CELL_PADDING
from engine.devices import Device, cpu_device, emulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.placement import Placement, TensorRef
from engine.run.graph_decode import _DECODERS, GraphDecode
from engine.run.model import Model
from engine.run_config import RunConfig

EXACT = RunConfig(n_ctx=512, n_ubatch=512, type_k="f32", type_v="f32", activations="f32")
FIXTURES = [("llama-dense", "Q4_K_M"), ("qwen3moe", "Q4_K_M"), pytest.param("gemma3", "Q8_0", marks=pytest.mark.slow)]
FIRST = GRAPH_CELL_PADDING - 3          # prefill 2 positions here, decode 4 across the boundary
N_DECODE = 4


def placed(path, layer_devices, devices=None, embedding: str | None = None) -> Placement:
    inventory = Inventory.from_model_file(ModelFile(path))
    devices = devices or [cpu_device()] + emulated_gpus("4GiB,4GiB")
    names = list(layer_devices) + [layer_devices[-1]] * (inventory.n_layer + 1 - len(layer_devices))
    placement = Placement(inventory, devices, names)
    if embedding:
        placement.assign(TensorRef("token_embd.weight"), embedding)
    return placement


def decoded(model: Model, toks, direct: bool = False) -> tuple[np.ndarray, GraphDecode | None]:
    """Logits of N_DECODE tokens decoded one by one at positions FIRST + 2, ..., after 2 prefilled
    at FIRST; `direct`: the graph step launched directly rather than replayed."""
    cache = model.new_cache()
    model.eval_logits(toks[:2], cache, positions=np.arange(FIRST, FIRST + 2))
    if direct:
        decoder = _DECODERS[model] = GraphDecode(model)
        decoder.bind(cache)
        for r in decoder.ranges:
            r.step._fall_back("direct launches for comparison")
    rows = [model.eval_logits(toks[2 + i:3 + i], cache) for i in range(N_DECODE)]
    return np.concatenate(rows), _DECODERS.get(model)


def counters(decoder: GraphDecode) -> list[tuple]:
    return [(r.device, r.layers, r.step and (r.step.captures, r.step.replays, r.step.direct_steps), r.embeds, r.head)
            for r in decoder.ranges]


@pytest.mark.parametrize("fixture, variant", FIXTURES)
def test_graph_decode_equals_direct_launches_eager_cuda_and_the_cpu(fixtures_dir, fixture, variant):
    path = fixtures_dir / fixture / f"{variant}.gguf"
    toks = tokens(fixtures_dir / fixture)
    placement = placed(path, ["CUDA0"], embedding="CUDA0")
    graphed = Model.load(path, EXACT, placement=placement)
    logits, decoder = decoded(graphed, toks)
    n_layer = graphed.hparams.n_layer
    # position 255 attends 256 cells, 256-258 attend 512: two captures, every step replayed
    assert counters(decoder) == [("CUDA0", range(n_layer), (2, N_DECODE, 0), True, True)]
    direct = Model.load(path, EXACT, placement=placement)
    assert np.array_equal(decoded(direct, toks, direct=True)[0], logits)
    assert counters(_DECODERS[direct])[0][2] == (0, 0, N_DECODE)
    eager = Model.load(path, EXACT.replace(cuda_graphs=False), placement=placement)
    eager_logits, eager_decoder = decoded(eager, toks)
    assert not eager_decoder.graphed
    assert rel(logits, eager_logits) <= 1e-5, rel(logits, eager_logits)
    assert np.array_equal(graphed.expert_counts, eager.expert_counts)       # the same experts, counted alike
    cpu_logits = decoded(Model.load(path, EXACT), toks)[0]
    assert rel(logits, cpu_logits) <= 1e-4, rel(logits, cpu_logits)


def test_a_graph_decoded_model_is_freed(fixtures_dir):
    """The graphs live with their model: the decoders' table holds no model alive."""
    import gc
    import weakref

    path = fixtures_dir / "llama-dense" / "Q4_K_M.gguf"
    model = Model.load(path, EXACT, placement=placed(path, ["CUDA0"], embedding="CUDA0"))
    assert decoded(model, tokens(fixtures_dir / "llama-dense"))[1].graphed
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


@pytest.mark.slow
def test_a_sliding_window_ring_wraps_inside_the_graph(fixtures_dir):
    """gemma3's sliding layers keep a 256-cell ring here: position 256 goes to cell 0 of the ring
    while the full-attention layer crosses to 512 attended cells."""
    path = fixtures_dir / "gemma3" / "Q8_0.gguf"
    toks = tokens(fixtures_dir / "gemma3")
    config = EXACT.replace(n_ctx=1024, n_ubatch=64)
    placement = placed(path, ["CUDA0"], embedding="CUDA0")
    model = Model.load(path, config, placement=placement)
    assert [layer.layout.n_cells for layer in model.new_cache().layers] == [256] * 5 + [1024]
    logits, decoder = decoded(model, toks)
    assert counters(decoder)[0][2] == (2, N_DECODE, 0)
    eager = decoded(Model.load(path, config.replace(cuda_graphs=False), placement=placement), toks)[0]
    assert rel(logits, eager) <= 1e-5, rel(logits, eager)


def incremental(model: Model, toks) -> np.ndarray:
    cache = model.new_cache()
    model.eval_logits(toks[:-INCR_STEPS], cache)
    return np.concatenate([model.eval_logits(toks[i:i + 1], cache) for i in range(len(toks) - INCR_STEPS, len(toks))])


@pytest.mark.parametrize("fixture, variant", FIXTURES)
def test_graph_decode_meets_the_fixture_tolerances(fixtures_dir, fixture, variant):
    """Check 1 (f32 math, f32 cache) and check 2 (llama.cpp's rounding, f16 cache) of the fixtures
    README on the graph-decoded steps of the incremental rows."""
    fixture_dir = fixtures_dir / fixture
    path, toks = fixture_dir / f"{variant}.gguf", tokens(fixture_dir)
    placement = placed(path, ["CUDA0"], embedding="CUDA0")
    model = Model.load(path, EXACT, placement=placement)
    incr = incremental(model, toks)
    assert _DECODERS[model].ranges[0].step.replays == INCR_STEPS
    ref = np.load(fixture_dir / f"{variant}.logits_batch_f32ref.npy")[-INCR_STEPS:]
    assert rel(incr, ref) <= 1e-3 and row_rel(incr, ref).max() <= 3e-3, (rel(incr, ref), row_rel(incr, ref).max())
    model = Model.load(path, EXACT.replace(activations="llama.cpp", type_k="f16", type_v="f16"), placement=placement)
    incr = incremental(model, toks)
    assert _DECODERS[model].ranges[0].step.replays == INCR_STEPS
    tol = meta(fixture_dir)["variants"][variant]["recommended_tolerance"]["logits_incr"]
    ref = np.load(fixture_dir / f"{variant}.logits_incr.npy")
    keep = [r for r in range(len(ref)) if r not in tol["exclude_rows"]]
    found = (rel(incr[keep], ref[keep]), float(np.median(row_rel(incr[keep], ref[keep]))), kl_mean(incr[keep], ref[keep]))
    assert found[0] <= tol["rel"] and found[1] <= tol["row_median_rel"] and found[2] <= tol["kl_mean"], found


def test_one_tensor_on_the_cpu_keeps_its_range_off_the_graph(fixtures_dir, caplog):
    path = fixtures_dir / "llama-dense" / "Q4_K_M.gguf"
    toks = tokens(fixtures_dir / "llama-dense")
    placement = placed(path, ["CUDA0"], embedding="CUDA0")
    placement.assign(TensorRef("blk.1.ffn_down.weight"), "CPU")
    model = Model.load(path, EXACT, placement=placement)
    with caplog.at_level(logging.INFO, logger="engine.run.graph_decode"):
        logits, decoder = decoded(model, toks)
    assert not decoder.graphed and decoder.ranges[0].step is None
    reason = "blk.1.ffn_down.weight is on CPU: its layer's step needs the host between launches"
    assert decoder.ranges[0].reason == reason and reason in caplog.text
    eager = Model.load(path, EXACT.replace(cuda_graphs=False), placement=placement)
    assert np.array_equal(logits, decoded(eager, toks)[0])          # the eager path itself


@pytest.mark.parametrize("activations", ["f32", "llama.cpp"])
def test_a_q8_0_cache_rotated_and_read_in_the_graph(fixtures_dir, activations):
    """Hadamard-rotated heads in a q8_0 cache, and with llama.cpp's rounding q8_1 queries, as the
    eager path stores and reads them."""
    path = fixtures_dir / "llama-dense" / "Q4_K_M.gguf"
    toks = tokens(fixtures_dir / "llama-dense")
    config = EXACT.replace(type_k="q8_0", type_v="q8_0", activations=activations)
    placement = placed(path, ["CUDA0"], embedding="CUDA0")
    logits, decoder = decoded(Model.load(path, config, placement=placement), toks)
    assert counters(decoder)[0][2] == (2, N_DECODE, 0)
    eager = decoded(Model.load(path, config.replace(cuda_graphs=False), placement=placement), toks)[0]
    # llama.cpp's rounding moves a value across a q8_1 step now and then: the tolerance of its own
    # two kernel paths (the fixtures' incr/batch noise), not float rounding
    assert rel(logits, eager) <= (1e-5 if activations == "f32" else 2e-2), rel(logits, eager)


def test_a_cache_quantized_on_the_host_keeps_direct_launches(fixtures_dir):
    path = fixtures_dir / "llama-dense" / "Q4_K_M.gguf"
    model = Model.load(path, EXACT.replace(type_k="q4_0", type_v="q4_0"), placement=placed(path, ["CUDA0"]))
    decoder = GraphDecode(model)
    decoder.bind(model.new_cache())
    assert not decoder.graphed
    assert decoder.ranges[0].reason == "a q4_0 KV cache is quantized on the host, which a CUDA graph cannot hold"


@pytest.mark.parametrize("fixture", ["deepseek2", "llama4"])
def test_families_without_a_decode_plan_keep_direct_launches(fixtures_dir, fixture):
    path = fixtures_dir / fixture / "Q4_K_M.gguf"
    model = Model.load(path, EXACT, placement=placed(path, ["CUDA0"]))
    decoder = GraphDecode(model)
    decoder.bind(model.new_cache())
    assert not decoder.graphed
    assert decoder.ranges[0].reason == f"the {fixture} family has no one-token decode plan (engine.arch.decode_plan)"


@pytest.mark.parametrize("layer_devices", [["CUDA0", "CUDA1"], ["CPU", "CUDA0"]])
def test_one_graph_per_device_range(fixtures_dir, layer_devices):
    """Layers over two devices: each CUDA range its own graph, the activation moved between them;
    the embedding stays on the CPU (llama.cpp's input layer), the head joins the last graph."""
    path = fixtures_dir / "qwen3moe" / "Q4_K_M.gguf"
    toks = tokens(fixtures_dir / "qwen3moe")
    model = Model.load(path, EXACT, placement=placed(path, layer_devices))
    logits, decoder = decoded(model, toks)
    expected = [(device, range(il, il + 1), None if device == "CPU" else (2, N_DECODE, 0), False, il == 1)
                for il, device in enumerate(layer_devices)]
    assert counters(decoder) == expected
    assert model.ops.transfers >= N_DECODE          # into the second range, each step
    cpu = Model.load(path, EXACT)
    assert rel(logits, decoded(cpu, toks)[0]) <= 1e-4
    assert np.array_equal(model.expert_counts, cpu.expert_counts)


def test_graphs_turned_off_from_the_command_line(fixtures_dir, monkeypatch):
    from app.cli import command_parser, split_llama_args
    from app.commands.model_args import load_model

    _, parser = command_parser("run")
    path = str(fixtures_dir / "llama-dense" / "Q8_0.gguf")
    for flags, expected in ((["--no-cuda-graphs"], False), ([], True)):
        ours, theirs = split_llama_args(parser, ["-m", path, "-p", "hi", "--emulate-cuda", "1GiB", "-ngl", "99", *flags])
        args = parser.parse_args(ours)
        args.llama_args = theirs
        assert load_model(args).model.run_config.cuda_graphs is expected


def test_graphs_turned_off_by_the_environment_wherever_the_run_was_configured(monkeypatch):
    from engine.run.graph_decode import graphs_turned_off

    for env, flag, expected in (("1", True, "GGML_CUDA_DISABLE_GRAPHS"), ("", False, "--no-cuda-graphs"),
                                ("0", True, None), ("", True, None)):
        monkeypatch.setenv("GGML_CUDA_DISABLE_GRAPHS", env)
        reason = graphs_turned_off(RunConfig(cuda_graphs=flag))
        assert reason is None if expected is None else expected in reason


@pytest.mark.gpu
@pytest.mark.parametrize("fixture, variant", [("llama-dense", "Q4_K_M"), ("qwen3moe", "Q4_K_M"), ("gemma3", "Q8_0")])
def test_graph_decode_on_the_gpu(fixtures_dir, fixture, variant):
    """On a real GPU: the captured graph against direct launches of the same step, the eager CUDA
    path and the CPU."""
    path = fixtures_dir / fixture / f"{variant}.gguf"
    toks = tokens(fixtures_dir / fixture)
    devices = [cpu_device(), Device("CUDA0", "gpu", 16 << 30, "GPU")]
    placement = placed(path, ["CUDA0"], devices, embedding="CUDA0")
    logits, decoder = decoded(Model.load(path, EXACT, placement=placement), toks)
    assert counters(decoder)[0][2] == (2, N_DECODE, 0)
    direct = decoded(Model.load(path, EXACT, placement=placement), toks, direct=True)[0]
    assert rel(logits, direct) <= 1e-6, rel(logits, direct)       # the same deterministic kernels and inputs
    eager = decoded(Model.load(path, EXACT.replace(cuda_graphs=False), placement=placement), toks)[0]
    assert rel(logits, eager) <= 1e-5, rel(logits, eager)
    assert rel(logits, decoded(Model.load(path, EXACT), toks)[0]) <= 1e-4
