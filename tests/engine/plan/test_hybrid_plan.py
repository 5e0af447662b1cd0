"""Planning the hybrid DeltaNet models: KV and recurrent-state figures equal llama.cpp's, the
quantization mixes equal llama-quantize's, and the presets are complete."""
import json
from pathlib import Path

import pytest

from engine import arch
from engine.gguf.model_file import ModelFile
from engine.plan.memory import kv_cache_bytes, recurrent_state_bytes
from engine.run_config import RunConfig
from engine.synth.presets import PRESETS
from engine.synth.quant_recipe import tensor_types

HYBRID_FIXTURES = Path(__file__).resolve().parents[4] / "shared" / "fixtures-hybrid"
MIB = 1 << 20

# `KV buffer size` / `RS buffer size` (MiB) that llama.cpp (the CPU build of commit 0c1e57098bba)
# printed for sparse synthetic files of these presets, written by `offload-studio synth --sparse
# --quant Q4_K_M`: `llama-perplexity -m F.gguf -c N -f text.txt --no-repack --no-warmup -fit off -v`,
# and for the last row `llama-completion -m F.gguf -c 8192 -np 2 -ctk q8_0 -ctv q4_0 -fa on -n 1 -no-cnv`.
LLAMA_CPP_BUFFERS_MIB = [
    ("qwen3.5-35b-a3b", dict(n_ctx=4096), 80.00, 62.81),
    ("qwen3.5-35b-a3b", dict(n_ctx=32768), 640.00, 62.81),
    ("qwen3.5-9b", dict(n_ctx=4096), 128.00, 50.25),
    ("qwen3.5-9b", dict(n_ctx=32768), 1024.00, 50.25),
    ("qwen3-next-80b-a3b", dict(n_ctx=4096), 96.00, 75.38),
    ("qwen3-next-80b-a3b", dict(n_ctx=32768), 768.00, 75.38),
    ("qwen3.5-35b-a3b", dict(n_ctx=8192, n_seq=2, type_k="q8_0", type_v="q4_0", flash_attn="on"), 65.00, 125.62),
]


def hparams(name: str):
    md = PRESETS[name]
    return arch.family(md["general.architecture"]).hyperparams(md)


@pytest.mark.parametrize("name,settings,kv_mib,rs_mib", LLAMA_CPP_BUFFERS_MIB)
def test_kv_and_recurrent_buffers_equal_llama_cpp(name, settings, kv_mib, rs_mib):
    hp, rc = hparams(name), RunConfig(**settings)
    assert round(kv_cache_bytes(hp, rc) / MIB, 2) == kv_mib
    assert round(recurrent_state_bytes(hp, rc) / MIB, 2) == rs_mib


def test_only_a_quarter_of_the_layers_have_a_kv_cache():
    hp = hparams("qwen3.5-35b-a3b")
    attention = [il for il in range(hp.n_layer) if not hp.is_recurrent(il)]
    assert attention == list(range(3, 40, 4))
    assert all(hp.n_embd_k_gqa(il) == 0 for il in range(hp.n_layer) if hp.is_recurrent(il))


@pytest.mark.parametrize("name", [n for n, md in PRESETS.items()
                                  if md["general.architecture"] in ("qwen35moe", "qwen35", "qwen3next")])
def test_presets_have_consistent_shapes(name):
    hp = hparams(name)
    specs = arch.family(hp.arch).tensor_specs(hp)
    assert len({s.name for s in specs}) == len(specs)
    assert sum(hp.is_recurrent(il) for il in range(hp.n_layer)) == 3 * hp.n_layer // 4


@pytest.mark.parametrize("fixture", ["qwen35moe", "qwen3next", "qwen35"])
def test_quantization_mix_equals_llama_quantize(fixture):
    """Every per-tensor type llama-quantize chose for the fixture variants, from the recipe."""
    if not HYBRID_FIXTURES.is_dir():
        pytest.skip("hybrid fixtures not found")
    meta = json.loads((HYBRID_FIXTURES / fixture / "meta.json").read_text())
    md = ModelFile(HYBRID_FIXTURES / fixture / "F16.gguf").metadata
    hp = arch.family(fixture).hyperparams(md)
    specs = arch.family(fixture).tensor_specs(hp, tied_output="output.weight" not in meta["tensors"])
    for variant, info in meta["variants"].items():
        types = tensor_types(((s.name, s.shape) for s in specs), variant, hp)
        assert {n: t.name for n, t in types.items()} == info["tensor_types"], variant


@pytest.fixture(scope="module")
def sparse_35b(tmp_path_factory):
    from engine.synth.writer import write_synthetic
    path = write_synthetic(tmp_path_factory.mktemp("hybrid") / "qwen3.5-35b-a3b.gguf", "qwen3.5-35b-a3b",
                           "Q4_K_M", sparse=True)
    return ModelFile(path)


def test_inventory_roles_of_the_delta_net_tensors(sparse_35b):
    from engine.plan.inventory import Inventory, Role
    inv = Inventory.from_model_file(sparse_35b)
    roles = {t.name.split(".", 2)[2]: t.role for t in inv.layers[0].tensors}
    for name in ("attn_qkv.weight", "attn_gate.weight", "ssm_conv1d.weight", "ssm_a", "ssm_dt.bias",
                 "ssm_beta.weight", "ssm_alpha.weight", "ssm_norm.weight", "ssm_out.weight"):
        assert roles[name] is Role.RECURRENT, name
    assert roles["ffn_gate_inp_shexp.weight"] is Role.SHARED_EXPERT
    assert {t.role for t in inv.layers[3].tensors if t.name.startswith("blk.3.attn_")} == {Role.ATTENTION, Role.NORM}
    assert inv.groups()[:2] == ["attention", "recurrent"]


def test_ot_rules_on_delta_net_names_and_the_recurrent_state_follows_its_layer(sparse_35b):
    from engine.devices import Device, simulated_gpus
    from engine.plan.inventory import Inventory
    from engine.plan.llama_args import parse_llama_args
    from engine.plan.memory import estimate_memory, kv_layer_bytes, recurrent_layer_bytes
    inv = Inventory.from_model_file(sparse_35b)
    devices = [Device("CPU", "cpu", 256 << 30)] + simulated_gpus("16GiB")
    parsed = parse_llama_args(r"-ngl 99 -c 4096 -ot 'blk\.(0|1|2)\.(attn_qkv|attn_gate|ssm_.*)=CPU,exps=CPU'",
                              inv, devices)
    placement, rc = parsed.placement, parsed.run_config
    assert placement.device_of("blk.0.ssm_out.weight") == "CPU"
    assert placement.device_of("blk.4.ssm_out.weight") == "CUDA0"
    assert [placement.layer_home_device(il) for il in range(5)] == ["CPU"] * 3 + ["CUDA0"] * 2
    estimate = estimate_memory(inv, placement, rc, devices)
    hp = inv.hparams
    per_layer = [sum(kv_layer_bytes(hp, il, rc)) + sum(recurrent_layer_bytes(hp, il, rc)) for il in range(hp.n_layer)]
    assert estimate["CPU"].kv_bytes == sum(per_layer[:3])
    assert estimate["CUDA0"].kv_bytes == sum(per_layer[3:])
    # llama.cpp's KV buffer (80.00 MiB) plus RS buffer (62.81 MiB) at -c 4096, split by layer home
    assert estimate["CPU"].kv_bytes + estimate["CUDA0"].kv_bytes == int((80 + 62.8125) * MIB)


def test_the_apps_estimate_carries_its_recurrent_checkpoints_on_each_layers_device(sparse_35b):
    """The engine keeps RECURRENT_CHECKPOINTS copies of the state to rewind a chat: the app's
    estimate counts them where the layers live; llama.cpp's load-time estimate has none."""
    from engine.devices import Device, simulated_gpus
    from engine.plan.inventory import Inventory
    from engine.plan.llama_args import parse_llama_args
    from engine.plan.memory import MemoryOptions, estimate_memory
    from engine.run.recurrent_state import MAX_CHECKPOINTS
    inv = Inventory.from_model_file(sparse_35b)
    devices = [Device("CPU", "cpu", 256 << 30)] + simulated_gpus("16GiB")
    parsed = parse_llama_args(r"-ngl 99 -c 4096 -ot 'blk\.(0|1|2)\.(attn_qkv|attn_gate|ssm_.*)=CPU,exps=CPU'",
                              inv, devices)
    placement = parsed.placement
    homes = [placement.layer_home_device(il) for il in range(inv.n_layer)]
    app = estimate_memory(inv, placement, parsed.run_config, devices, MemoryOptions(target="app"))
    llama = estimate_memory(inv, placement, parsed.run_config, devices)

    def checkpoint_term(estimate, device):
        return sum(t.n_bytes for t in estimate[device].overhead_terms if "checkpoints" in t.name)

    # 30 recurrent layers of 62.8125 MiB / 30 each at one sequence; 4 copies, by home device
    per_layer = 62.8125 * MIB / 30
    for device in ("CPU", "CUDA0"):
        n_recurrent = sum(home == device and inv.hparams.is_recurrent(il) for il, home in enumerate(homes))
        assert checkpoint_term(app, device) == round(MAX_CHECKPOINTS * n_recurrent * per_layer)
        assert checkpoint_term(llama, device) == 0
    assert checkpoint_term(app, "CPU") > 0 and checkpoint_term(app, "CUDA0") > 0
    assert app["CUDA0"].total_bytes - llama["CUDA0"].total_bytes >= checkpoint_term(app, "CUDA0")


def test_designer_note_says_what_a_sub_q8_0_cache_saves_on_a_hybrid():
    from engine.plan.memory import hybrid_kv_cache_note
    note = hybrid_kv_cache_note(hparams("qwen3.5-35b-a3b"), RunConfig(n_ctx=32768))
    # f16 640 MiB against q4_0's 180 MiB (18 bytes per 32 values) for the 10 attention layers
    assert "10 of 40 layers have a KV cache" in note and "q4_0 saves 460.0 MiB over f16" in note
    assert "62.8 MiB recurrent state" in note and "-ctk q8_0 -ctv q8_0" in note
    assert hybrid_kv_cache_note(hparams("qwen3-30b-a3b"), RunConfig()) is None
