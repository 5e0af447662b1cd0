"""The designer's Qt models and its controller, on a sparse DeepSeek-V3-shaped file and 4 simulated GPUs."""
import json

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor

from app.designer_state import CommandLine, DesignerState, model_key, remap_placement
from app.models import BytesRole, DeviceRole
from app.models.device_lanes import DeviceLaneModel
from app.models.expert_strip import ExpertStripModel
from app.models.layer_grid import LayerGridModel
from app.models.placement_items import (MIME_TYPE, DevicesRole, ExpertCountRole, FitsRole, HeatRole, SplitRole, decode_refs,
                                        encode_refs, short_bytes)
from app.theme import device_color
from tooltips import shown
from engine.plan.autofit import DEFAULT_GPU_MARGIN_BYTES, AutoFitOptions, auto_fit
from engine.plan.memory import MemoryOptions
from engine.devices import Device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.llama_args import parse_llama_args
from engine.plan.placement import Moved, Placement, TensorRef
from engine.run_config import RunConfig

GIB = 1 << 30


def designer_fit(inventory, devices, run_config=RunConfig()):
    """Auto-fit as the designer runs it: with the default GPU margin (llama.cpp's --fit target)."""
    options = AutoFitOptions(MemoryOptions(gpu_margin_bytes=DEFAULT_GPU_MARGIN_BYTES))
    return auto_fit(inventory, devices, run_config, options).placement
UP_40 = "blk.40.ffn_up_exps.weight"
UP_EXPERT_BYTES = 8_257_536           # Q4_K, 2048 x 7168
DOWN_Q6_BYTES = 3_082_813_440         # ffn_down_exps in Q6_K (every third layer in Q4_K_M): 256 x 7168 x 2048


@pytest.fixture(scope="module")
def deepseek_path(tmp_path_factory):
    from engine.synth.writer import write_synthetic
    return write_synthetic(tmp_path_factory.mktemp("designer") / "DeepSeek-V3-Q4_K_M.gguf", "deepseek-v3", sparse=True)


@pytest.fixture(scope="module")
def inventory(deepseek_path) -> Inventory:
    return Inventory.from_model_file(ModelFile(deepseek_path))


@pytest.fixture(scope="module")
def devices():
    return [Device("CPU", "cpu", 512 * GIB, "test CPU")] + simulated_gpus("24GiB,24GiB,24GiB,48GiB")


@pytest.fixture
def placement(inventory, devices) -> Placement:
    return auto_fit(inventory, devices, RunConfig()).placement


@pytest.fixture
def state(qtbot, inventory, devices, tmp_path) -> DesignerState:
    state = DesignerState(tmp_path / "plans")
    state.set_model(inventory, devices, "DeepSeek-V3-Q4_K_M.gguf-123")
    return state


def changes(signal) -> list:
    seen = []
    signal.connect(lambda *args: seen.append(args))
    return seen


# --- the grid ----------------------------------------------------------------------------------

def test_grid_model_passes_the_model_tester(qtmodeltester, inventory, placement):
    qtmodeltester.check(LayerGridModel(inventory, placement))


def test_grid_rows_are_input_layers_output_and_columns_the_groups(inventory, placement):
    model = LayerGridModel(inventory, placement)
    assert model.rowCount() == 1 + 61 + 2
    assert model.columnCount() == 8
    assert [model.headerData(c, Qt.Horizontal) for c in range(8)] == [
        "attn_*", "*_norm", "ffn_gate_inp", "ffn (dense)", "ffn_*_shexp", "ffn_gate_exps", "ffn_up_exps",
        "ffn_down_exps"]
    assert model.headerData(0, Qt.Vertical) == "input"
    assert model.headerData(1, Qt.Vertical) == "0"
    assert [model.headerData(r, Qt.Vertical) for r in (62, 63)] == ["output", "output"]
    assert model.data(model.index(0, 0)) == "token_embd   497 MiB"
    assert model.data(model.index(63, 0)) == "output   725 MiB"
    assert model.data(model.index(0, 3)) is None
    assert model.flags(model.index(0, 3)) & Qt.ItemIsSelectable == Qt.NoItemFlags


def test_a_grid_cell_tells_sizes_types_and_device(inventory, placement):
    model = LayerGridModel(inventory, placement)
    index = model.index_of_tensor(UP_40)
    assert (index.row(), index.column()) == (41, 6)
    assert model.data(index) == "2.0 GiB"
    assert model.data(index, BytesRole) == 256 * UP_EXPERT_BYTES == 2_113_929_216
    assert model.data(index, ExpertCountRole) == 256
    assert model.data(index, DeviceRole) == placement.device_of(UP_40) == "CPU"
    assert model.data(index, Qt.BackgroundRole) == QColor("#858a94")
    assert model.data(index, DevicesRole) == {"CPU": 2_113_929_216}
    assert model.data(index, SplitRole) is False
    tip = model.data(index, Qt.ToolTipRole)
    assert "blk.40.ffn_up_exps.weight   Q4_K   [256 × 2048 × 7168]" in tip
    assert "2,113,929,216 B (2.0 GiB)" in tip
    assert "256 experts × 8,257,536 B (7.9 MiB) each" in tip
    assert "on CPU" in tip
    attention = model.index(41, 0)
    assert model.data(attention, BytesRole) == sum(t.n_bytes for t in inventory.layers[40].tensors
                                                   if t.group == "attention")
    assert model.data(attention, DeviceRole) == placement.layer_home_device(40)
    assert model.data(attention, Qt.BackgroundRole) == device_color(placement.layer_home_device(40))


def test_a_split_cell_shows_every_device_and_its_bytes(inventory, placement):
    model = LayerGridModel(inventory, placement)
    moved = placement.assign(TensorRef(UP_40, frozenset(range(16))), "CUDA1")
    model.tensors_moved(moved)
    index = model.index_of_tensor(UP_40)
    assert model.data(index, SplitRole) is True
    assert model.data(index, DevicesRole) == {"CPU": 240 * UP_EXPERT_BYTES, "CUDA1": 16 * UP_EXPERT_BYTES}
    assert model.data(index, DeviceRole) == "CPU"
    assert "split (ours only): CUDA1 experts 0-15 (126.0 MiB); CPU experts 16-255 (1.8 GiB)" in \
        model.data(index, Qt.ToolTipRole)


def test_moves_emit_one_narrow_data_changed_and_never_a_reset(inventory, placement):
    model = LayerGridModel(inventory, placement)
    changed, resets = changes(model.dataChanged), changes(model.modelReset)
    model.tensors_moved(placement.assign(TensorRef(UP_40, frozenset(range(10))), "CUDA0"))
    assert len(changed) == 1
    top_left, bottom_right = changed[0][:2]
    assert (top_left.row(), top_left.column(), bottom_right.row(), bottom_right.column()) == (41, 6, 41, 6)
    column = [TensorRef(f"blk.{il}.ffn_down_exps.weight") for il in range(3, 61)]
    model.tensors_moved([m for ref in column for m in placement.assign(ref, "CUDA2")])
    top_left, bottom_right = changed[1][:2]
    assert (top_left.row(), top_left.column(), bottom_right.row(), bottom_right.column()) == (4, 7, 61, 7)
    assert model.data(model.index(30, 7), DeviceRole) == "CUDA2"
    assert resets == []


def test_grid_refs_and_mime_carry_the_cells_tensors(inventory, placement):
    model = LayerGridModel(inventory, placement)
    indexes = [model.index(41, 5), model.index(41, 6), model.index(1, 5)]       # layer 0 has no experts
    refs = model.refs_for(indexes)
    assert refs == [TensorRef("blk.40.ffn_gate_exps.weight"), TensorRef(UP_40)]
    mime = model.mimeData(indexes)
    assert mime.hasFormat(MIME_TYPE)
    assert decode_refs(mime) == refs
    partial = encode_refs([TensorRef(UP_40, frozenset({3, 1, 2, 9}))])
    assert decode_refs(partial) == [TensorRef(UP_40, frozenset({1, 2, 3, 9}))]
    assert partial.text() == f"{UP_40} [1-3,9]"


# --- the expert strip --------------------------------------------------------------------------

def test_strip_model_passes_the_model_tester(qtmodeltester, inventory, placement):
    qtmodeltester.check(ExpertStripModel(inventory, placement, 40))


def test_strip_rows_are_the_layers_expert_tensors_and_columns_its_experts(inventory, placement):
    placement.assign(TensorRef(UP_40, frozenset({5, 6})), "CUDA3")
    model = ExpertStripModel(inventory, placement, 40)
    assert model.rowCount() == 3 and model.columnCount() == 256
    assert [model.headerData(r, Qt.Vertical) for r in range(3)] == ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    assert model.data(model.index(1, 5), DeviceRole) == "CUDA3"
    assert model.data(model.index(1, 7), DeviceRole) == "CPU"
    assert model.data(model.index(1, 5), Qt.BackgroundRole) == device_color("CUDA3")
    assert model.data(model.index(1, 5), BytesRole) == UP_EXPERT_BYTES
    assert model.data(model.index(1, 5), HeatRole) is None
    assert shown(model.data(model.index(1, 5), Qt.ToolTipRole)) == \
        f"expert 5 of 256 · 7.9 MiB · on CUDA3\n{UP_40}: 8,257,536 B (7.9 MiB) per expert"
    model.set_layer(1)                  # a dense layer: nothing to show
    assert model.rowCount() == 0 and model.columnCount() == 0


def test_strip_moves_emit_the_span_of_the_experts_that_moved(inventory, placement):
    model = ExpertStripModel(inventory, placement, 40)
    changed, resets = changes(model.dataChanged), changes(model.modelReset)
    model.tensors_moved(placement.assign(TensorRef(UP_40, frozenset(range(20, 30))), "CUDA0"))
    model.tensors_moved(placement.assign(TensorRef("blk.41.ffn_up_exps.weight"), "CUDA0"))    # another layer
    assert len(changed) == 1 and resets == []
    top_left, bottom_right = changed[0][:2]
    assert (top_left.row(), top_left.column(), bottom_right.row(), bottom_right.column()) == (1, 20, 1, 29)
    assert model.data(model.index(1, 25), DeviceRole) == "CUDA0"


def test_strip_refs_move_whole_tensors_when_every_expert_is_picked(inventory, placement):
    model = ExpertStripModel(inventory, placement, 40)
    cells = {(1, e) for e in range(256)} | {(2, 4), (2, 7)}
    assert model.refs_for(cells) == [TensorRef(UP_40), TensorRef("blk.40.ffn_down_exps.weight", frozenset({4, 7}))]


def test_heat_is_the_share_of_the_most_picked_expert(inventory, placement):
    model = ExpertStripModel(inventory, placement, 40)
    heat = np.zeros((61, 256))
    heat[40, 3], heat[40, 4] = 200, 50
    model.set_heat(heat)
    assert model.data(model.index(0, 3), HeatRole) == 1.0
    assert model.data(model.index(2, 4), HeatRole) == 0.25
    assert model.data(model.index(2, 5), HeatRole) == 0.0
    assert shown(model.data(model.index(2, 4), Qt.ToolTipRole)).startswith(
        "expert 4 of 256 · 7.9 MiB · on CPU · router picks 50 / 20.0 %")     # 50 of the layer's 250


# --- the lanes ---------------------------------------------------------------------------------

def test_lane_model_passes_the_model_tester(qtmodeltester, inventory, devices, placement):
    from engine.plan.memory import estimate_memory
    qtmodeltester.check(DeviceLaneModel(devices, estimate_memory(inventory, placement, RunConfig(), devices)))


def test_lanes_show_each_part_of_the_estimate(inventory, devices, placement):
    from engine.plan.memory import estimate_memory
    estimate = estimate_memory(inventory, placement, RunConfig(), devices)
    model = DeviceLaneModel(devices, estimate)
    m = DeviceLaneModel
    assert model.rowCount() == 5
    row = 2                                 # CUDA1
    est = estimate["CUDA1"]
    assert model.data(model.index(row, m.COL_DEVICE)) == "CUDA1"
    assert model.data(model.index(row, m.COL_DEVICE), Qt.DecorationRole) == device_color("CUDA1")
    assert model.data(model.index(row, m.COL_CAPACITY), BytesRole) == 24 * GIB
    assert model.data(model.index(row, m.COL_WEIGHTS), BytesRole) == est.weights_bytes
    assert model.data(model.index(row, m.COL_KV), BytesRole) == est.kv_bytes > 0
    assert model.data(model.index(row, m.COL_COMPUTE), BytesRole) == est.compute_bytes
    assert model.data(model.index(row, m.COL_TOTAL), BytesRole) == est.total_bytes
    assert model.data(model.index(row, m.COL_FREE), BytesRole) == est.free_bytes
    assert model.data(model.index(row, m.COL_CAPACITY)) == "24.0 GiB"
    assert model.data(model.index(row, 0), FitsRole) is True


def test_a_lane_past_capacity_turns_red(inventory, devices, placement):
    from engine.plan.memory import estimate_memory
    placement.assign(TensorRef("blk.50.ffn_down_exps.weight"), "CUDA0")
    estimate = estimate_memory(inventory, placement, RunConfig(), devices)
    model = DeviceLaneModel(devices, estimate)
    index = model.index(1, DeviceLaneModel.COL_FREE)
    assert model.data(index, FitsRole) is False
    assert model.data(index, Qt.ForegroundRole) == QColor("#e5484d")
    assert "over capacity by" in model.data(index, Qt.ToolTipRole)


def test_short_bytes():
    assert [short_bytes(n) for n in (512, 65536, 7 << 20, 106 << 20, 2113929216, 3 << 40)] == \
        ["512 B", "64.0 KiB", "7.0 MiB", "106 MiB", "2.0 GiB", "3.0 TiB"]


# --- the controller ----------------------------------------------------------------------------

def test_opening_a_model_auto_fits_and_emits_the_command_line(state, inventory, devices):
    assert state.placement == designer_fit(inventory, devices)
    assert state.explanation.startswith("All attention, KV and dense weights on 4 GPUs")
    assert state.command_line.text.startswith("-ngl 62 -ts ")
    assert parse_llama_args(state.command_line.text, inventory, devices).placement == state.placement
    assert state.estimate.fits


def test_a_move_changes_weights_by_the_exact_bytes_and_undo_restores(state):
    before = state.placement.copy()
    weights = state.estimate["CUDA0"].weights_bytes
    cpu_weights = state.estimate["CPU"].weights_bytes
    moved = changes(state.placement_changed)
    n_bytes = state.move([TensorRef(UP_40, frozenset(range(12)))], "CUDA0")
    assert n_bytes == 12 * UP_EXPERT_BYTES
    assert state.estimate["CUDA0"].weights_bytes == weights + 12 * UP_EXPERT_BYTES
    assert state.estimate["CPU"].weights_bytes == cpu_weights - 12 * UP_EXPERT_BYTES
    assert moved == [([Moved(TensorRef(UP_40, frozenset(range(12))), "CPU", "CUDA0")],)]
    assert state.explanation == ""
    state.undo_stack.undo()
    assert state.placement == before
    assert state.estimate["CUDA0"].weights_bytes == weights
    state.undo_stack.redo()
    assert state.placement.expert_devices(UP_40)[:13] == ("CUDA0",) * 12 + ("CPU",)
    assert state.undo_stack.undoText() == f"Move 12 experts of {UP_40} to CUDA0"


def test_a_move_that_changes_nothing_is_not_an_undo_step(state):
    assert state.move([TensorRef(UP_40)], state.placement.device_of(UP_40)) == 0
    assert state.undo_stack.count() == 0


def test_a_preview_estimates_without_moving(state):
    seen = changes(state.preview_changed)
    weights = state.estimate["CUDA1"].weights_bytes
    preview = state.preview([TensorRef("blk.51.ffn_down_exps.weight")], "CUDA1")
    assert preview["CUDA1"].weights_bytes == weights + DOWN_Q6_BYTES
    assert state.estimate["CUDA1"].weights_bytes == weights
    state.preview(None)
    assert [args[0] for args in seen] == [preview, None]


def test_the_command_line_follows_moves_after_a_moment(qtbot, state, inventory, devices):
    with qtbot.waitSignal(state.command_line_changed, timeout=2000) as blocker:
        state.move([TensorRef("blk.40.ffn_down_exps.weight")], "CUDA3")
    line = blocker.args[0]
    assert isinstance(line, CommandLine) and line.exact and line == state.command_line
    parsed = parse_llama_args(line.text, inventory, devices).placement
    assert parsed == state.placement and parsed.device_of("blk.40.ffn_down_exps.weight") == "CUDA3"


def test_a_per_expert_split_is_marked_ours_only(state):
    state.move([TensorRef(UP_40, frozenset(range(8)))], "CUDA1")
    line = state.sync_command_line()
    assert not line.exact
    assert line.notes[0].startswith("ours only: llama.cpp cannot split one tensor's experts across devices: "
                                    "blk.40.ffn_up_exps.weight (CPU 1953 MiB, CUDA1 63 MiB); each is placed whole")


def test_a_pasted_command_line_becomes_the_plan_and_round_trips(state, inventory, devices):
    assert state.apply_command_line("llama-server -m model.gguf -ngl 27 -ts 17,20,21,45 -c 8192 -ctk q8_0")
    parsed = parse_llama_args("-ngl 27 -ts 17,20,21,45", inventory, devices)
    assert state.placement == parsed.placement
    assert (state.run_config.n_ctx, state.run_config.type_k) == (8192, "q8_0")
    text = state.command_line.text
    assert text == "-ngl 27 -ts 3,3,4,7 -c 8192 -ctk q8_0"
    again = parse_llama_args(text, inventory, devices)
    assert again.placement == state.placement and again.run_config == state.run_config
    assert state.undo_stack.undoText() == "Apply command line"
    state.undo_stack.undo()
    assert state.placement == designer_fit(inventory, devices)
    assert state.run_config == RunConfig()


def test_a_bad_command_line_reports_and_keeps_the_plan(state):
    before = state.placement.copy()
    errors = changes(state.command_error)
    assert not state.apply_command_line("-ngl 99 -ot exps=CUDA9")
    assert "unknown buffer type 'CUDA9'" in errors[0][0]
    assert state.placement == before and state.undo_stack.count() == 0


def test_shell_line_continuations_are_read(state, inventory, devices):
    assert state.apply_command_line("./llama-cli \\\n  -ngl 62 \\\n  --cpu-moe")
    assert state.placement == parse_llama_args("-ngl 62 --cpu-moe", inventory, devices).placement


def test_auto_fit_is_one_undo_step(state, inventory, devices):
    state.apply_command_line("-ngl 0")
    assert state.estimate["CUDA0"].weights_bytes == 0
    explanation = state.auto_fit()
    assert explanation == state.explanation and "4 GPUs" in explanation
    assert state.estimate.fits
    state.undo_stack.undo()
    assert state.estimate["CUDA0"].weights_bytes == 0 and state.explanation == ""


def test_run_settings_change_the_kv_cache_and_undo(state):
    kv = state.estimate["CUDA0"].kv_bytes
    state.set_run_config(state.run_config.replace(n_ctx=16384))
    assert state.estimate["CUDA0"].kv_bytes == 4 * kv
    state.set_run_config(state.run_config.replace(type_k="q8_0", type_v="q8_0"))
    assert state.estimate["CUDA0"].kv_bytes < 4 * kv
    assert "-c 16384 -ctk q8_0 -ctv q8_0" in state.sync_command_line().text
    state.undo_stack.undo()
    state.undo_stack.undo()
    assert state.estimate["CUDA0"].kv_bytes == kv


def test_adding_and_removing_simulated_gpus(state):
    state.move([TensorRef("blk.40.ffn_down_exps.weight")], "CUDA2")
    device = state.add_simulated_gpu(80 * GIB)
    assert device.name == "CUDA4" and device.simulated
    assert [d.name for d in state.devices][-1] == "CUDA4"
    assert state.estimate["CUDA4"].capacity_bytes == 80 * GIB
    assert state.placement.device_of("blk.40.ffn_down_exps.weight") == "CUDA2"
    state.remove_device("CUDA2")
    assert "CUDA2" not in state.placement.device_names
    assert state.placement.device_of("blk.40.ffn_down_exps.weight") == "CPU"
    with pytest.raises(ValueError):
        state.remove_device("CPU")


def test_remap_keeps_splits_on_the_devices_that_remain(inventory, devices, placement):
    placement.assign(TensorRef(UP_40, frozenset(range(4))), "CUDA3")
    placement.assign(TensorRef(UP_40, frozenset(range(4, 8))), "CUDA0")
    remapped = remap_placement(placement, inventory, devices[:4])       # CUDA3 is gone
    assert remapped.expert_devices(UP_40)[:9] == ("CPU",) * 4 + ("CUDA0",) * 4 + ("CPU",)


def test_plans_save_and_load(state, tmp_path):
    state.add_simulated_gpu(16 * GIB)
    state.move([TensorRef(UP_40, frozenset(range(3)))], "CUDA4")
    state.set_run_config(state.run_config.replace(n_ctx=32768))
    path = tmp_path / "plan.json"
    state.save_plan(path)
    data = json.loads(path.read_text())
    assert data["format"] == "offload-studio-plan" and data["run_config"]["n_ctx"] == 32768
    assert data["placement"]["experts"][UP_40] == {"CUDA4": "0-2", "CPU": "3-255"}
    saved = state.placement.copy()

    other = DesignerState(tmp_path / "other")
    other.set_model(state.inventory, state.devices[:5], None)       # without the simulated CUDA4
    other.load_plan(path)
    assert [d.name for d in other.devices][-1] == "CUDA4"
    assert other.placement == remap_placement(saved, state.inventory, other.devices)
    assert other.run_config.n_ctx == 32768
    other.undo_stack.undo()
    assert other.run_config.n_ctx == RunConfig().n_ctx


def test_a_plan_naming_a_missing_real_gpu_is_refused(state, tmp_path):
    path = tmp_path / "plan.json"
    state.save_plan(path)
    data = json.loads(path.read_text())
    data["devices"].append({"name": "CUDA7", "kind": "gpu", "total_bytes": GIB, "simulated": False})
    path.write_text(json.dumps(data))
    before = state.placement.copy()
    with pytest.raises(ValueError, match="CUDA7"):
        state.load_plan(path)
    assert state.placement == before
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not an Offload Studio plan"):
        state.load_plan(path)


def test_the_last_plan_of_a_model_comes_back(qtbot, state, inventory, devices, tmp_path):
    state.move([TensorRef("blk.45.ffn_down_exps.weight")], "CUDA3")
    state.sync_command_line()
    remembered = state.remembered_path()
    assert remembered.name == "DeepSeek-V3-Q4_K_M.gguf-123.json" and remembered.is_file()
    again = DesignerState(tmp_path / "plans")
    again.set_model(inventory, devices, "DeepSeek-V3-Q4_K_M.gguf-123")
    assert again.placement == state.placement and again.placement_was_restored
    fresh = DesignerState(tmp_path / "plans")
    fresh.set_model(inventory, devices, "another-model.gguf-1")
    assert fresh.placement == designer_fit(inventory, devices)


def test_an_untouched_plan_is_refit_when_the_gpus_arrive(qtbot, inventory, devices, tmp_path):
    cpu_only = DesignerState(tmp_path / "plans")
    cpu_only.set_model(inventory, devices[:1], None)
    assert [d.device for d in cpu_only.estimate.devices] == ["CPU"]
    cpu_only.set_devices(devices)
    assert cpu_only.placement == designer_fit(inventory, devices)


def test_model_key_is_the_file_name_and_size(deepseek_path):
    assert model_key(deepseek_path) == f"DeepSeek-V3-Q4_K_M.gguf-{deepseek_path.stat().st_size}"
    assert model_key("/nowhere/a b.gguf") == "a_b.gguf-0"


def test_a_remembered_plan_waits_for_its_gpus(qtbot, inventory, tmp_path):
    real = [Device("CPU", "cpu", 512 * GIB), Device("CUDA0", "gpu", 24 * GIB, "RTX 4090"),
            Device("CUDA1", "gpu", 24 * GIB, "RTX 4090")]
    first = DesignerState(tmp_path / "plans")
    first.set_model(inventory, real, "model-1")
    first.sync_command_line()
    assert not first.remembered_path().exists(), "the plan opening made is not the user's"
    first.move([TensorRef("blk.10.ffn_down_exps.weight")], "CUDA1")
    first.sync_command_line()
    assert first.remembered_path().exists()
    later = DesignerState(tmp_path / "plans")
    notices = changes(later.message)
    later.set_model(inventory, real[:1], "model-1")           # opened before the GPUs were found
    assert later.placement.weight_bytes() == {"CPU": inventory.total_bytes} and notices == []
    later.set_devices(real)
    assert later.placement == first.placement


def test_adding_a_gpu_keeps_the_undo_history(state):
    state.move([TensorRef("blk.40.ffn_down_exps.weight")], "CUDA2")
    state.add_simulated_gpu(80 * GIB)
    state.move([TensorRef("blk.41.ffn_down_exps.weight")], "CUDA4")
    state.undo_stack.undo()
    state.undo_stack.undo()
    assert state.placement.device_of("blk.40.ffn_down_exps.weight") == "CPU"
    assert state.placement.device_names[-1] == "CUDA4"


# --- one verdict for the plan as it stands ------------------------------------------------------

def over_by(estimate) -> dict:
    return {d.device: -d.free_bytes for d in estimate.devices if not d.fits}


def expected_verdict(estimate) -> str:
    from engine.units import format_bytes
    over = over_by(estimate)
    if over:
        return "Does not fit: " + ", ".join(f"{d} over by {format_bytes(n)}" for d, n in over.items()) + "."
    tightest = min(estimate.devices, key=lambda d: d.free_bytes)
    return f"Fits: every device within its memory; least room on {tightest.device}, " \
           f"{format_bytes(tightest.free_bytes)} free."


def test_the_verdict_follows_every_kind_of_change(qtbot, state, inventory, devices, tmp_path):
    verdicts = changes(state.verdict_changed)
    assert state.verdict.startswith("Fits: ") and state.verdict == expected_verdict(state.estimate)
    # a manual move past CUDA1's memory: up and gate experts of layers 50..57, 2 GiB each
    state.move([TensorRef(f"blk.{il}.ffn_{g}_exps.weight") for il in range(50, 58) for g in ("up", "gate")], "CUDA1")
    assert not state.estimate.fits and set(over_by(state.estimate)) == {"CUDA1"}
    assert verdicts[-1] == (expected_verdict(state.estimate), False)
    assert verdicts[-1][0].startswith("Does not fit: CUDA1 over by ")
    state.auto_fit()
    assert verdicts[-1] == (expected_verdict(state.estimate), True)
    state.apply_command_line("-ngl 99 -ts 1,1,1,1")         # everything on four GPUs: far over
    assert verdicts[-1][1] is False and set(over_by(state.estimate)) == {"CUDA0", "CUDA1", "CUDA2", "CUDA3"}
    assert verdicts[-1][0] == expected_verdict(state.estimate)
    saved = tmp_path / "over.json"
    state.save_plan(saved)
    state.auto_fit()
    assert verdicts[-1][1] is True
    state.load_plan(saved)                                  # a plan loaded from a file
    assert verdicts[-1] == (expected_verdict(state.estimate), False)
    state.sync_command_line()                               # remembered: the user's plan
    restored = DesignerState(tmp_path / "plans")
    restored_verdicts = changes(restored.verdict_changed)
    restored.set_model(inventory, devices, "DeepSeek-V3-Q4_K_M.gguf-123")
    assert restored.placement_was_restored
    assert restored_verdicts[-1] == (state.verdict, False) and restored.verdict == state.verdict


def test_a_plan_that_does_not_fit_is_refused_with_the_ways_out(state):
    assert state.refusal() == ""
    state.apply_command_line("-ngl 99 -ts 1,1,1,1 -c 32768")
    refusal = state.refusal()
    assert refusal.startswith(state.verdict) and "Does not fit" in refusal
    assert "Auto-fit" in refusal and "smaller context (now 32,768 tokens)" in refusal and "quant" in refusal


def test_auto_fit_leaves_the_default_margin_on_every_gpu(state):
    from engine.plan.autofit import DEFAULT_GPU_MARGIN_BYTES
    assert DEFAULT_GPU_MARGIN_BYTES == 1024 << 20           # llama.cpp's --fit target
    assert state.memory_options.gpu_margin_bytes == DEFAULT_GPU_MARGIN_BYTES
    for d in state.estimate.devices[1:]:
        assert d.margin_bytes == DEFAULT_GPU_MARGIN_BYTES
        assert d.total_bytes + DEFAULT_GPU_MARGIN_BYTES <= d.capacity_bytes
