"""The planner's view of real big MoE shapes: exact per-expert bytes and KV sizes."""
import pytest

from engine.devices import simulated_gpus, cpu_device
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.llama_args import parse_llama_args
from engine.plan.memory import estimate_memory, kv_cache_bytes
from engine.synth.writer import write_synthetic

MIB = 1 << 20
Q4_K_ROW_256 = 144      # bytes per 256 values
Q6_K_ROW_256 = 210


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    return {name: Inventory.from_model_file(ModelFile(write_synthetic(folder / f"{name}.gguf", name, "Q4_K_M",
                                                                       sparse=True)))
            for name in ("deepseek-v3", "llama-4-maverick")}


def test_deepseek_v3_expert_sizes(shapes):
    inv = shapes["deepseek-v3"]
    assert inv.n_layer == 61 and inv.n_expert == 256
    up = inv.by_name["blk.3.ffn_up_exps.weight"]
    assert up.shape == (256, 2048, 7168) and up.type_name == "Q4_K"
    assert up.expert_bytes == 2048 * 7168 // 256 * Q4_K_ROW_256 == 8_257_536       # 7.875 MiB
    down = inv.by_name["blk.3.ffn_down_exps.weight"]
    per_row = {"Q4_K": Q4_K_ROW_256, "Q6_K": Q6_K_ROW_256}[down.type_name]
    assert down.expert_bytes == 7168 * 2048 // 256 * per_row
    assert all(t.n_experts == 0 for t in inv.layers[2].tensors)       # leading dense blocks
    assert inv.layers[3].group_bytes()["shared_expert"] > 0


def test_deepseek_v3_kv_on_the_gpus_follows_the_layers(shapes):
    inv = shapes["deepseek-v3"]
    devices = [cpu_device()] + simulated_gpus("24GiB,24GiB,24GiB,48GiB")
    parsed = parse_llama_args("-ngl 99 -ts 1,1,1,1 -ot exps=CPU -c 32768", inv, devices)
    estimate = estimate_memory(inv, parsed.placement, parsed.run_config, devices)
    assert sum(d.kv_bytes for d in estimate.devices) == kv_cache_bytes(inv.hparams, parsed.run_config) == 2196 * MIB
    assert estimate["CPU"].kv_bytes == 0
    # llama.cpp's split of 61 layers + output by 1,1,1,1: layer il goes to the first GPU whose
    # cumulative share exceeds il / 62, so 0-15, 16-30, 31-46, 47-60 (+ output)
    per_layer = 2196 * MIB // 61
    assert {d.device: d.kv_bytes // per_layer for d in estimate.devices if d.device != "CPU"} == \
        {"CUDA0": 16, "CUDA1": 15, "CUDA2": 16, "CUDA3": 14}


def test_llama_4_maverick_expert_sizes_and_kv(shapes):
    inv = shapes["llama-4-maverick"]
    assert inv.n_layer == 48 and inv.n_expert == 128
    assert "blk.0.ffn_up_exps.weight" not in inv.by_name          # MoE every second layer
    up = inv.by_name["blk.1.ffn_up_exps.weight"]
    assert up.shape == (128, 8192, 5120)
    assert up.expert_bytes == 8192 * 5120 // 256 * Q4_K_ROW_256 == 23_592_960
    devices = [cpu_device()] + simulated_gpus("24GiB")
    rc = parse_llama_args("-ngl 99 --cpu-moe -c 65536", inv, devices).run_config
    # 12 global layers keep the whole context, 36 chunked layers one 8192 chunk + a ubatch (8704 cells)
    assert kv_cache_bytes(inv.hparams, rc) == (12 * 65536 + 36 * 8704) * 8 * 128 * 2 * 2
