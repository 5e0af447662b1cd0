"""The perplexity panel: llama-perplexity in the window, with a live plot and KL-divergence.

Runs belong to `app.perplexity_controller.PerplexityController`: the panel builds a request from
its controls, prints the controller's llama-perplexity log lines, plots the running estimate and
shows the final `PPL = x +/- y` large. In "compare with base" mode the final KL-divergence
statistics fill a table (the controller's `kld_model`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import (QButtonGroup, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QHeaderView, QLabel,
                               QLineEdit, QMessageBox, QPlainTextEdit, QProgressBar, QPushButton, QRadioButton, QSpinBox,
                               QSplitter, QStackedWidget, QTableView, QTabWidget, QVBoxLayout, QWidget)

from app import theme
from app.bridge import Bridge, JobHandle
from app.engine_jobs import (MODE_COMPARE, MODE_PERPLEXITY, MODE_SAVE_BASE, LoadedModel, ModelFactory,
                             PerplexityRequest, default_model_factory)
from app.models.perplexity import KldStatsModel
from app.perplexity_controller import PerplexityController
from app.widgets import MessageBar, confirm_over_capacity
from app.widgets.ppl_plot import PerplexityPlot
from engine.eval.perplexity import KLDivergenceStats, PerplexityResult
from engine.run_config import RunConfig

log = logging.getLogger(__name__)

MODE_LABELS = {MODE_PERPLEXITY: "Off", MODE_SAVE_BASE: "Save as base", MODE_COMPARE: "Compare with base"}
DEFAULT_N_CTX = 512

# The panel's own look, on top of resources/style.qss; colours are app/theme.py's.
PANEL_STYLE = theme.style_sheet("""
QPushButton:disabled { color: @disabled; background: @control_disabled; border-color: @border; }
QWidget#perplexityControls { background: @sidebar; }
QLabel#pplResult { font-size: 24pt; font-weight: 600; color: @text_strong; }
QPlainTextEdit#perplexityLog, QPlainTextEdit#pastedText {
    background: @sunken; border: 1px solid @border; border-radius: 6px; padding: 4px;
    selection-background-color: @highlight; }
QTabWidget#perplexityTabs::pane { border: none; }
QProgressBar#runProgress { background: @control; border: none; border-radius: 4px; }
QProgressBar#runProgress::chunk { background: @accent; border-radius: 4px; }
QComboBox { background: @control; border: 1px solid @border_strong; border-radius: 6px; padding: 4px 8px; }
""")
TEXT_FILTER = "Text files (*.txt *.raw *.md);;All files (*)"
BASE_FILTER = "KL-divergence bases (*.kld *.bin);;All files (*)"


OPEN_A_MODEL = "Open a model to measure its perplexity."


class PerplexityDialogs:
    """The panel's file dialogs, in one place that tests replace with non-blocking fakes."""

    def open_text_file(self, parent: QWidget, start_dir: str) -> str | None:
        path, _ = QFileDialog.getOpenFileName(parent, "Choose a text to measure perplexity on", start_dir, TEXT_FILTER)
        return path or None

    def save_base_file(self, parent: QWidget, start_dir: str) -> str | None:
        path, _ = QFileDialog.getSaveFileName(parent, "Save the KL-divergence base as", start_dir, BASE_FILTER)
        return path or None

    def open_base_file(self, parent: QWidget, start_dir: str) -> str | None:
        path, _ = QFileDialog.getOpenFileName(parent, "Choose a KL-divergence base", start_dir, BASE_FILTER)
        return path or None

    def confirm_overwrite(self, parent: QWidget, path: str) -> bool:
        answer = QMessageBox.question(parent, "Replace the base file?",
                                      f"{path} already exists. Replace it with this run's log-probabilities?",
                                      QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel)
        return answer == QMessageBox.Yes

    confirm_over_capacity = staticmethod(confirm_over_capacity)


class PerplexityPanel(QWidget):
    """Measure perplexity (and KL-divergence against a saved base) of the open model on a text."""

    error_occurred = Signal(str)
    job_started = Signal(object, str)      # JobHandle, description: the window may track it in its status bar
    run_finished = Signal(str)             # "done", "cancelled" or "error"

    def __init__(self, bridge: Bridge, dialogs: PerplexityDialogs | None = None,
                 model_factory: ModelFactory = default_model_factory, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("perplexityPanel")
        self.setStyleSheet(PANEL_STYLE)
        self.bridge = bridge
        self.dialogs = dialogs or PerplexityDialogs()
        self._fit_refusal = ""                  # why the designer's plan may not run ("" when it fits)
        self._over_capacity_allowed = False
        self.controller = PerplexityController(bridge, model_factory, parent=self)
        self.kld_model = self.controller.kld_model
        self._line_open = False     # the [i]ppl values share one log line, as in llama-perplexity
        self._build()
        self._connect_controller()
        self._update_actions()

    def _connect_controller(self) -> None:
        c = self.controller
        c.busy_changed.connect(self._update_actions)
        c.cleared.connect(self._reset_view)
        c.log_line.connect(self._log)
        c.log_inline.connect(self._log_inline)
        c.status_changed.connect(self.progress_label.setText)
        c.progress_changed.connect(self._show_progress)
        c.plot_reset.connect(self.plot.clear)
        c.chunk_scored.connect(self.plot.append)
        c.result_changed.connect(self._show_result)
        c.perplexity_result.connect(self._on_perplexity_result)
        c.kld_result.connect(self._on_kld_result)
        c.error_occurred.connect(self.show_error)
        c.job_started.connect(self.job_started)
        c.run_finished.connect(self._on_run_finished)

    # the controller's state, read by the window and the tests
    loaded = property(lambda self: self.controller.loaded)
    run_config = property(lambda self: self.controller.run_config)
    placement = property(lambda self: self.controller.placement)
    result = property(lambda self: self.controller.result)
    started = property(lambda self: self.controller.started)

    @property
    def model_factory(self) -> ModelFactory:
        return self.controller.model_factory

    @model_factory.setter
    def model_factory(self, factory: ModelFactory) -> None:
        self.controller.model_factory = factory

    # --- building -------------------------------------------------------------------------------

    def _build(self) -> None:
        self.message_bar = MessageBar()
        splitter = QSplitter(Qt.Horizontal, childrenCollapsible=False)
        splitter.addWidget(self._build_controls())
        splitter.addWidget(self._build_results())
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([340, 960])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.message_bar)
        layout.addWidget(splitter, 1)

    def _build_controls(self) -> QWidget:
        self.file_radio = QRadioButton("Text file", checked=True)
        self.paste_radio = QRadioButton("Pasted text")
        self._source_group = QButtonGroup(self)
        for button in (self.file_radio, self.paste_radio):
            self._source_group.addButton(button)
            button.toggled.connect(self._on_source_changed)
        self.file_edit = QLineEdit(placeholderText="e.g. wiki.test.raw", clearButtonEnabled=True)
        self.file_edit.textChanged.connect(self._update_actions)
        self.file_edit.textChanged.connect(self.file_edit.setToolTip)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self.choose_text_file)
        file_row = QHBoxLayout()
        file_row.setContentsMargins(0, 0, 0, 0)
        file_row.addWidget(self.file_edit, 1)
        file_row.addWidget(browse)
        file_box = QWidget()
        file_box.setLayout(file_row)
        self.paste_edit = QPlainTextEdit(placeholderText="Paste the text to score here", objectName="pastedText")
        self.paste_edit.textChanged.connect(self._update_actions)
        self.source_stack = QStackedWidget()
        self.source_stack.addWidget(file_box)
        self.source_stack.addWidget(self.paste_edit)
        self.source_stack.setSizePolicy(self.paste_edit.sizePolicy())

        self.n_ctx_spin = QSpinBox(minimum=8, maximum=1 << 20, value=DEFAULT_N_CTX, singleStep=64)
        self.n_ctx_spin.setToolTip("Tokens per chunk (-c); the second half of each chunk is scored")
        self.n_chunks_spin = QSpinBox(minimum=0, maximum=1 << 20, value=0)
        self.n_chunks_spin.setSpecialValueText("all")
        self.n_chunks_spin.setToolTip("Score at most this many chunks (--chunks); 0: all")
        self.mode_combo = QComboBox()
        for mode, label in MODE_LABELS.items():
            self.mode_combo.addItem(label, mode)
        self.mode_combo.currentIndexChanged.connect(self._on_mode_changed)
        self.base_edit = QLineEdit(placeholderText="base log-probabilities file", clearButtonEnabled=True)
        self.base_edit.textChanged.connect(self._update_actions)
        self.base_browse = QPushButton("Browse…")
        self.base_browse.clicked.connect(self.choose_base_file)
        base_row = QHBoxLayout()
        base_row.addWidget(self.base_edit, 1)
        base_row.addWidget(self.base_browse)
        self.kld_hint = QLabel(objectName="mutedLabel", wordWrap=True)

        self.run_button = QPushButton("Run", default=True, objectName="runButton")
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button = QPushButton("Cancel", objectName="cancelRunButton")
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.cancel_button, 1)
        self.progress_bar = QProgressBar(textVisible=False, objectName="runProgress")
        self.progress_bar.setFixedHeight(8)
        self.progress_label = QLabel(objectName="mutedLabel")

        form = QFormLayout()
        form.setHorizontalSpacing(12)
        form.addRow("Context", self.n_ctx_spin)
        form.addRow("Chunks", self.n_chunks_spin)
        source_row = QHBoxLayout()
        source_row.addWidget(self.file_radio)
        source_row.addWidget(self.paste_radio)
        source_row.addStretch(1)

        controls = QWidget(objectName="perplexityControls")
        layout = QVBoxLayout(controls)
        layout.setContentsMargins(16, 14, 8, 12)
        layout.setSpacing(8)
        layout.addWidget(QLabel("Text", objectName="sectionTitle"))
        layout.addLayout(source_row)
        layout.addWidget(self.source_stack)
        layout.addSpacing(12)
        layout.addWidget(QLabel("Settings", objectName="sectionTitle"))
        layout.addLayout(form)
        layout.addSpacing(12)
        layout.addWidget(QLabel("KL divergence", objectName="sectionTitle"))
        layout.addWidget(self.mode_combo)
        layout.addLayout(base_row)
        layout.addWidget(self.kld_hint)
        layout.addSpacing(14)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.progress_label)
        layout.addStretch(1)
        self._controls_layout = layout
        self._on_mode_changed()
        self._on_source_changed()
        return controls

    def _build_results(self) -> QWidget:
        self.result_label = QLabel("PPL = —", objectName="pplResult",
                                   textInteractionFlags=Qt.TextSelectableByMouse)
        self.result_detail = QLabel(objectName="mutedLabel", textInteractionFlags=Qt.TextSelectableByMouse)
        self.plot = PerplexityPlot()
        self.log_view = QPlainTextEdit(readOnly=True, objectName="perplexityLog")
        self.log_view.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
        self.log_view.setLineWrapMode(QPlainTextEdit.WidgetWidth)
        self.log_view.setPlaceholderText("llama-perplexity's output appears here.")
        self.kld_view = QTableView(objectName="kldTable")
        self.kld_view.setModel(self.kld_model)
        self.kld_view.verticalHeader().hide()
        self.kld_view.verticalHeader().setDefaultSectionSize(22)
        self.kld_view.setShowGrid(False)
        self.kld_view.setAlternatingRowColors(True)
        header = self.kld_view.horizontalHeader()
        header.setSectionResizeMode(KldStatsModel.COL_NAME, QHeaderView.Stretch)
        for column in (KldStatsModel.COL_VALUE, KldStatsModel.COL_ERROR):
            header.setSectionResizeMode(column, QHeaderView.Interactive)
            header.resizeSection(column, 130)
        header.setHighlightSections(False)
        header.setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        self.kld_note = QLabel(objectName="noteLabel", wordWrap=True)
        self.kld_note.hide()
        kld_page = QWidget()
        kld_layout = QVBoxLayout(kld_page)
        kld_layout.setContentsMargins(0, 6, 0, 0)
        kld_layout.addWidget(self.kld_note)
        kld_layout.addWidget(self.kld_view, 1)
        self.detail_tabs = QTabWidget(objectName="perplexityTabs", documentMode=True)
        self.detail_tabs.addTab(self.log_view, "Log")
        self.detail_tabs.addTab(kld_page, "KL divergence")

        lower = QSplitter(Qt.Vertical, childrenCollapsible=False)
        lower.addWidget(self.plot)
        lower.addWidget(self.detail_tabs)
        lower.setSizes([300, 300])
        results = QWidget(objectName="perplexityResults")
        layout = QVBoxLayout(results)
        layout.setContentsMargins(8, 14, 16, 12)
        layout.setSpacing(4)
        layout.addWidget(self.result_label)
        layout.addWidget(self.result_detail)
        layout.addSpacing(8)
        layout.addWidget(lower, 1)
        return results

    # --- inputs ---------------------------------------------------------------------------------

    def set_model(self, loaded: LoadedModel | None) -> None:
        if self.controller.set_model(loaded):
            self._update_actions()

    def set_run_config(self, run_config: RunConfig) -> None:
        """Run settings other than the context (KV cache types, threads...); the context is the panel's own."""
        self.controller.set_run_config(run_config)

    def set_placement(self, placement: Any) -> None:
        """A new `engine.plan.placement.Placement` (None: all on the CPU), used from the next run on."""
        self.controller.set_placement(placement)

    def set_text(self, text: str) -> None:
        self.paste_radio.setChecked(True)
        self.paste_edit.setPlainText(text)

    def set_text_file(self, path: str | Path) -> None:
        self.file_radio.setChecked(True)
        self.file_edit.setText(str(path))

    def set_mode(self, mode: str, base_path: str | Path | None = None) -> None:
        self.mode_combo.setCurrentIndex(self.mode_combo.findData(mode))
        if base_path is not None:
            self.base_edit.setText(str(base_path))

    def choose_text_file(self) -> None:
        path = self.dialogs.open_text_file(self, self._start_dir(self.file_edit.text()))
        if path:
            self.set_text_file(path)

    def choose_base_file(self) -> None:
        start = self._start_dir(self.base_edit.text())
        if self.mode == MODE_SAVE_BASE:
            path = self.dialogs.save_base_file(self, start)
        else:
            path = self.dialogs.open_base_file(self, start)
        if path:
            self.base_edit.setText(path)

    @staticmethod
    def _start_dir(current: str) -> str:
        return str(Path(current).expanduser().parent) if current else str(Path.home())

    @property
    def mode(self) -> str:
        return self.mode_combo.currentData()

    def _on_source_changed(self, *_args) -> None:
        pasted = self.paste_radio.isChecked()
        self.source_stack.setCurrentIndex(1 if pasted else 0)
        self.source_stack.setMaximumHeight(16777215 if pasted else self.file_edit.sizeHint().height() + 4)
        if hasattr(self, "_controls_layout"):     # the pasted text takes the spare height, else the bottom does
            layout = self._controls_layout
            layout.setStretchFactor(self.source_stack, 1 if pasted else 0)
            layout.setStretch(layout.count() - 1, 0 if pasted else 1)
        self._update_actions()

    def _on_mode_changed(self, *_args) -> None:
        mode = self.mode
        uses_base = mode != MODE_PERPLEXITY
        self.base_edit.setEnabled(uses_base)
        self.base_browse.setEnabled(uses_base)
        self.kld_hint.setText({
            MODE_PERPLEXITY: "Save the base model's log-probabilities once, then compare quants or placements "
                             "with it.",
            MODE_SAVE_BASE: "This run also writes its log-probabilities to the file (llama-perplexity "
                            "--kl-divergence-base).",
            MODE_COMPARE: "Scores the model against the base (--kl-divergence) on the base's own tokens "
                          "and context; the text is optional and only checked.",
        }[mode])
        self._update_actions()

    # --- running --------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self.controller.is_running

    def request(self) -> PerplexityRequest:
        """What a run would do now, from the panel's controls."""
        pasted = self.paste_radio.isChecked()
        text = self.paste_edit.toPlainText() if pasted else None
        path = None if pasted else (self.file_edit.text().strip() or None)
        n_chunks = self.n_chunks_spin.value() or None
        base = self.base_edit.text().strip() or None
        return self.controller.request(text if text else None, path, self.n_ctx_spin.value(), n_chunks, self.mode,
                                       base)

    def can_run(self) -> str:
        """"" when a run can start now, otherwise why not."""
        return self.controller.why_not(self.request())

    def set_fit_refusal(self, text: str) -> None:
        """The designer's refusal for the plan as it stands ("" when it fits); a new one asks again."""
        if text != self._fit_refusal:
            self._over_capacity_allowed = False
        self._fit_refusal = text

    def _may_run(self, request: PerplexityRequest) -> bool:
        """Ask before running a plan that does not fit, and before replacing a saved base."""
        if request.loaded is None:
            return True         # the controller says why not
        if self._fit_refusal and not self._over_capacity_allowed:
            if not self.dialogs.confirm_over_capacity(self, self._fit_refusal):
                self.show_error(self._fit_refusal)
                return False
            self._over_capacity_allowed = True
        base = Path(request.base_path).expanduser() if request.base_path else None
        if request.mode == MODE_SAVE_BASE and base is not None and base.exists():
            return self.dialogs.confirm_overwrite(self, str(base))
        return True

    def run(self) -> JobHandle | None:
        request = self.request()
        if not self._may_run(request):
            return None
        handle = self.controller.run(request)
        if handle is not None:
            self.message_bar.dismiss()
        return handle

    def cancel(self) -> None:
        self.controller.cancel()

    def _show_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(done)

    def _show_result(self, headline: str, detail: str) -> None:
        self.result_label.setText(headline)
        self.result_detail.setText(detail)

    def _reset_view(self) -> None:
        self._line_open = False
        self.log_view.clear()
        self.kld_note.hide()

    def _on_perplexity_result(self, result: PerplexityResult) -> None:
        self.plot.set_values(result.running_ppl, result.chunk_ppl)

    def _on_kld_result(self, _stats: KLDivergenceStats, note: str) -> None:
        if note:
            self.kld_note.setText(note)
            self.kld_note.show()
        self.detail_tabs.setCurrentIndex(1)

    def _on_run_finished(self, outcome: str) -> None:
        self._close_line()
        self.run_finished.emit(outcome)

    def show_error(self, text: str) -> None:
        self.message_bar.show_message(text, MessageBar.ERROR)
        self.error_occurred.emit(text)

    def _update_actions(self, *_args) -> None:
        running = self.is_running
        reason = self.can_run()
        self.run_button.setEnabled(not reason)
        self.run_button.setToolTip(reason)
        self.cancel_button.setEnabled(running)
        for widget in (self.n_ctx_spin, self.n_chunks_spin, self.mode_combo, self.file_radio, self.paste_radio):
            widget.setEnabled(not running)
        if self.loaded is None and not running and not self.progress_label.text():
            self.progress_label.setText(OPEN_A_MODEL)
        elif self.loaded is not None and self.progress_label.text() == OPEN_A_MODEL:
            self.progress_label.setText("Ready: choose a text and press Run.")

    # --- the log --------------------------------------------------------------------------------

    def _log(self, line: str) -> None:
        self._close_line()
        self.log_view.appendPlainText(line)

    def _log_inline(self, text: str) -> None:
        if not self._line_open:
            self.log_view.appendPlainText(text)
            self._line_open = True
        else:
            cursor = self.log_view.textCursor()
            cursor.movePosition(cursor.MoveOperation.End)
            cursor.insertText(text)
        self.log_view.ensureCursorVisible()

    def _close_line(self) -> None:
        self._line_open = False

    def log_text(self) -> str:
        return self.log_view.toPlainText()

    # --- screenshots ----------------------------------------------------------------------------

    def demo_fill(self, result: PerplexityResult, log_text: str = "", stats: KLDivergenceStats | None = None) -> None:
        """Show a finished run without running one (for screenshots)."""
        self.controller.reset_results()
        self.controller.show_perplexity_result(result, elapsed=False)
        if log_text:
            self.log_view.setPlainText(log_text)
        if stats is not None:
            self.controller.show_kld_stats(stats)
        self._show_progress(1, 1)
        self.progress_label.setText(f"Done  ·  {result.n_chunks} chunks")
