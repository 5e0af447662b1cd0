"""The offload designer panel: device lanes, the layer grid, one layer's experts, run settings,
auto-fit and the llama.cpp command line, bound to one `DesignerState`.

The panel lays the pieces out and routes what the user asks for — a drop on a lane, a context
menu choice, Ctrl+digit, Delete, undo — to the controller. It does no placement math itself.

    panel = DesignerPanel(state_dir=...)
    window.add_panel("Designer", panel)            # the window calls panel.set_model(loaded)
    window.devices_changed.connect(panel.set_devices)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PySide6.QtCore import QEvent, QItemSelection, QItemSelectionModel, QPoint, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (QComboBox, QFrame, QHBoxLayout, QLabel, QMenu, QPushButton, QScrollArea, QSplitter,
                               QStackedWidget, QToolButton, QVBoxLayout, QWidget)

from app.designer_state import DesignerState, model_key
from app.models.device_lanes import DeviceLaneModel
from app.models.expert_strip import ExpertStripModel
from app.models.layer_grid import LayerGridModel
from app.models.placement_items import short_bytes
from app.widgets.designer_controls import CommandLineEditor, DesignerDialogs, RunSettingsForm
from app.widgets.designer_grid import ExpertStripView, LayerGridView
from app.widgets.designer_lanes import DeviceLanesView, LaneLegend
from app.widgets.designer_style import DESIGNER_QSS
from engine.devices import Device, cpu_device, parse_size
from engine.plan.inventory import Inventory
from engine.units import format_bytes


STRIP_CHROME_HEIGHT = 30      # the strip's title row and margins
STRIP_SHARE = 0.45            # at most this much of the grid-and-strip column goes to the expert strip
NOTICE_MS = 12_000            # a notice stays this long
PLAN_STATUS_CHROME = 30       # padding and borders of the verdict and the line under it
DIALECTS = ("llama.cpp", "ik_llama.cpp")


def _section(title: str) -> QLabel:
    return QLabel(title, objectName="sectionTitle")


class DesignerPanel(QWidget):
    """The designer. `set_model(loaded)` opens a model (as the main window calls it); `set_inventory`
    does the same from engine objects; `set_devices` changes the devices planned for."""

    placement_changed = Signal(object)      # engine.plan.placement.Placement, after every change
    estimate_changed = Signal(object)       # engine.plan.memory.MemoryEstimate
    command_line_changed = Signal(str)      # the llama.cpp command line of the plan

    def __init__(self, parent: QWidget | None = None, state_dir: Path | None = None,
                 dialogs: DesignerDialogs | None = None, devices: Sequence[Device] | None = None):
        super().__init__(parent)
        self.setObjectName("designerPanel")
        self.setStyleSheet(DESIGNER_QSS)
        self.dialogs = dialogs or DesignerDialogs()
        self.devices: list[Device] | None = list(devices) if devices else None
        self.state = DesignerState(state_dir, self)
        self.lane_model = DeviceLaneModel(parent=self)
        self.grid_model = LayerGridModel(parent=self)
        self.strip_model = ExpertStripModel(parent=self)
        self._build()
        self._build_actions()
        self._connect_state()

    # --- building ------------------------------------------------------------------------------

    def _build(self) -> None:
        self.stack = QStackedWidget()
        self.empty_label = QLabel("No model open.\nOpen a GGUF to place its layers and experts on your devices.",
                                  objectName="emptyLabel", alignment=Qt.AlignCenter)
        self.stack.addWidget(self.empty_label)
        self.stack.addWidget(self._build_content())
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.stack)

    def _build_content(self) -> QWidget:
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.setContentsMargins(14, 10, 14, 10)
        layout.setSpacing(8)
        layout.addLayout(self._build_header())
        layout.addWidget(self._build_plan_status())
        splitter = QSplitter(Qt.Horizontal)
        splitter.setChildrenCollapsible(False)
        splitter.addWidget(self._build_left_column())
        splitter.addWidget(self._build_centre())
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([340, 1000])
        layout.addWidget(splitter, 1)
        layout.addWidget(self._build_command_line())
        return content

    def _build_header(self) -> QVBoxLayout:
        self.title = QLabel(objectName="designerTitle")
        self.subtitle = QLabel(objectName="mutedLabel")
        self.auto_fit_button = QPushButton("Auto-fit", objectName="autoFitButton")
        self.auto_fit_button.setToolTip("Fill the GPUs in the order that serves speed: attention, KV and dense "
                                        "weights of all layers first, then routed experts from the first layer on")
        self.save_button = QToolButton(text="Save…", objectName="designerTool")
        self.save_button.setToolTip("Save the plan (placement and run settings) to a file")
        self.load_button = QToolButton(text="Load…", objectName="designerTool")
        self.load_button.setToolTip("Load a saved plan")
        self.undo_button = QToolButton(objectName="designerTool")
        self.redo_button = QToolButton(objectName="designerTool")
        row = QHBoxLayout()
        row.setSpacing(6)
        row.addWidget(self.title)
        row.addSpacing(8)
        row.addWidget(self.subtitle, 1, Qt.AlignBottom)
        for w in (self.undo_button, self.redo_button, self.save_button, self.load_button):
            row.addWidget(w)
        row.addSpacing(8)
        row.addWidget(self.auto_fit_button)
        box = QVBoxLayout()
        box.setSpacing(8)
        box.addLayout(row)
        return box

    def _build_plan_status(self) -> QWidget:
        """The verdict (always there), auto-fit's line or a notice under it, in a box of fixed height
        so that nothing below moves when they come and go."""
        self.verdict_label = QLabel(objectName="verdictLabel", textInteractionFlags=Qt.TextSelectableByMouse)
        self.explanation = QLabel(objectName="explanationLabel", wordWrap=True,
                                  textInteractionFlags=Qt.TextSelectableByMouse)
        self.explanation.hide()
        self.notice = QLabel(objectName="designerNotice", wordWrap=True)
        self.notice.hide()
        self._notice_timer = QTimer(self, singleShot=True, interval=NOTICE_MS)
        self._notice_timer.timeout.connect(self.hide_notice)
        box = QWidget(objectName="planStatus")
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        for w in (self.verdict_label, self.explanation, self.notice):
            layout.addWidget(w)
        layout.addStretch(1)
        line = self.fontMetrics().lineSpacing()
        box.setFixedHeight(3 * line + PLAN_STATUS_CHROME)
        return box

    def _build_left_column(self) -> QWidget:
        self.lanes = DeviceLanesView(self.lane_model)
        self.add_gpu_button = QPushButton("+  Add simulated GPU…", objectName="addGpuButton")
        self.add_gpu_button.setToolTip("Plan for a GPU you do not have (or not yet)")
        column = QWidget(objectName="designerSide")
        layout = QVBoxLayout(column)
        layout.setContentsMargins(0, 0, 8, 0)
        layout.setSpacing(6)
        layout.addWidget(_section("Devices"))
        layout.addWidget(LaneLegend())
        layout.addWidget(self.lanes)
        layout.addWidget(self.add_gpu_button)
        layout.addStretch(1)
        scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(column)
        scroll.setMinimumWidth(320)
        return scroll

    def _build_centre(self) -> QWidget:
        self.grid = LayerGridView(self.grid_model)
        self.selection_label = QLabel(objectName="mutedLabel")
        grid_box = QWidget()
        grid_layout = QVBoxLayout(grid_box)
        grid_layout.setContentsMargins(0, 0, 0, 0)
        grid_layout.setSpacing(4)
        grid_layout.addWidget(self.grid, 1)
        grid_layout.addWidget(self.selection_label)
        self.strip = ExpertStripView(self.strip_model)
        self.strip_title = QLabel(objectName="sectionTitle")
        self.strip_hint = QLabel(objectName="mutedLabel")
        strip_scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.NoFrame)
        strip_scroll.setWidget(self.strip)
        strip_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        strip_box = self.strip_box = QWidget(objectName="stripBox")
        strip_layout = QVBoxLayout(strip_box)
        strip_layout.setContentsMargins(0, 4, 0, 0)
        strip_layout.setSpacing(4)
        head = QHBoxLayout()
        head.addWidget(self.strip_title)
        head.addStretch(1)
        head.addWidget(self.strip_hint)
        strip_layout.addLayout(head)
        strip_layout.addWidget(strip_scroll, 1)
        self.strip_scroll = strip_scroll
        centre = self.centre = QWidget()
        centre.installEventFilter(self)     # the strip's share follows the column's height
        layout = QVBoxLayout(centre)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)
        layout.addWidget(grid_box, 1)
        layout.addWidget(strip_box)
        return centre

    def _build_command_line(self) -> QWidget:
        self.run_settings = RunSettingsForm()
        self.command_editor = CommandLineEditor()
        self.ours_only = QLabel("ours only", objectName="oursOnlyBadge")
        self.ours_only.setToolTip("This plan splits one tensor's experts across devices, which llama.cpp "
                                  "cannot express; the line shows the nearest plan it can run")
        self.ours_only.hide()
        head = QHBoxLayout()
        head.setSpacing(8)
        head.addWidget(_section("Command line for"))
        self.dialect_box = QComboBox(objectName="dialectBox")
        self.dialect_box.addItems(DIALECTS)
        self.dialect_box.setToolTip("ik_llama.cpp turns flash attention on by default and reads --n-cpu-moe "
                                    "its own way: the line is written (and a pasted line read) for the one chosen")
        head.addWidget(self.dialect_box)
        head.addWidget(self.ours_only)
        head.addStretch(1)
        head.addWidget(self.run_settings.allow_split)
        box = QWidget(objectName="commandBox")
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 6, 0, 0)
        layout.setSpacing(6)
        layout.addWidget(self.run_settings)
        layout.addLayout(head)
        layout.addWidget(self.command_editor)
        return box

    def _build_actions(self) -> None:
        stack = self.state.undo_stack
        self.undo_action = stack.createUndoAction(self, "Undo")
        self.undo_action.setShortcuts([QKeySequence(QKeySequence.Undo)])
        self.redo_action = stack.createRedoAction(self, "Redo")
        # the platform's Redo keys, plus Ctrl+Shift+Z where they lack it; each key once, or Qt finds
        # the shortcut ambiguous and Redo does nothing
        redo_keys = QKeySequence.keyBindings(QKeySequence.Redo)
        if QKeySequence("Ctrl+Shift+Z") not in redo_keys:
            redo_keys.append(QKeySequence("Ctrl+Shift+Z"))
        self.redo_action.setShortcuts(redo_keys)
        for action in (self.undo_action, self.redo_action):
            action.setShortcutContext(Qt.WidgetWithChildrenShortcut)
            self.addAction(action)
        # plain buttons: an action's text grows with each command ("Undo Move 12 tensors to CUDA1")
        self.undo_button.setText("Undo")
        self.redo_button.setText("Redo")
        self.undo_button.clicked.connect(stack.undo)
        self.redo_button.clicked.connect(stack.redo)
        stack.canUndoChanged.connect(self.undo_button.setEnabled)
        stack.canRedoChanged.connect(self.redo_button.setEnabled)
        stack.undoTextChanged.connect(lambda text: self.undo_button.setToolTip(f"Undo {text} (Ctrl+Z)"))
        stack.redoTextChanged.connect(lambda text: self.redo_button.setToolTip(f"Redo {text} (Ctrl+Shift+Z)"))
        self.undo_button.setEnabled(False)
        self.redo_button.setEnabled(False)
        self.auto_fit_button.clicked.connect(self.auto_fit)
        self.add_gpu_button.clicked.connect(self.ask_and_add_gpu)
        self.save_button.clicked.connect(self.ask_and_save)
        self.load_button.clicked.connect(self.ask_and_load)
        self.lanes.refs_dropped.connect(self.move_refs)
        self.lanes.drag_hovered.connect(self._on_drag_hover)
        self.lanes.context_requested.connect(self._lane_menu)
        self.grid.move_key.connect(lambda i: self.move_selection_to_index(i, self.grid))
        self.strip.move_key.connect(lambda i: self.move_selection_to_index(i, self.strip))
        self.grid.customContextMenuRequested.connect(lambda pos: self._move_menu(self.grid, pos))
        self.strip.customContextMenuRequested.connect(lambda pos: self._move_menu(self.strip, pos))
        self.grid.layer_activated.connect(self.show_layer_experts)
        self.grid.selectionModel().selectionChanged.connect(self._update_selection_label)
        self.strip.selection_changed.connect(self._update_selection_label)
        self.strip.content_height_changed.connect(self._fit_strip_box)
        self.run_settings.run_config_edited.connect(self.state.set_run_config)
        self.run_settings.margin_edited.connect(self.state.set_gpu_margin)
        self.run_settings.split_toggled.connect(self.state.set_allow_expert_split)
        self.command_editor.apply_requested.connect(self.apply_command_line)
        self.dialect_box.currentTextChanged.connect(self.state.set_dialect)

    def _connect_state(self) -> None:
        s = self.state
        s.model_changed.connect(self._on_model_changed)
        s.placement_changed.connect(self._on_placement_changed)
        s.estimate_changed.connect(self._on_estimate_changed)
        s.preview_changed.connect(self.lane_model.set_preview)
        s.run_config_changed.connect(self.run_settings.set_run_config)
        s.command_line_changed.connect(self._on_command_line)
        s.command_error.connect(self.command_editor.show_error)
        s.explanation_changed.connect(self._show_explanation)
        s.message.connect(self.show_notice)
        s.verdict_changed.connect(self._show_verdict)

    # --- opening -------------------------------------------------------------------------------

    def set_model(self, loaded) -> None:
        """The main window's hook: a `LoadedModel` (or None) became the open model."""
        if loaded is None:
            self.set_inventory(None)
            return
        overrides = tuple(str(o) for o in getattr(loaded, "overrides", ()))
        self.set_inventory(loaded.inventory, model_key=model_key(loaded.path), model_path=loaded.path,
                           override_kv=overrides)

    def set_inventory(self, inventory: Inventory | None, devices: Sequence[Device] | None = None,
                      model_key: str | None = None, model_path: str | Path | None = None,
                      override_kv: Sequence[str] = ()) -> None:
        if devices is not None:
            self.devices = list(devices)
        if self.devices is None:
            self.devices = [cpu_device()]       # until the window has found the GPUs
        self.hide_notice()
        self.state.set_model(inventory, self.devices, model_key, model_path, override_kv)
        self.devices = list(self.state.devices)     # a remembered plan brings back its simulated GPUs
        self.stack.setCurrentIndex(1 if inventory is not None else 0)

    def set_devices(self, devices: Sequence[Device]) -> None:
        """The machine's devices (the window's `devices_changed`); GPUs simulated here are kept."""
        names = {d.name for d in devices}
        ours = [d for d in self.state.devices if d.simulated and d.name not in names]
        self.devices = list(devices) + ours
        if self.state.inventory is not None:
            self.state.set_devices(self.devices)

    def set_expert_heat(self, heat: np.ndarray | None) -> None:
        """Router selection counts per (layer, expert), e.g. from a perplexity run; None hides them."""
        self.strip_model.set_heat(heat)
        self._update_strip_title()

    @property
    def placement(self):
        return self.state.placement

    @property
    def run_config(self):
        return self.state.run_config

    # --- what the user asks for ----------------------------------------------------------------

    def move_refs(self, refs: list, device: str) -> int:
        try:
            return self.state.move(refs, device)
        except (KeyError, ValueError) as e:
            self.show_notice(f"Cannot move that: {e}")
            return 0

    def device_for_index(self, index: int) -> str | None:
        """0 -> the CPU, n -> the n-th GPU (Ctrl+1 is CUDA0)."""
        if index == 0:
            return "CPU" if any(d.name == "CPU" for d in self.state.devices) else None
        gpus = self.state.gpus
        return gpus[index - 1].name if index - 1 < len(gpus) else None

    def move_selection_to_index(self, index: int, view) -> int:
        device = self.device_for_index(index)
        if device is None:
            self.show_notice(f"There is no GPU {index}: press Ctrl+0 for the CPU, Ctrl+1…Ctrl+{len(self.state.gpus)} "
                             f"for the GPUs.")
            return 0
        return self.move_refs(view.selected_refs(), device)

    def move_menu(self, view) -> QMenu:
        """The context menu of a selection: Move to ▸ each device."""
        menu = QMenu(self)
        refs = view.selected_refs()
        sub = menu.addMenu("Move to")
        sub.setEnabled(bool(refs))
        for device in self.state.devices:
            key = 0 if device.name == "CPU" else 1 + [g.name for g in self.state.gpus].index(device.name)
            action = sub.addAction(f"{device.name}\t{'Ctrl+' + str(key) if key <= 9 else ''}")
            action.triggered.connect(lambda _checked=False, d=device.name, v=view: self.move_refs(v.selected_refs(), d))
        if view is self.grid:
            menu.addSeparator()
            index = self.grid.currentIndex()
            layer = self.grid_model.layer_of_row(index.row()) if index.isValid() else None
            if layer is not None:
                menu.addAction(f"Show experts of blk.{layer}", lambda: self.show_layer_experts(layer))
        return menu

    def _move_menu(self, view, pos: QPoint) -> None:
        self.move_menu(view).popup(view.mapToGlobal(pos))

    def _lane_menu(self, device: str, global_pos: QPoint) -> None:
        menu = QMenu(self)
        for view, what in ((self.grid, "selected cells"), (self.strip, "selected experts")):
            refs = view.selected_refs()
            action = menu.addAction(f"Move {what} here", lambda r=refs: self.move_refs(r, device))
            action.setEnabled(bool(refs))
        if self.state.device(device).simulated:
            menu.addSeparator()
            menu.addAction(f"Remove {device}", lambda: self.remove_device(device))
        menu.popup(global_pos)

    def auto_fit(self) -> str:
        return self.state.auto_fit()

    def apply_command_line(self, text: str) -> bool:
        ok = self.state.apply_command_line(text)
        if ok:
            self.command_editor.applied()
        return ok

    def add_simulated_gpu(self, capacity: str | int) -> Device | None:
        try:
            capacity_bytes = parse_size(capacity) if isinstance(capacity, str) else int(capacity)
            device = self.state.add_simulated_gpu(capacity_bytes)
        except ValueError as e:
            self.show_notice(str(e))
            return None
        self.devices = list(self.state.devices)
        return device

    def ask_and_add_gpu(self) -> None:
        text = self.dialogs.ask_gpu_capacity(self)
        if text:
            self.add_simulated_gpu(text)

    def remove_device(self, name: str) -> None:
        self.state.remove_device(name)
        self.devices = list(self.state.devices)

    def ask_and_save(self) -> None:
        if self.state.inventory is None:
            return
        suggested = str(Path.home() / f"{self.state.model_key or 'plan'}.json")
        path = self.dialogs.save_plan_path(self, suggested)
        if path:
            try:
                self.state.save_plan(path)
            except OSError as e:
                self.show_notice(f"Could not save the plan: {e}")

    def ask_and_load(self) -> None:
        path = self.dialogs.open_plan_path(self)
        if path:
            self.load_plan(path)

    def load_plan(self, path: str | Path) -> bool:
        try:
            self.state.load_plan(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.show_notice(f"Could not load {Path(path).name}: {e}")
            return False
        self.devices = list(self.state.devices)
        self.run_settings.set_margin_bytes(self.state.memory_options.gpu_margin_bytes)
        self.run_settings.set_split_allowed(self.state.allow_expert_split)
        return True

    def show_layer_experts(self, layer: int | None) -> None:
        self.strip_model.set_layer(layer)
        self._update_strip_title()
        self._fit_strip_box()

    # --- state -> views ------------------------------------------------------------------------

    def _on_model_changed(self) -> None:
        s = self.state
        shown_layer = self.strip_model.layer if self.strip_model.inventory is s.inventory else None
        self.lane_model.set_devices(s.devices, s.estimate)
        self.grid_model.set_model(s.inventory, s.placement)
        self.strip_model.set_model(s.inventory, s.placement)
        if s.inventory is None:
            return
        self.title.setText(s.inventory.name or "Model")
        n_expert = s.inventory.n_expert
        experts = f" · {n_expert} experts per MoE layer" if n_expert else ""
        self.subtitle.setText(f"{s.inventory.arch} · {s.inventory.n_layer} layers{experts} · "
                              f"{format_bytes(s.inventory.total_bytes)} of weights · {len(s.devices)} devices")
        self.run_settings.set_margin_bytes(s.memory_options.gpu_margin_bytes)
        self.run_settings.set_split_allowed(s.allow_expert_split)
        self.strip_box.setVisible(s.inventory.n_expert > 0)
        if shown_layer is None:     # a new model: its first MoE layer; a new device list: the same layer
            shown_layer = next((layer.index for layer in s.inventory.layers
                                if any(t.n_experts for t in layer.tensors)), None)
        self.show_layer_experts(shown_layer)
        self._update_selection_label()

    def _fit_strip_box(self, *_args) -> None:
        """The strip takes what a whole layer of experts needs, up to STRIP_SHARE of the panel; the grid the rest."""
        content = self.strip.height_for(self.strip_scroll.viewport().width()) if self.strip_model.rowCount() else 0
        wanted = content + STRIP_CHROME_HEIGHT if content else STRIP_CHROME_HEIGHT
        # a share of the grid-and-strip column, so the grid keeps room on a 1280x800 screen too
        column = self.centre.height()
        self.strip_box.setFixedHeight(min(wanted, max(int(column * STRIP_SHARE), 90)))

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit_strip_box()

    def eventFilter(self, watched, event) -> bool:
        if watched is getattr(self, "centre", None) and event.type() == QEvent.Resize:
            self._fit_strip_box()
        return super().eventFilter(watched, event)

    def _on_placement_changed(self, moved) -> None:
        if moved is None:
            self.grid_model.set_placement(self.state.placement)
            self.strip_model.set_placement(self.state.placement)
        else:
            self.grid_model.tensors_moved(moved)
            self.strip_model.tensors_moved(moved)
        self.placement_changed.emit(self.state.placement)

    def _on_estimate_changed(self, estimate) -> None:
        self.lane_model.set_estimate(estimate)
        self.estimate_changed.emit(estimate)

    def _on_drag_hover(self, refs, device: str) -> None:
        if refs is None:
            self.state.preview(None)
            return
        try:
            self.state.preview(refs, device)
        except (KeyError, ValueError):
            self.state.preview(None)

    def _on_command_line(self, command_line) -> None:
        self.command_editor.set_command_line(command_line)
        self.ours_only.setVisible(not command_line.exact)
        self.command_line_changed.emit(command_line.text)

    def _show_explanation(self, text: str) -> None:
        self.explanation.setText(text)
        self.explanation.setToolTip(text)
        self.explanation.setVisible(bool(text) and self.notice.isHidden())

    def _show_verdict(self, text: str, fits: bool) -> None:
        self.verdict_label.setText(text)
        self.verdict_label.setProperty("fits", "true" if fits else "false")
        self.verdict_label.style().unpolish(self.verdict_label)
        self.verdict_label.style().polish(self.verdict_label)

    def _update_strip_title(self) -> None:
        model = self.strip_model
        if model.layer is None or not model.rowCount():
            layer = model.layer
            self.strip_title.setText("Experts" if layer is None else f"blk.{layer} has no routed experts")
            self.strip_hint.setText("Click a layer to see its experts" if layer is None else "")
            return
        sizes = ", ".join(f"{model.tensor(r).group} {format_bytes(model.tensor(r).expert_bytes)}"
                          for r in range(model.rowCount()))
        self.strip_title.setText(f"Experts of blk.{model.layer}")
        heat = " · brighter: picked more by the router" if model.heat is not None else ""
        self.strip_hint.setText(f"{model.columnCount()} experts · per expert: {sizes}{heat}")

    def _update_selection_label(self, *_args) -> None:
        grid_refs = self.grid.selected_refs()
        inv = self.state.inventory
        if inv is None:
            self.selection_label.setText("")
            return
        parts = []
        if grid_refs:
            n_bytes = sum(inv.by_name[r.name].n_bytes for r in grid_refs)
            parts.append(f"{len(grid_refs)} tensor{'s' if len(grid_refs) != 1 else ''} · {short_bytes(n_bytes)}")
        if self.strip.selection:
            n_bytes = sum(self.strip_model.tensor(r).expert_bytes for r, _ in self.strip.selection)
            parts.append(f"{len(self.strip.selection)} expert tiles · {short_bytes(n_bytes)}")
        if parts:
            text = "Selected: " + ", ".join(parts) + "   —   Drag onto a device, right-click, or press " \
                   "Ctrl+0 (CPU) / Ctrl+1… (GPUs)"
        else:
            text = "Select cells, a layer (row header) or a group (column header); drag them onto a device"
        self.selection_label.setText(text)

    def show_notice(self, text: str) -> None:
        """A notice above the designer (a move that cannot be made, a plan that cannot be read)."""
        self.notice.setText(text)
        self.notice.setToolTip(text)
        self.explanation.hide()         # the notice takes the explanation's place for a while
        self.notice.show()
        self._notice_timer.start()

    def hide_notice(self) -> None:
        self.notice.hide()
        self.explanation.setVisible(bool(self.explanation.text()))

    def select_grid_column(self, group: str) -> None:
        self.grid.select_column(self.grid_model.groups.index(group))

    def select_grid_cells(self, names: Sequence[str]) -> None:
        selection = QItemSelection()
        for name in names:
            index = self.grid_model.index_of_tensor(name)
            selection.select(index, index)
        self.grid.selectionModel().select(selection, QItemSelectionModel.ClearAndSelect)
