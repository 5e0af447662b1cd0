"""Weight bytes one decode token reads per device, against a count by hand from the GGUF's
tensor shapes and the block sizes of their types (ggml: values per block, bytes per block)."""
from __future__ import annotations

import pytest

from engine.devices import cpu_device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.active_bytes import active_bytes_per_token
from engine.plan.inventory import Inventory
from engine.plan.placement import Placement, TensorRef

BLOCK = {"F32": (1, 4), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_0": (32, 34)}


def tensor_bytes(t) -> int:
    """Bytes of a tensor from its shape and type, counted by hand."""
    values_per_block, bytes_per_block = BLOCK[t.type_name]
    n_values = 1
    for n in t.shape:
        n_values *= n
    return n_values // values_per_block * bytes_per_block


def load(fixtures_dir, name):
    inventory = Inventory.from_model_file(ModelFile(fixtures_dir / name / "Q4_K_M.gguf"))
    devices = [cpu_device()] + simulated_gpus("4GiB")
    return inventory, devices


def test_dense_model_reads_every_matrix_and_one_embedding_row(fixtures_dir):
    inventory, devices = load(fixtures_dir, "llama-dense")       # 2 layers, n_embd 256, n_vocab 512
    placement = Placement(inventory, devices, ["CUDA0", "CUDA0", "CPU"])   # layers on the GPU, head on the CPU
    found = active_bytes_per_token(inventory, placement)
    embd_row = 256 // 256 * 144                                  # one Q4_K row of 256 values
    head = 512 * 256 // 256 * 210 + 256 * 4                      # Q6_K output (512 x 256) and its norm
    layers = sum(tensor_bytes(t) for t in inventory.tensors if t.layer is not None)
    assert found == {"CPU": embd_row + head, "CUDA0": layers}


def test_moe_model_reads_the_selected_experts_only(fixtures_dir):
    inventory, devices = load(fixtures_dir, "qwen3moe")          # 8 experts, 2 used per token
    assert (inventory.hparams.n_expert, inventory.hparams.n_expert_used) == (8, 2)
    placement = Placement(inventory, devices, ["CUDA0", "CUDA0", "CUDA0"])
    for t in inventory.tensors:                                  # -ot exps=CPU
        if t.n_experts:
            placement.assign(TensorRef(t.name), "CPU")
    found = active_bytes_per_token(inventory, placement)
    down_type = {t.layer: t.type_name for t in inventory.tensors if t.name.endswith("ffn_down_exps.weight")}
    one_down = {"Q4_K": 256 * 256 // 256 * 144, "Q6_K": 256 * 256 // 256 * 210}
    experts = sum(2 * (2 * 256 * 256 // 256 * 144 + one_down[down_type[il]]) for il in (0, 1))   # 2 of 8 experts
    # per layer: q Q4_K 256x256, k and v Q8_0 128x256, output Q5_K 256x256, router F32 8x256, norms
    attention = 256 * 256 // 256 * 144 + 2 * (128 * 256 // 32 * 34) + 256 * 256 // 256 * 176
    other = 8 * 256 * 4 + (256 + 256 + 64 + 64) * 4
    head = 512 * 256 // 256 * 210 + 256 * 4
    embd_row = 144                                               # the embedding stays on the CPU
    assert found == {"CPU": experts + embd_row, "CUDA0": 2 * (attention + other) + head}


def test_experts_split_over_devices_count_their_expected_share(fixtures_dir):
    """Half the experts of a tensor on each device: each reads half of the 2-of-8 expectation."""
    inventory, devices = load(fixtures_dir, "qwen3moe")
    placement = Placement(inventory, devices, ["CPU", "CPU", "CPU"])
    name = "blk.1.ffn_up_exps.weight"
    placement.assign(TensorRef(name, frozenset(range(4))), "CUDA0")
    found = active_bytes_per_token(inventory, placement)
    one_expert = 256 * 256 // 256 * 144
    assert found["CUDA0"] == 4 * one_expert * 2 // 8
    all_cpu = active_bytes_per_token(inventory, Placement(inventory, devices, ["CPU", "CPU", "CPU"]))
    assert found["CPU"] + found["CUDA0"] == all_cpu["CPU"]


def test_tied_output_reads_the_whole_embedding(fixtures_dir):
    path = fixtures_dir / "gemma3" / "Q8_0.gguf"
    if not path.exists():
        pytest.skip("no gemma3 fixture")
    inventory = Inventory.from_model_file(ModelFile(path))
    assert not any(t.name == "output.weight" for t in inventory.tensors)
    placement = Placement(inventory, [cpu_device()], ["CPU"] * (inventory.n_layer + 1))
    embd = next(t for t in inventory.tensors if t.name == "token_embd.weight")
    rest = sum(t.n_bytes for t in inventory.tensors if t.name != "token_embd.weight")
    assert active_bytes_per_token(inventory, placement) == {"CPU": rest + embd.n_bytes + embd.n_bytes // embd.shape[0]}
