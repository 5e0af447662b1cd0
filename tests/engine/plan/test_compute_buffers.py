"""Compute buffers: the graph and allocator port against llama.cpp's own figures.

The reference numbers were printed by llama.cpp (mainline, CPU build, 2 threads) for the
synthetic presets written with `offload-studio synth --preset NAME --quant Q4_K_M --sparse`:

    llama-perplexity -m NAME.gguf -f text.txt -c C -b UB -ub UB -fa on|off -ctk K -ctv V \\
        -t 2 -v -nr --no-warmup --chunks 1

("CPU compute buffer size is X MiB" with four decimals, and "graph: nodes = N"); the
`offload-studio plan FILE --check-against PATH/TO/llama-perplexity -c C -ub UB ...` command
reproduces them on demand.
"""
import pytest

from engine import arch
from engine.plan.compute_buffers import (DynAllocator, Graph, GraphShape, Ops, allocate, build_graph,
                                         compute_buffer_bytes)
from engine.plan.memory import kv_cells
from engine.run_config import RunConfig
from engine.synth.presets import preset

MIB = 1 << 20
PRINTED = 0.0001 * MIB / 2 + 1      # llama.cpp prints four decimals of MiB


def hparams(name):
    md = preset(name)
    return arch.family(md["general.architecture"]).hyperparams(md)


def shape(hp, n_ctx, n_ubatch, flash_attn, type_k="f16", type_v="f16"):
    rc = RunConfig(n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, type_k=type_k, type_v=type_v)
    return GraphShape.of(hp, rc, flash_attn, kv_cells)


# (preset, context, ubatch, flash attention, K type, V type) -> llama.cpp's MiB and graph nodes
LLAMA_CPP = [
    ("llama-3-8b", 4096, 512, True, "f16", "f16", 266.5020, 998),
    ("llama-3-8b", 32768, 2048, False, "f16", "f16", 8624.0391, 1158),
    ("llama-3-8b", 131072, 512, True, "q8_0", "q8_0", 274.5020, 1382),
    ("mixtral-8x7b", 4096, 512, True, "f16", "f16", 204.0137, 1510),
    ("mixtral-8x7b", 32768, 1024, False, "f16", "f16", 4312.0195, 1670),
    ("qwen3-30b-a3b", 4096, 512, True, "f16", "f16", 304.7520, 3030),
    ("qwen3-30b-a3b", 65536, 2048, False, "q8_0", "f16", 16984.1016, 3558),
    ("gemma-3-1b", 8192, 512, False, "f16", "f16", 516.5020, 1177),
    ("gemma-3-1b", 131072, 2048, True, "q8_0", "q8_0", 2075.0078, 1359),
    ("llama-4-scout", 4096, 512, True, "f16", "f16", 424.6270, 2322),
]


@pytest.mark.parametrize("name, n_ctx, n_ubatch, flash_attn, type_k, type_v, llama_mib, llama_nodes", LLAMA_CPP)
def test_cpu_compute_buffer_equals_llama_cpp(name, n_ctx, n_ubatch, flash_attn, type_k, type_v, llama_mib, llama_nodes):
    hp = hparams(name)
    s = shape(hp, n_ctx, n_ubatch, flash_attn, type_k, type_v)
    assert len(build_graph(hp, s).nodes) == llama_nodes
    assert abs(compute_buffer_bytes(hp, s)["CPU"] - llama_mib * MIB) <= PRINTED


def test_deepseek_v3_row_of_the_issue():
    # llama.cpp's dry pass (--fit on): "CPU compute buffer size = 412.01 MiB", "graph: nodes = 5593"
    hp = hparams("deepseek-v3")
    s = shape(hp, 4096, 512, True)
    assert len(build_graph(hp, s).nodes) == 5593
    assert abs(compute_buffer_bytes(hp, s)["CPU"] - 412.01 * MIB) <= 0.005 * MIB


def test_gemma_270m_rows_of_the_issue():
    from app.commands.common import open_inventory
    from engine.synth.default_model import gemma_path
    hp = open_inventory(str(gemma_path()))[1].hparams
    # llama.cpp: 514.5020 MiB at -c 4096 and at -c 8192 with flash attention on or off: the
    # logits of one ubatch (262144 x 512 f32) are the peak, the attention scores never are
    for n_ctx, flash_attn in ((4096, True), (8192, True), (8192, False)):
        assert abs(compute_buffer_bytes(hp, shape(hp, n_ctx, 512, flash_attn))["CPU"] - 514.5020 * MIB) <= PRINTED
    # -c 131072 -ub 1024 -fa off: 2585.5273 MiB
    assert abs(compute_buffer_bytes(hp, shape(hp, 131072, 1024, False))["CPU"] - 2585.5273 * MIB) <= PRINTED


def test_without_flash_attention_the_scores_grow_with_the_context():
    hp = hparams("llama-3-8b")
    short = compute_buffer_bytes(hp, shape(hp, 4096, 512, False))["CPU"]
    long = compute_buffer_bytes(hp, shape(hp, 32768, 512, False))["CPU"]
    # the KQ scores of 32 heads, 512 tokens and 28672 more cells, f32, plus the same for the mask
    assert long - short >= 32 * 512 * (32768 - 4096) * 4
    # with flash attention the peak is the logits at the end, whatever the context
    assert compute_buffer_bytes(hp, shape(hp, 32768, 512, True))["CPU"] == \
        compute_buffer_bytes(hp, shape(hp, 4096, 512, True))["CPU"]


# --- the allocator ----------------------------------------------------------------------------

def test_best_fit_takes_the_smallest_free_block_that_fits():
    a = DynAllocator(alignment=32)
    x, y, z, w = a.alloc(1000), a.alloc(64), a.alloc(3000), a.alloc(64)
    assert (x, y, z, w) == (0, 1024, 1088, 4096)
    a.free(x, 1000)
    a.free(z, 3000)
    # 1024 and 3008 bytes free below the top: 900 bytes go into the smaller hole
    assert a.alloc(900) == 0
    assert a.max_size == 4160
    # nothing below the top holds 4000 bytes: the buffer grows
    assert a.alloc(4000) == 4160
    assert a.max_size == 8160


def test_freed_neighbours_merge_into_one_block():
    a = DynAllocator(alignment=32)
    blocks = [a.alloc(256) for _ in range(4)]
    for offset in blocks[:3]:
        a.free(offset, 256)
    assert a.alloc(768) == 0            # the three freed neighbours are one block again
    assert a.max_size == 1024


def test_an_inplace_op_reuses_its_only_parent_and_an_output_is_never_freed():
    g = Graph()
    ops = Ops(g)
    x = ops.input((1024, 4), "f32", "x")           # 16 KiB
    a = ops.mul_mat(ops.weight((1024, 1024), "CPU", "w"), x)
    b = ops.scale(a)                                # in place: a has no other consumer
    c = ops.add(b, x)                               # in place on b
    c.is_output = True
    g.expand(c)
    for t in g.leafs + g.nodes:
        t.device = "CPU"
    assert allocate(g.nodes, g.leafs, lambda d: 32) == {"CPU": 2 * 16384}


def test_a_parent_read_twice_is_not_overwritten():
    g = Graph()
    ops = Ops(g)
    x = ops.input((1024, 4), "f32", "x")
    a = ops.mul_mat(ops.weight((1024, 1024), "CPU", "w"), x)
    b = ops.scale(a)
    c = ops.add(b, a)                   # a is read by scale and add: scale cannot take its memory
    c.is_output = True
    g.expand(c)
    for t in g.leafs + g.nodes:
        t.device = "CPU"
    # x is freed after its one consumer, and b takes its place (an exact fit below the top);
    # with b in a's memory, a third block would have been needed
    assert allocate(g.nodes, g.leafs, lambda d: 32) == {"CPU": 2 * 16384}
    assert len(g.nodes) == 3 and g.nodes[1] is b


def test_views_keep_their_source_alive():
    g = Graph()
    ops = Ops(g)
    x = ops.input((256, 4), "f32", "x")
    x.is_output = True                  # kept to the end, so no block below the top frees up early
    a = ops.mul_mat(ops.weight((256, 256), "CPU", "w"), x)     # 4 KiB
    v = ops.reshape(a, 256, 2, 2)
    b = ops.mul_mat(ops.weight((256, 256), "CPU", "w2"), x)    # computed while a is only viewed
    c = ops.add(ops.cont(v, 256, 4), b)
    c.is_output = True
    for t in (v, b, c):
        g.expand(t)
    for t in g.leafs + g.nodes:
        t.device = "CPU"
    # x, a (alive through its view until the cont reads it), b, the cont; the add reuses the
    # cont. Were a freed once its view was computed, b would have taken its place: 3 blocks.
    assert allocate(g.nodes, g.leafs, lambda d: 32) == {"CPU": 4 * 4096}


# --- placements (derived: llama.cpp's scheduler rules, not yet measured on a GPU) --------------

def test_a_full_offload_leaves_the_cpu_only_the_inputs():
    hp = hparams("llama-3-8b")
    s = shape(hp, 4096, 512, True)
    sizes = compute_buffer_bytes(hp, s, ["CUDA0"], device_of=lambda n: "CPU" if n.startswith("token_embd") else "CUDA0",
                                 layer_device=lambda il: "CUDA0")
    cpu_only = compute_buffer_bytes(hp, s)["CPU"]
    assert sizes["CUDA0"] >= 128256 * 512 * 4          # the logits of the ubatch are on the GPU
    assert sizes["CPU"] < 32 * MIB < cpu_only


def test_cpu_weights_are_copied_to_the_first_gpu_from_32_tokens():
    hp = hparams("mixtral-8x7b")
    expert_bytes = {"ffn_down_exps": 8 * 4096 * 14336 * 0.5625}

    def device_of(name):
        return "CPU" if "_exps" in name or name.startswith("token_embd") else "CUDA0"

    def weight_bytes(name):
        return int(expert_bytes["ffn_down_exps"]) if "_exps" in name else None

    big = compute_buffer_bytes(hp, shape(hp, 4096, 512, True), ["CUDA0"], device_of, lambda il: "CUDA0", weight_bytes)
    small = compute_buffer_bytes(hp, shape(hp, 4096, 16, True), ["CUDA0"], device_of, lambda il: "CUDA0", weight_bytes)
    # at 512 tokens each expert matmul runs on the GPU with its weight copied there (one at a
    # time: each copy starts a split of its own); at 16 tokens the CPU runs them
    assert expert_bytes["ffn_down_exps"] <= big["CUDA0"] < 2 * expert_bytes["ffn_down_exps"] + 256 * MIB
    assert small["CUDA0"] < 8 * MIB


def test_pipeline_parallelism_keeps_four_copies_of_each_split_input():
    hp = hparams("llama-3-8b")
    s = shape(hp, 4096, 512, True)
    half = hp.n_layer // 2

    def device_of(name):
        if name.startswith("token_embd"):
            return "CPU"
        if name.startswith("blk."):
            return "CUDA0" if int(name.split(".")[1]) < half else "CUDA1"
        return "CUDA1"

    def layer_device(il):
        return "CUDA0" if il < half else "CUDA1"

    args = (hp, s, ["CUDA0", "CUDA1"], device_of, layer_device)
    plain, pipelined = compute_buffer_bytes(*args), compute_buffer_bytes(*args, pipeline_parallel=True)
    residual = hp.n_embd * 512 * 4      # what CUDA1 receives from CUDA0 (and CUDA0 from the CPU)
    for gpu in ("CUDA0", "CUDA1"):
        assert pipelined[gpu] >= plain[gpu] + 3 * residual
    # the host keeps four of each graph input: token ids, the embeddings input, positions, mask, ...
    assert pipelined["CPU"] >= plain["CPU"] + 3 * residual


# The Gated-DeltaNet hybrids, llama.cpp's dry pass through the harness (two decimals of MiB):
#   offload-studio synth --preset NAME --quant Q4_K_M --sparse -o /tmp/NAME.gguf
#   offload-studio plan /tmp/NAME.gguf --check-against PATH/TO/llama-perplexity -c C -ub UB -fa on|off [-ctk K -ctv V]
# (preset, context, ubatch, flash attention, K type, V type) -> llama.cpp's MiB and graph nodes.
HYBRID_MIB = 0.005      # the harness's two decimals
HYBRIDS = [
    ("tiny-qwen3.5", 4096, 512, True, "f16", "f16", 8.53, 241),
    ("tiny-qwen3.5", 4096, 512, False, "f16", "f16", 43.52, 246),
    ("tiny-qwen3.5", 32768, 2048, True, "q8_0", "q8_0", 146.12, 253),
    ("tiny-qwen3.5", 32768, 1024, False, "q8_0", "f16", 648.05, 252),
    ("tiny-qwen3.5-moe", 512, 128, True, "f16", "f16", 1.39, 337),
    ("tiny-qwen3.5-moe", 4096, 512, True, "f16", "f16", 9.05, 337),
    ("tiny-qwen3.5-moe", 32768, 2048, True, "q8_0", "q8_0", 148.23, 349),
    ("tiny-qwen3.5-moe", 32768, 1024, False, "q8_0", "f16", 648.11, 348),
    ("tiny-qwen3-next", 512, 128, True, "f16", "f16", 1.45, 365),
    ("tiny-qwen3-next", 4096, 512, False, "f16", "f16", 43.54, 370),
    ("tiny-qwen3-next", 32768, 2048, True, "q8_0", "q8_0", 148.21, 377),
]


@pytest.mark.parametrize("name, n_ctx, n_ubatch, flash_attn, type_k, type_v, llama_mib, llama_nodes", HYBRIDS)
def test_hybrid_compute_buffer_matches_llama_cpp(name, n_ctx, n_ubatch, flash_attn, type_k, type_v, llama_mib,
                                                 llama_nodes):
    hp = hparams(name)
    s = shape(hp, n_ctx, n_ubatch, flash_attn, type_k, type_v)
    assert len(build_graph(hp, s).nodes) == llama_nodes
    assert abs(compute_buffer_bytes(hp, s)["CPU"] - llama_mib * MIB) <= HYBRID_MIB * MIB


def test_the_estimate_of_a_hybrid_uses_its_graph(tmp_path):
    from engine.devices import Device
    from engine.gguf.model_file import ModelFile
    from engine.plan.inventory import Inventory
    from engine.plan.memory import estimate_memory
    from engine.plan.placement import Placement
    from engine.synth.writer import write_synthetic
    inventory = Inventory.from_model_file(ModelFile(write_synthetic(tmp_path / "m.gguf", "tiny-qwen3.5-moe",
                                                                    sparse=True)))
    devices = [Device("CPU", "cpu", 1 << 40)]
    rc = RunConfig(n_ctx=4096, n_batch=2048, n_ubatch=512, flash_attn="on")
    estimate = estimate_memory(inventory, Placement(inventory, devices, ["CPU"] * (inventory.n_layer + 1)), rc,
                               devices)
    # llama.cpp: "CPU compute buffer size = 9.05 MiB" (the HYBRIDS row above), and no rough-rule note
    assert abs(estimate.devices[0].compute_bytes - 9.05 * MIB) <= HYBRID_MIB * MIB
    assert not any("per-layer rule" in note for note in estimate.notes)
