"""The designer panel: drops on lanes, mouse selection, keyboard and context-menu moves, undo, the
command-line field, auto-fit, simulated GPUs and saved plans — on a sparse DeepSeek-V3 shape."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PySide6.QtCore import QItemSelectionModel, QPoint, QPointF, Qt
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QKeySequence

from app.models.placement_items import HeatRole
from app.widgets.designer import DesignerDialogs, DesignerPanel
from engine.plan.autofit import DEFAULT_GPU_MARGIN_BYTES, AutoFitOptions, auto_fit
from engine.plan.memory import MemoryOptions
from engine.devices import Device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.llama_args import parse_llama_args
from engine.plan.placement import TensorRef
from engine.run_config import RunConfig

GIB = 1 << 30


def designer_fit(inventory, devices, run_config=RunConfig()):
    """Auto-fit as the designer runs it: with the default GPU margin (llama.cpp's --fit target)."""
    options = AutoFitOptions(MemoryOptions(gpu_margin_bytes=DEFAULT_GPU_MARGIN_BYTES))
    return auto_fit(inventory, devices, run_config, options).placement
UP_40 = "blk.40.ffn_up_exps.weight"
GATE_40 = "blk.40.ffn_gate_exps.weight"
UP_EXPERT_BYTES = 8_257_536


class FakeDialogs(DesignerDialogs):
    def __init__(self):
        self.capacity, self.save_path, self.open_path = None, None, None

    def ask_gpu_capacity(self, parent):
        return self.capacity

    def save_plan_path(self, parent, suggested):
        return self.save_path

    def open_plan_path(self, parent):
        return self.open_path


@pytest.fixture(scope="module")
def deepseek_file(tmp_path_factory) -> Path:
    from engine.synth.writer import write_synthetic
    return write_synthetic(tmp_path_factory.mktemp("panel") / "DeepSeek-V3-Q4_K_M.gguf", "deepseek-v3", sparse=True)


@pytest.fixture(scope="module")
def inventory(deepseek_file) -> Inventory:
    return Inventory.from_model_file(ModelFile(deepseek_file))


@pytest.fixture(scope="module")
def devices():
    return [Device("CPU", "cpu", 512 * GIB)] + simulated_gpus("24GiB,24GiB,24GiB,48GiB")


@pytest.fixture
def dialogs():
    return FakeDialogs()


@pytest.fixture
def panel(qtbot, inventory, devices, dialogs, tmp_path) -> DesignerPanel:
    panel = DesignerPanel(state_dir=tmp_path / "plans", dialogs=dialogs)
    qtbot.addWidget(panel)
    panel.resize(1360, 860)
    panel.set_inventory(inventory, devices)
    panel.show_layer_experts(40)
    return panel


_LIVE_MIME = []     # an event holds its QMimeData by a raw pointer: keep the Python side alive


def drop_event(mime, kind=QDropEvent):
    _LIVE_MIME.append(mime)
    try:
        return kind(QPointF(10, 10), Qt.MoveAction, mime, Qt.LeftButton, Qt.NoModifier)
    except TypeError:       # QDragEnterEvent takes a QPoint before Qt 6.12
        return kind(QPoint(10, 10), Qt.MoveAction, mime, Qt.LeftButton, Qt.NoModifier)


def weights(panel, device: str) -> int:
    return panel.state.estimate[device].weights_bytes


# --- opening -------------------------------------------------------------------------------------

def test_the_panel_shows_lanes_grid_and_strip(panel, inventory, devices):
    assert [lane.device.name for lane in panel.lanes.lanes] == ["CPU", "CUDA0", "CUDA1", "CUDA2", "CUDA3"]
    assert panel.grid_model.rowCount() == 64
    assert panel.grid.columnSpan(0, 0) == 8 and panel.grid.columnSpan(5, 0) == 1
    assert panel.strip_model.layer == 40 and panel.strip_model.columnCount() == 256
    assert panel.strip_title.text() == "Experts of blk.40"
    assert panel.explanation.text().startswith("All attention, KV and dense weights on 4 GPUs")
    assert panel.placement == designer_fit(inventory, devices)
    assert parse_llama_args(panel.command_editor.text, inventory, devices).placement == panel.placement
    assert panel.title.text() == "DeepSeek-V3 (shape)"


def test_the_main_window_hook_takes_a_loaded_model(qtbot, deepseek_file, inventory, devices, tmp_path):
    panel = DesignerPanel(state_dir=tmp_path / "plans", devices=devices)
    qtbot.addWidget(panel)
    panel.set_model(SimpleNamespace(path=deepseek_file, inventory=inventory))
    assert panel.stack.currentIndex() == 1
    assert panel.state.model_key == f"DeepSeek-V3-Q4_K_M.gguf-{deepseek_file.stat().st_size}"
    panel.set_model(None)
    assert panel.stack.currentIndex() == 0 and panel.state.inventory is None


# --- moving ----------------------------------------------------------------------------------------

def test_dropping_grid_cells_on_a_lane_moves_them(panel):
    model = panel.grid_model
    cells = [model.index_of_tensor(GATE_40), model.index_of_tensor(UP_40)]
    n_bytes = 2 * 256 * UP_EXPERT_BYTES
    cuda1 = weights(panel, "CUDA1")
    lane = panel.lanes.lane("CUDA1")
    lane.dragEnterEvent(drop_event(model.mimeData(cells), QDragEnterEvent))
    assert panel.lane_model.preview["CUDA1"].weights_bytes == cuda1 + n_bytes     # what the drop would do
    assert lane.drop_hover
    event = drop_event(model.mimeData(cells))
    lane.dropEvent(event)
    assert event.isAccepted()
    assert panel.lane_model.preview is None and not lane.drop_hover
    assert panel.placement.device_of(GATE_40) == panel.placement.device_of(UP_40) == "CUDA1"
    assert weights(panel, "CUDA1") == cuda1 + n_bytes
    assert panel.lane_model.data(panel.lane_model.index(2, panel.lane_model.COL_WEIGHTS),
                                 Qt.UserRole + 1) == cuda1 + n_bytes


def test_rubber_band_in_the_strip_then_a_drop_moves_those_experts(qtbot, panel):
    strip = panel.strip
    strip.resize(1000, strip.height_for(1000))
    start = strip.tile_rect(0, 0).center()          # ffn_gate_exps, expert 0
    end = strip.tile_rect(1, 7).center()            # ffn_up_exps, expert 7
    qtbot.mousePress(strip, Qt.LeftButton, pos=start)
    qtbot.mouseMove(strip, end)
    qtbot.mouseRelease(strip, Qt.LeftButton, pos=end)
    assert strip.selection == {(row, e) for row in (0, 1) for e in range(8)}
    assert "16 expert tiles · 126 MiB" in panel.selection_label.text()
    refs = strip.selected_refs()
    assert refs == [TensorRef(GATE_40, frozenset(range(8))), TensorRef(UP_40, frozenset(range(8)))]
    cuda0 = weights(panel, "CUDA0")
    panel.lanes.lane("CUDA0").dropEvent(drop_event(panel.strip_model.mimeData(
        [panel.strip_model.index(r, e) for r, e in strip.selection])))
    assert weights(panel, "CUDA0") == cuda0 + 16 * UP_EXPERT_BYTES
    assert panel.placement.expert_devices(UP_40)[:9] == ("CUDA0",) * 8 + ("CPU",)
    assert panel.grid_model.data(panel.grid_model.index_of_tensor(UP_40), Qt.UserRole + 21) is True   # split
    assert panel.ours_only.isHidden() is False or panel.state.sync_command_line().exact is False


def test_ctrl_digits_and_delete_move_the_selection(qtbot, panel):
    strip = panel.strip
    strip.set_selection({(2, e) for e in range(4)})             # four ffn_down_exps experts
    down = "blk.40.ffn_down_exps.weight"
    expert_bytes = panel.state.inventory.by_name[down].expert_bytes
    cuda2 = weights(panel, "CUDA2")
    qtbot.keyClick(strip, Qt.Key_3, Qt.ControlModifier)         # Ctrl+3: the third GPU, CUDA2
    assert panel.placement.expert_devices(down)[:5] == ("CUDA2",) * 4 + ("CPU",)
    assert weights(panel, "CUDA2") == cuda2 + 4 * expert_bytes
    qtbot.keyClick(strip, Qt.Key_Delete)                        # Delete: back to the CPU
    assert weights(panel, "CUDA2") == cuda2
    assert set(panel.placement.expert_devices(down)) == {"CPU"}
    grid = panel.grid
    grid.setCurrentIndex(panel.grid_model.index_of_tensor(down))
    qtbot.keyClick(grid, Qt.Key_1, Qt.ControlModifier)          # Ctrl+1: CUDA0
    assert panel.placement.device_of(down) == "CUDA0"
    qtbot.keyClick(grid, Qt.Key_0, Qt.ControlModifier)          # Ctrl+0: the CPU
    assert panel.placement.device_of(down) == "CPU"
    qtbot.keyClick(grid, Qt.Key_9, Qt.ControlModifier)          # no ninth GPU: nothing moves, a notice says why
    assert panel.placement.device_of(down) == "CPU" and "There is no GPU 9" in panel.notice.text()


def test_clicking_a_group_header_selects_that_group_in_every_layer(qtbot, panel):
    header = panel.grid.horizontalHeader()
    column = 7                                  # ffn_down_exps
    x = header.sectionViewportPosition(column) + header.sectionSize(column) // 2
    qtbot.mouseClick(header.viewport(), Qt.LeftButton, pos=QPoint(x, header.height() // 2))
    refs = panel.grid.selected_refs()
    assert refs == [TensorRef(f"blk.{il}.ffn_down_exps.weight") for il in range(3, 61)]
    qtbot.mouseClick(header.viewport(), Qt.LeftButton, pos=QPoint(header.sectionViewportPosition(0) + 5, 5))
    attention = [TensorRef(t.name) for layer in panel.state.inventory.layers for t in layer.tensors
                 if t.group == "attention"]
    assert panel.grid.selected_refs() == attention       # not token_embd or output, which share column 0


def test_the_context_menu_moves_to_each_device(panel):
    panel.select_grid_cells(["blk.50.ffn_down_exps.weight", "blk.51.ffn_down_exps.weight"])
    menu = panel.move_menu(panel.grid)
    move_to = menu.actions()[0].menu()
    labels = [a.text().split("\t") for a in move_to.actions()]
    assert labels == [["CPU", "Ctrl+0"], ["CUDA0", "Ctrl+1"], ["CUDA1", "Ctrl+2"], ["CUDA2", "Ctrl+3"],
                      ["CUDA3", "Ctrl+4"]]
    move_to.actions()[4].trigger()
    assert panel.placement.device_of("blk.50.ffn_down_exps.weight") == "CUDA3"
    assert panel.placement.device_of("blk.51.ffn_down_exps.weight") == "CUDA3"
    assert not panel.state.estimate["CUDA3"].fits        # 5 GiB more than CUDA3 has free
    assert panel.lane_model.data(panel.lane_model.index(4, 0), Qt.UserRole + 25) is False


def test_undo_and_redo(qtbot, panel):
    before = panel.placement.copy()
    panel.move_refs([TensorRef("blk.30.ffn_down_exps.weight")], "CUDA3")
    assert panel.undo_button.isEnabled() and not panel.redo_button.isEnabled()
    assert "Move blk.30.ffn_down_exps.weight to CUDA3" in panel.undo_button.toolTip()
    qtbot.mouseClick(panel.undo_button, Qt.LeftButton)
    assert panel.placement == before
    assert panel.redo_button.isEnabled()
    panel.redo_action.trigger()
    assert panel.placement.device_of("blk.30.ffn_down_exps.weight") == "CUDA3"
    assert QKeySequence("Ctrl+Z") in panel.undo_action.shortcuts()
    assert QKeySequence("Ctrl+Shift+Z") in panel.redo_action.shortcuts()
    assert panel.undo_action.shortcutContext() == Qt.WidgetWithChildrenShortcut


# --- the command line ------------------------------------------------------------------------------

def test_a_pasted_command_line_round_trips_through_the_field(qtbot, panel, inventory, devices):
    edit = panel.command_editor.edit
    edit.setPlainText("-ngl 27 -ts 17,20,21,45 -fmoe -mla 3 -amb 512")
    assert panel.command_editor.edited
    qtbot.keyClick(edit, Qt.Key_Return)
    expected = parse_llama_args("-ngl 27 -ts 17,20,21,45", inventory, devices).placement
    assert panel.placement == expected
    # at once, without Esc: the box holds the plan's own line and the notes on what was ignored
    assert not panel.command_editor.edited
    text = panel.command_editor.text
    assert text == "-ngl 27 -ts 3,3,4,7"
    status = panel.command_editor.status.text()
    assert "Edited" not in status
    assert all(f"{flag}: ik_llama.cpp option" in status for flag in ("-fmoe", "-mla", "-amb"))
    assert parse_llama_args(text, inventory, devices).placement == expected
    assert panel.explanation.isHidden()


def test_a_pasted_line_starts_from_llama_cpp_defaults(qtbot, panel):
    panel.apply_command_line("-ngl 99 -ctk q8_0 -ctv q8_0 -fa off -c 8192")
    assert (panel.run_config.type_k, panel.run_config.flash_attn, panel.run_config.n_ctx) == ("q8_0", "off", 8192)
    assert any("quantized V cache (-ctv q8_0) with flash attention off" in n for n in panel.state.command_line.notes)
    panel.apply_command_line("-ngl 99 --n-cpu-moe 30")
    rc = panel.run_config
    assert (rc.type_k, rc.type_v, rc.flash_attn, rc.n_ctx) == ("f16", "f16", "auto", 0)
    assert panel.run_settings.type_k.currentText() == "f16" and panel.run_settings.flash_attn.currentText() == "auto"


def test_the_line_carries_the_model_file_and_its_overrides(qtbot, panel, deepseek_file, inventory, devices):
    loaded = SimpleNamespace(path=deepseek_file, inventory=inventory,
                             overrides=("deepseek2.expert_used_count=int:6",))
    panel.set_model(loaded)
    text = panel.state.sync_command_line().text
    assert text.startswith(f"-m {deepseek_file} -ngl 62 ")
    assert text.endswith(" --override-kv deepseek2.expert_used_count=int:6")
    panel.dialect_box.setCurrentText("ik_llama.cpp")
    assert panel.state.dialect == "ik_llama.cpp" and "-fa" not in panel.command_editor.text.split()


def test_an_unreadable_command_line_is_shown_in_red_and_the_plan_stays(qtbot, panel):
    before = panel.placement.copy()
    edit = panel.command_editor.edit
    edit.setPlainText("-ngl 99 -ctk q3_banana")
    panel.command_editor.apply_button.click()
    status = panel.command_editor.status
    assert status.property("level") == "error"
    assert "unknown cache type 'q3_banana'" in status.text() and "The plan is unchanged" in status.text()
    assert panel.placement == before
    assert panel.command_editor.text == "-ngl 99 -ctk q3_banana"        # the user's text is kept
    panel.move_refs([TensorRef("blk.33.ffn_down_exps.weight")], "CUDA0")
    panel.state.sync_command_line()
    assert panel.command_editor.text == "-ngl 99 -ctk q3_banana"        # not overwritten mid-edit
    qtbot.keyClick(edit, Qt.Key_Escape)
    assert panel.command_editor.text == panel.state.command_line.text


def test_a_split_shows_the_ours_only_badge(panel):
    panel.move_refs([TensorRef(UP_40, frozenset(range(5)))], "CUDA0")
    panel.state.sync_command_line()
    assert not panel.ours_only.isHidden()
    assert panel.command_editor.status.text().startswith("ours only: llama.cpp cannot split")
    panel.state.undo_stack.undo()
    panel.state.sync_command_line()
    assert panel.ours_only.isHidden()


# --- auto-fit, run settings, devices, plans -------------------------------------------------------

def test_the_auto_fit_button_makes_a_fitting_plan(qtbot, panel):
    panel.apply_command_line("-ngl 99")          # everything on the GPUs: far too much
    assert not panel.state.estimate.fits
    qtbot.mouseClick(panel.auto_fit_button, Qt.LeftButton)
    assert panel.state.estimate.fits
    assert panel.explanation.text().startswith("All attention, KV and dense weights on 4 GPUs")
    assert not panel.explanation.isHidden()
    panel.undo_action.trigger()
    assert not panel.state.estimate.fits


def test_run_settings_feed_the_estimate(panel):
    kv = panel.state.estimate["CUDA0"].kv_bytes
    panel.run_settings.context.setValue(8192)
    assert panel.run_config.n_ctx == 8192
    assert panel.state.estimate["CUDA0"].kv_bytes == 2 * kv
    panel.run_settings.type_k.setCurrentText("q8_0")
    assert panel.run_config.type_k == "q8_0"
    panel.run_settings.flash_attn.setCurrentText("off")
    panel.run_settings.ubatch.setValue(1024)
    assert (panel.run_config.flash_attn, panel.run_config.n_ubatch) == ("off", 1024)
    assert "-c 8192 -ub 1024 -ctk q8_0 -fa off" in panel.state.sync_command_line().text
    panel.undo_action.trigger()
    assert panel.run_settings.ubatch.value() == 512       # the form follows undo


def test_the_gpu_margin_reaches_the_estimate_and_auto_fit(panel):
    panel.run_settings.margin.setValue(2048)
    assert panel.state.estimate["CUDA0"].margin_bytes == 2 * GIB
    panel.auto_fit()
    for d in panel.state.estimate.devices[1:]:
        assert d.total_bytes + 2 * GIB <= d.capacity_bytes


def test_adding_a_simulated_gpu(panel, dialogs):
    dialogs.capacity = "80GiB"
    panel.add_gpu_button.click()
    assert [lane.device.name for lane in panel.lanes.lanes][-1] == "CUDA4"
    assert panel.state.estimate["CUDA4"].capacity_bytes == 80 * GIB
    dialogs.capacity = "lots"
    panel.add_gpu_button.click()
    assert "cannot read size 'lots'" in panel.notice.text()
    assert len(panel.lanes.lanes) == 6


def test_saving_and_loading_a_plan(panel, dialogs, tmp_path):
    panel.move_refs([TensorRef("blk.44.ffn_down_exps.weight")], "CUDA1")
    saved = panel.placement.copy()
    dialogs.save_path = str(tmp_path / "mine.json")
    panel.save_button.click()
    panel.auto_fit()
    assert panel.placement != saved
    dialogs.open_path = dialogs.save_path
    panel.load_button.click()
    assert panel.placement == saved
    dialogs.open_path = str(tmp_path / "missing.json")
    panel.load_button.click()
    assert "Could not load missing.json" in panel.notice.text()


def test_expert_heat_reaches_the_strip(panel):
    heat = np.zeros((61, 256))
    heat[40, 7] = 10
    panel.set_expert_heat(heat)
    assert panel.strip_model.data(panel.strip_model.index(0, 7), HeatRole) == 1.0
    assert "brighter: picked more by the router" in panel.strip_hint.text()
    panel.set_expert_heat(None)
    assert panel.strip_model.data(panel.strip_model.index(0, 7), HeatRole) is None


def test_clicking_a_layer_opens_its_experts(qtbot, panel):
    index = panel.grid_model.index(panel.grid_model.row_of_layer(12), 0)
    panel.grid.selectionModel().setCurrentIndex(index, QItemSelectionModel.ClearAndSelect)
    assert panel.strip_model.layer == 12
    panel.grid.selectionModel().setCurrentIndex(panel.grid_model.index(0, 0), QItemSelectionModel.ClearAndSelect)
    assert panel.strip_model.layer == 12            # the input row has no layer: the strip stays


@pytest.mark.parametrize("preset", ["tiny-gemma-3", "tiny-mixtral"])
def test_small_dense_and_moe_models(qtbot, tmp_path, preset):
    from engine.synth.writer import write_synthetic
    inventory = Inventory.from_model_file(ModelFile(write_synthetic(tmp_path / "m.gguf", preset, sparse=True)))
    panel = DesignerPanel(state_dir=tmp_path / "plans")
    qtbot.addWidget(panel)
    panel.set_inventory(inventory, [Device("CPU", "cpu", 64 * GIB), Device("CUDA0", "gpu", 8 * GIB)])
    assert panel.grid_model.rowCount() == inventory.n_layer + len(inventory.globals)
    assert panel.state.estimate.fits
    assert panel.strip_box.isHidden() == (inventory.n_expert == 0)
    layer_rows = panel.grid_model.layer_rows()
    panel.grid.selectRow(layer_rows.start)
    qtbot.keyClick(panel.grid, Qt.Key_Backspace)
    assert all(panel.placement.device_of(t.name) == "CPU" for t in inventory.layers[0].tensors)


def test_the_verdict_is_always_shown_and_nothing_shifts_the_grid(qtbot, panel):
    panel.show()
    qtbot.waitExposed(panel)
    grid_top = panel.grid.mapTo(panel, QPoint(0, 0)).y()
    command_top = panel.command_editor.mapTo(panel, QPoint(0, 0)).y()
    assert panel.verdict_label.isVisible() and panel.verdict_label.text().startswith("Fits: ")
    assert panel.verdict_label.property("fits") == "true"
    panel.move_refs([TensorRef(f"blk.{il}.ffn_up_exps.weight") for il in range(40, 60)], "CUDA0")
    assert panel.verdict_label.text().startswith("Does not fit: CUDA0 over by ")
    assert panel.verdict_label.property("fits") == "false"
    panel.show_notice("A notice that takes two lines of text in the designer's notice area " * 3)
    panel.apply_command_line("-ngl 99 -fmoe -mla 3 -amb 512 --frobnicate")
    qtbot.wait(10)
    assert panel.verdict_label.text() == panel.state.verdict
    assert panel.grid.mapTo(panel, QPoint(0, 0)).y() == grid_top
    assert panel.command_editor.mapTo(panel, QPoint(0, 0)).y() == command_top


def test_hovering_an_expert_tile_shows_its_tooltip(qtbot, panel):
    from PySide6.QtGui import QHelpEvent
    from PySide6.QtWidgets import QApplication, QToolTip
    from PySide6.QtCore import QEvent
    panel.show()
    qtbot.waitExposed(panel)
    strip = panel.strip
    centre = strip.tile_rect(1, 17).center()
    QApplication.sendEvent(strip, QHelpEvent(QEvent.ToolTip, centre, strip.mapToGlobal(centre)))
    expected = panel.strip_model.data(panel.strip_model.index(1, 17), Qt.ToolTipRole)
    assert "expert 17 of 256 · 7.9 MiB · on " in expected
    assert strip.tooltip_at(centre) == expected
    qtbot.waitUntil(lambda: QToolTip.isVisible() and QToolTip.text() == expected)
