"""The main window: model picking, the panels (Designer, Chat, Perplexity, Inspector), progress
and errors. It holds no model math and parses no files: the bridge does that on the engine thread.

Panels plug in with `add_panel(name, widget)`; a panel with a `set_model(LoadedModel | None)`
method is told whenever the open model changes (others can connect to `model_loaded`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from PySide6.QtCore import QByteArray, QTimer, Signal
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (QDialog, QFileDialog, QLabel, QMainWindow, QMessageBox, QProgressBar, QSizePolicy,
                               QTabWidget, QToolButton, QVBoxLayout, QWidget)

from app.bridge import Bridge, JobHandle
from app.engine_jobs import LoadedModel, compiling_text, load_default_model, load_model
from app.model_picker import ModelFinderDialog, ModelLocation, default_locations
from app.settings import Settings
from app.widgets import MessageBar
from app.widgets.chat import ChatPanel
from app.widgets.designer import DesignerPanel
from app.widgets.perplexity import PerplexityPanel
from app.widgets.synth_dialog import SynthDialog, SynthRequest
from engine.synth.default_model import models_cache_dir
from app.widgets.inspector import InspectorPanel
from engine.gguf.quoting import printable
from engine.units import format_bytes

log = logging.getLogger(__name__)

APP_TITLE = "Offload Studio"
MAX_NAME_CHARS = 120
DESIGNER, CHAT, PERPLEXITY, INSPECTOR = "Designer", "Chat", "Perplexity", "Inspector"
COMPILES_QUIET_MS = 400     # a pause this long between kernel compiles ends the "Preparing CPU kernels" line


class Dialogs:
    """The modal dialogs the window may open, in one place that tests replace with non-blocking fakes."""

    def open_model_file(self, parent: QWidget, start_dir: str) -> str | None:
        path, _ = QFileDialog.getOpenFileName(parent, "Open a GGUF model", start_dir,
                                              "GGUF models (*.gguf);;All files (*)")
        return path or None

    def choose_folder(self, parent: QWidget) -> str | None:
        return QFileDialog.getExistingDirectory(parent, "Add a folder to search for models") or None

    def about(self, parent: QWidget, title: str, text: str) -> None:
        QMessageBox.about(parent, title, text)

    def new_synthetic_model(self, parent: QWidget, out_dir: Path) -> SynthRequest | None:
        dialog = SynthDialog(out_dir, parent)
        return dialog.request() if dialog.exec() == QDialog.Accepted else None


def gguf_paths_of(event: QDragEnterEvent | QDropEvent) -> list[str]:
    """Local .gguf files carried by a drag."""
    mime = event.mimeData()
    if not mime.hasUrls():
        return []
    return [url.toLocalFile() for url in mime.urls()
            if url.isLocalFile() and url.toLocalFile().lower().endswith(".gguf")]


class MainWindow(QMainWindow):
    model_loaded = Signal(object)       # LoadedModel: a model was opened (the previous one is dropped)
    devices_changed = Signal(object)    # list[engine.devices.Device]

    def __init__(self, bridge: Bridge, settings: Settings, dialogs: Dialogs | None = None,
                 model_locations: Callable[[list[str]], list[ModelLocation]] = default_locations,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings
        self.dialogs = dialogs or Dialogs()
        self.model_locations = model_locations
        self.loaded: LoadedModel | None = None
        self.devices: list = []
        self._load_job: JobHandle | None = None
        self._tracked_job: JobHandle | None = None
        self._job_text = ""                     # the tracked job's own line, shown again after compiles
        self._tracked_for_compiles = False      # tracked only while it compiles kernels
        self._compiles_quiet = QTimer(self, singleShot=True, interval=COMPILES_QUIET_MS)
        self._compiles_quiet.timeout.connect(self._after_compiles)
        bridge.compiling.connect(self._on_compiling)
        self._panels: dict[str, QWidget] = {}
        self._finder: ModelFinderDialog | None = None
        self.setWindowTitle(APP_TITLE)
        self.setAcceptDrops(True)
        self._build_central()
        self._build_status_bar()
        self._build_menus()
        self.designer = self.add_panel(DESIGNER, DesignerPanel())
        self.chat = self.add_panel(CHAT, ChatPanel(bridge))
        self.perplexity = self.add_panel(PERPLEXITY, PerplexityPanel(bridge))
        self.perplexity.job_started.connect(self.track_job)
        self.devices_changed.connect(self.designer.set_devices)
        # the chat and perplexity panels run the model on the placement and settings designed here
        self.designer.placement_changed.connect(self._use_placement)
        self.designer.state.run_config_changed.connect(self._use_run_config)
        # a plan the verdict says does not fit is not loaded unless the user says so
        self.designer.state.verdict_changed.connect(self._use_verdict)
        self.chat.expert_counts.connect(self.designer.set_expert_heat)
        self.model_loaded.connect(lambda _: self._use_placement(self.designer.placement))
        self._use_run_config(self.designer.run_config)
        self.inspector = self.add_panel(INSPECTOR, InspectorPanel())
        self.restore_window_state()

    # --- building ----------------------------------------------------------------------------

    def _build_central(self) -> None:
        self.message_bar = MessageBar()
        self.tabs = QTabWidget(documentMode=True, movable=False)
        self.tabs.setObjectName("panelTabs")
        self.tabs.tabBar().setDrawBase(False)
        self.tabs.currentChanged.connect(self._sync_view_menu)
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.message_bar)
        layout.addWidget(self.tabs, 1)
        self.setCentralWidget(central)

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        bar.setSizeGripEnabled(False)
        self.job_label = QLabel(objectName="jobLabel")
        self.job_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)    # long lines are cut, not widening
        self.progress_bar = QProgressBar(textVisible=False)
        self.progress_bar.setFixedWidth(180)
        self.progress_bar.setFixedHeight(10)
        self.cancel_button = QToolButton(text="Cancel", objectName="cancelButton")
        self.cancel_button.clicked.connect(self.cancel_tracked_job)
        self.model_label = QLabel("No model", objectName="modelLabel")
        self.devices_label = QLabel(objectName="mutedLabel")
        bar.addWidget(self.job_label, 1)
        bar.addWidget(self.progress_bar)
        bar.addWidget(self.cancel_button)
        bar.addPermanentWidget(self.devices_label)
        bar.addPermanentWidget(self.model_label)
        self._set_job_widgets_visible(False)

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self.open_action = file_menu.addAction("&Open…", QKeySequence.Open, self.choose_and_open_model)
        self.recent_menu = file_menu.addMenu("Open &Recent")
        self.recent_menu.aboutToShow.connect(self.rebuild_recent_menu)
        self.finder_action = file_menu.addAction("&Models on this Machine…", QKeySequence("Ctrl+Shift+O"),
                                                 self.show_model_finder)
        file_menu.addAction("&Add Folder…", self.add_model_folder)
        file_menu.addAction("New &Synthetic Model…", self.create_synthetic_model)
        file_menu.addSeparator()
        file_menu.addAction("&Quit", QKeySequence.Quit, self.close)
        self.view_menu = self.menuBar().addMenu("&View")
        self._view_actions = QActionGroup(self, exclusive=True)
        help_menu = self.menuBar().addMenu("&Help")
        help_menu.addAction(f"&About {APP_TITLE}", self.show_about)
        self.rebuild_recent_menu()

    # --- panels -------------------------------------------------------------------------------

    def _use_placement(self, placement) -> None:
        for panel in (self.chat, self.perplexity):
            panel.set_placement(placement)
        self.inspector.set_device_of(placement.device_of if placement is not None else None)

    def _use_verdict(self, *_args) -> None:
        refusal = self.designer.state.refusal()
        for panel in (self.chat, self.perplexity):
            if hasattr(panel, "set_fit_refusal"):
                panel.set_fit_refusal(refusal)

    def _use_run_config(self, run_config) -> None:
        for panel in (self.chat, self.perplexity):
            panel.set_run_config(run_config)

    def add_panel(self, name: str, widget: QWidget) -> QWidget:
        """Add a panel as a tab, or replace the panel of that name in place; returns `widget`."""
        old = self._panels.get(name)
        if old is not None:
            index = self.tabs.indexOf(old)
            was_current = self.tabs.currentIndex() == index
            self.tabs.removeTab(index)
            self.tabs.insertTab(index, widget, name)
            if was_current:
                self.tabs.setCurrentIndex(index)
            old.deleteLater()
        else:
            self.tabs.addTab(widget, name)
        self._panels[name] = widget
        if name == INSPECTOR and isinstance(widget, InspectorPanel):
            self.inspector = widget
            widget.overrides_requested.connect(self.reopen_with_overrides)
        if self.loaded is not None and hasattr(widget, "set_model"):
            widget.set_model(self.loaded)
        self._rebuild_view_menu()
        return widget

    def panel(self, name: str) -> QWidget | None:
        return self._panels.get(name)

    def panel_names(self) -> list[str]:
        return [self.tabs.tabText(i) for i in range(self.tabs.count())]

    def show_panel(self, name: str) -> None:
        self.tabs.setCurrentWidget(self._panels[name])

    def current_panel_name(self) -> str:
        return self.tabs.tabText(self.tabs.currentIndex())

    def _rebuild_view_menu(self) -> None:
        self.view_menu.clear()
        for action in self._view_actions.actions():
            self._view_actions.removeAction(action)
        for i, name in enumerate(self.panel_names()):
            action = QAction(name, self, checkable=True)
            if i < 9:       # Alt+digit: Ctrl+digit moves the designer's selection to a device
                action.setShortcut(QKeySequence(f"Alt+{i + 1}"))
            action.triggered.connect(lambda *_checked, panel=name: self.show_panel(panel))
            self._view_actions.addAction(action)
            self.view_menu.addAction(action)
        self._sync_view_menu()

    def _sync_view_menu(self, *_args) -> None:
        current = self.current_panel_name()
        for action in self._view_actions.actions():
            action.setChecked(action.text() == current)

    # --- opening models -----------------------------------------------------------------------

    def open_model(self, path: str | Path) -> JobHandle:
        """Open a GGUF on the engine thread; the window shows progress and, on failure, the error."""
        job = self.bridge.submit(partial(load_model, path), f"opening {Path(path).name}")
        return self._start_load(job, f"Opening {Path(path).name}…")

    def create_synthetic_model(self) -> JobHandle | None:
        """Write a model of a real shape on the engine thread, then open it."""
        request = self.dialogs.new_synthetic_model(self, models_cache_dir())
        if request is None:
            return None

        def write(ctx):
            from engine.synth.writer import write_synthetic
            write_synthetic(request.path, request.preset, quant=request.quant, sparse=request.sparse,
                            progress=lambda done, total: ctx.progress(done, total, "writing"))
            return request.path

        handle = self.bridge.submit(write, f"writing {request.path.name}")
        handle.returned.connect(self.open_model)
        handle.errored.connect(self.show_error)
        self.track_job(handle, f"Writing {request.path.name}…")
        return handle

    def open_default_model(self) -> JobHandle:
        job = self.bridge.submit(load_default_model, "opening the built-in model")
        return self._start_load(job, "Opening the built-in model…")

    def reopen_with_overrides(self, overrides) -> JobHandle | None:
        """Open the current model again with these metadata overrides (`--override-kv`; none: as
        the file says). On failure the model stays as it was and the error shows."""
        if self.loaded is None:
            self.show_error("Open a model first: metadata overrides apply to the open model.")
            return None
        overrides = tuple(overrides)
        path, n = self.loaded.path, len(overrides)
        text = (f"Reopening {path.name} with {n} metadata override{'s' if n != 1 else ''}…" if n
                else f"Reopening {path.name} without overrides…")
        job = self.bridge.submit(partial(load_model, path, overrides=overrides), f"opening {path.name}")
        return self._start_load(job, text,
                                "Could not reopen the model with these overrides.")

    def _start_load(self, handle: JobHandle, text: str, failure: str = "Could not open the model.") -> JobHandle:
        if self._load_job is not None and not self._load_job.done:
            self._load_job.cancel()     # the newest request wins
        self._load_job = handle
        handle.returned.connect(partial(self._on_model_returned, handle))
        handle.errored.connect(partial(self._on_model_errored, handle, failure))
        self.track_job(handle, text)
        return handle

    def _on_model_returned(self, handle: JobHandle, loaded: LoadedModel) -> None:
        if handle is not self._load_job:
            return
        log.info("opened %s (%s) in %.2f s", loaded.path, loaded.summary(), loaded.load_s)
        self.set_loaded_model(loaded)
        self.settings.add_recent_file(loaded.path)
        self._save_settings()
        self.rebuild_recent_menu()
        self.statusBar().showMessage(f"Opened {loaded.path.name} in {loaded.load_s:.2f} s", 5000)
        if loaded.notice:
            self.show_message(loaded.notice, MessageBar.INFO)
        self.chat.controller.prepare()      # with a cold kernel cache, compiles now, not at the first prompt

    def _on_model_errored(self, handle: JobHandle, failure: str, message: str) -> None:
        if handle is self._load_job:
            self.show_error(f"{failure} {message}")

    def set_loaded_model(self, loaded: LoadedModel | None) -> None:
        """Make `loaded` the open model and tell every panel."""
        self.loaded = loaded
        if loaded is None:
            self.setWindowTitle(APP_TITLE)
            self.model_label.setText("No model")
        else:
            name = printable(loaded.name, MAX_NAME_CHARS)      # general.name is the file's to choose
            self.setWindowTitle(f"{name} — {APP_TITLE}")
            self.model_label.setText(f"{name}  ·  {format_bytes(loaded.total_bytes)}")
            self.model_label.setToolTip(f"{loaded.summary()}\n{loaded.path}")
            self.message_bar.dismiss()
        for widget in self._panels.values():
            if hasattr(widget, "set_model"):
                widget.set_model(loaded)
        self.model_loaded.emit(loaded)

    def choose_and_open_model(self) -> None:
        recent = self.settings.recent_files
        start_dir = str(Path(recent[0]).parent) if recent else str(Path.home())
        path = self.dialogs.open_model_file(self, start_dir)
        if path:
            self.open_model(path)

    def rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.settings.recent_files
        for path in recent:
            action = self.recent_menu.addAction(Path(path).name, lambda *_checked, p=path: self.open_model(p))
            action.setToolTip(path)
            action.setStatusTip(path)
            action.setEnabled(Path(path).exists())
        if recent:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear Recent Files", self._clear_recent)
        else:
            self.recent_menu.addAction("No recent files").setEnabled(False)

    def _clear_recent(self) -> None:
        self.settings.clear_recent_files()
        self._save_settings()
        self.rebuild_recent_menu()

    def show_model_finder(self) -> ModelFinderDialog:
        if self._finder is None:
            self._finder = ModelFinderDialog(lambda: self.model_locations(self.settings.model_folders),
                                             self.dialogs.choose_folder, self)
            self._finder.open_requested.connect(self.open_model)
            self._finder.folder_added.connect(self._remember_folder)
        self._finder.show()
        self._finder.raise_()
        self._finder.rescan()
        return self._finder

    def add_model_folder(self) -> None:
        folder = self.dialogs.choose_folder(self)
        if folder:
            self._remember_folder(folder)
            self.show_model_finder()

    def _remember_folder(self, folder: str) -> None:
        if self.settings.add_model_folder(folder):
            self._save_settings()

    # --- drag and drop ------------------------------------------------------------------------

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if gguf_paths_of(event):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = gguf_paths_of(event)
        if not paths:
            event.ignore()
            return
        event.acceptProposedAction()
        self.open_model(paths[0])      # any part of a split set opens the whole set

    # --- jobs, progress, errors ---------------------------------------------------------------

    def track_job(self, handle: JobHandle, text: str) -> None:
        """Show a job's progress in the status bar with a Cancel button, until it finishes."""
        self._tracked_job, self._job_text, self._tracked_for_compiles = handle, text, False
        self.job_label.setText(text)
        self.progress_bar.setRange(0, 0)
        self._set_job_widgets_visible(True)
        handle.progress.connect(partial(self._on_tracked_progress, handle))
        handle.finished.connect(partial(self._on_tracked_finished, handle))
        handle.cancelled.connect(lambda: self.statusBar().showMessage("Cancelled", 3000))

    def cancel_tracked_job(self) -> None:
        if self._tracked_job is not None:
            self._tracked_job.cancel()
            self.job_label.setText("Cancelling…")

    def _on_tracked_progress(self, handle: JobHandle, done: int, total: int, text: str) -> None:
        if handle is not self._tracked_job:
            return
        if text:
            self._job_text = text[0].upper() + text[1:]
            self.job_label.setText(self._job_text)
        if total > 0:
            self.progress_bar.setRange(0, 1000)     # 1000 steps: byte totals overflow a 32-bit range
            self.progress_bar.setValue(int(1000 * min(done, total) / total))
        else:
            self.progress_bar.setRange(0, 0)

    def _on_tracked_finished(self, handle: JobHandle) -> None:
        if handle is self._tracked_job:
            self._tracked_job = None
            self._set_job_widgets_visible(False)

    def _on_compiling(self, handle: JobHandle, progress) -> None:
        """Any job compiling kernels (a cold Numba cache) says so in the status bar, with Cancel
        for the job shown there; a job that shows nothing else is shown while it compiles."""
        if not progress.active:
            self._compiles_quiet.start()    # the next kernel usually follows at once: no flicker
            return
        self._compiles_quiet.stop()
        if self._tracked_job is None:
            self.track_job(handle, handle.description)
            self._tracked_for_compiles = True
        self.job_label.setText(compiling_text(progress))

    def _after_compiles(self) -> None:
        if self._tracked_job is None:
            return
        if self._tracked_for_compiles:
            self._on_tracked_finished(self._tracked_job)
        else:
            self.job_label.setText(self._job_text)

    def _set_job_widgets_visible(self, visible: bool) -> None:
        for widget in (self.job_label, self.progress_bar, self.cancel_button):
            widget.setVisible(visible)

    def show_message(self, text: str, level: str = MessageBar.INFO) -> None:
        log.log(logging.ERROR if level == MessageBar.ERROR else logging.INFO, "%s", text)
        self.message_bar.show_message(text, level)

    def show_error(self, text: str) -> None:
        self.show_message(text, MessageBar.ERROR)

    # --- devices ------------------------------------------------------------------------------

    def detect_devices(self, sim_gpus: str | None = None) -> JobHandle:
        """Find the CPU and GPUs (pynvml can be slow to start) on the engine thread."""
        from engine.devices import available_devices
        handle = self.bridge.submit(lambda ctx: available_devices(sim_gpus), "finding devices")
        handle.returned.connect(self.set_devices)
        handle.errored.connect(lambda message: self.show_error(f"Could not list devices. {message}"))
        return handle

    def set_devices(self, devices: list) -> None:
        self.devices = list(devices)
        self.devices_label.setText("  ·  ".join(
            f"{d.name} {format_bytes(d.total_bytes)}" + (" (sim)" if d.simulated else "") for d in self.devices))
        self.devices_label.setToolTip("\n".join(f"{d.name}: {d.description}" for d in self.devices))
        self.devices_changed.emit(self.devices)

    # --- state --------------------------------------------------------------------------------

    def show_about(self) -> None:
        self.dialogs.about(self, f"About {APP_TITLE}",
                           f"<h3>{APP_TITLE} {_version()}</h3><p>Plan and run GGUF language models across the "
                           "CPU and GPUs: place layers and experts, see each device's memory, and get the "
                           "matching llama.cpp command line.</p>")

    def restore_window_state(self) -> None:
        state = self.settings.state
        if not (state.window_geometry and self.restoreGeometry(QByteArray.fromBase64(state.window_geometry.encode()))):
            self.resize(1280, 800)
        if state.current_panel in self._panels:
            self.show_panel(state.current_panel)

    def save_window_state(self) -> None:
        state = self.settings.state
        state.window_geometry = bytes(self.saveGeometry().toBase64()).decode()
        state.current_panel = self.current_panel_name()
        self._save_settings()

    def _save_settings(self) -> None:
        try:
            self.settings.save()
        except OSError as e:    # a read-only config folder must not cost the user their session
            log.warning("could not save settings: %s", e)

    def closeEvent(self, event: QCloseEvent) -> None:
        self.save_window_state()
        self.chat.shutdown()
        if self._finder is not None:
            self._finder.close()
        super().closeEvent(event)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("offload-studio")
    except PackageNotFoundError:
        return ""
