"""The designer's forms: run settings that feed the estimate, the llama.cpp command line, and
the few modal dialogs (in one class that tests replace).

The forms hold no state of their own beyond what the user is typing: they show the controller's
run config and command line, and say what the user asked for through signals.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFontDatabase, QKeyEvent
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QHBoxLayout, QInputDialog, QLabel, QPlainTextEdit,
                               QPushButton, QSpinBox, QVBoxLayout, QWidget)

from app.designer_state import CommandLine
from engine.run_config import KV_CACHE_TYPES, RunConfig

MIB = 1 << 20
FLASH_ATTN_MODES = ("auto", "on", "off")
MAX_CONTEXT = 10_485_760
STATUS_LINES = 3                # lines of notes shown under the command line


def _spin(minimum: int, maximum: int, step: int, suffix: str = "", special: str = "") -> QSpinBox:
    box = QSpinBox(minimum=minimum, maximum=maximum, singleStep=step, suffix=suffix)
    box.setKeyboardTracking(False)      # one change when the user is done typing, not one per digit
    box.setAccelerated(True)
    box.setGroupSeparatorShown(True)
    if special:
        box.setSpecialValueText(special)
    return box


def _combo(items) -> QComboBox:
    box = QComboBox()
    box.addItems(list(items))
    return box


class RunSettingsForm(QWidget):
    """One row: context length, KV cache types, ubatch, flash attention, the GPU margin, the split option."""

    run_config_edited = Signal(object)      # RunConfig
    margin_edited = Signal(object)          # int: bytes kept free on each GPU (past 2**31)
    split_toggled = Signal(bool)            # allow per-expert splits in auto-fit

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.run_config = RunConfig()
        self.context = _spin(0, MAX_CONTEXT, 1024, " tokens", "model's own")
        self.context.setToolTip("-c: the context the KV cache is sized for (0: the model's training context)")
        self.type_k = _combo(KV_CACHE_TYPES)
        self.type_k.setToolTip("-ctk: KV cache type of K")
        self.type_v = _combo(KV_CACHE_TYPES)
        self.type_v.setToolTip("-ctv: KV cache type of V (quantized V needs flash attention in llama.cpp)")
        self.ubatch = _spin(1, 65536, 128, " tokens")
        self.ubatch.setToolTip("-ub: tokens per compute step; sets the size of the compute buffers")
        self.flash_attn = _combo(FLASH_ATTN_MODES)
        self.flash_attn.setToolTip("-fa: flash attention (auto turns it on for CUDA GPUs)")
        self.margin = _spin(0, 1 << 20, 256, " MiB")
        self.margin.setToolTip("Memory auto-fit leaves free on every GPU, on top of the CUDA context and compute "
                               "buffers it already counts: the allocator's slack, the desktop and other programs.\n"
                               "Default 1,024 MiB, what llama.cpp's --fit keeps (-fitt 1024).")
        for box, width in ((self.context, 130), (self.ubatch, 110), (self.margin, 100)):
            box.setMaximumWidth(width)
        self.allow_split = QCheckBox("Split single experts (ours only)")
        self.allow_split.setToolTip("Let auto-fit put some experts of one tensor on a GPU and the rest on the CPU.\n"
                                    "The built-in engine runs it; llama.cpp cannot, so its command line "
                                    "shows the nearest whole-tensor plan.")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(6)
        for label, widget in (("Context", self.context), ("KV cache  K", self.type_k), ("V", self.type_v),
                              ("Ubatch", self.ubatch), ("Flash attention", self.flash_attn),
                              ("GPU margin", self.margin)):
            caption = QLabel(label, objectName="fieldLabel")
            caption.setBuddy(widget)
            if label != "Context":
                row.addSpacing(4 if label == "V" else 12)
            row.addWidget(caption)
            row.addWidget(widget)
        row.addStretch(1)      # the split option sits by the command line, which it changes (DesignerPanel)
        for box in (self.context, self.ubatch):
            box.valueChanged.connect(self._emit)
        for combo in (self.type_k, self.type_v, self.flash_attn):
            combo.currentTextChanged.connect(self._emit)
        self.margin.valueChanged.connect(lambda mib: self.margin_edited.emit(mib * MIB))
        self.allow_split.toggled.connect(self.split_toggled)
        self.set_run_config(self.run_config)

    def set_run_config(self, run_config: RunConfig) -> None:
        self.run_config = run_config
        widgets = (self.context, self.type_k, self.type_v, self.ubatch, self.flash_attn)
        for w in widgets:
            w.blockSignals(True)
        self.context.setValue(run_config.n_ctx)
        self.type_k.setCurrentText(run_config.type_k)
        self.type_v.setCurrentText(run_config.type_v)
        self.ubatch.setValue(run_config.n_ubatch)
        self.flash_attn.setCurrentText(run_config.flash_attn)
        for w in widgets:
            w.blockSignals(False)

    def set_margin_bytes(self, margin_bytes: int) -> None:
        self.margin.blockSignals(True)
        self.margin.setValue(margin_bytes // MIB)
        self.margin.blockSignals(False)

    def set_split_allowed(self, allowed: bool) -> None:
        self.allow_split.blockSignals(True)
        self.allow_split.setChecked(allowed)
        self.allow_split.blockSignals(False)

    def edited_run_config(self) -> RunConfig:
        return self.run_config.replace(n_ctx=self.context.value(), type_k=self.type_k.currentText(),
                                       type_v=self.type_v.currentText(), n_ubatch=self.ubatch.value(),
                                       n_batch=max(self.run_config.n_batch, self.ubatch.value()),
                                       flash_attn=self.flash_attn.currentText())

    def _emit(self, *_args) -> None:
        self.run_config_edited.emit(self.edited_run_config())


class CommandLineEdit(QPlainTextEdit):
    """A wrapping, monospaced field; Enter applies, Shift+Enter breaks the line, Esc reverts."""

    submitted = Signal()
    reverted = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("commandLine")
        self.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
        self.setLineWrapMode(QPlainTextEdit.WidgetWidth)
        self.setTabChangesFocus(True)
        self.setPlaceholderText("llama.cpp flags, e.g. -ngl 99 -ot exps=CPU -c 8192 (paste a whole command line)")
        line = self.fontMetrics().lineSpacing()
        self.setFixedHeight(int(line * 3.4) + 14)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() in (Qt.Key_Return, Qt.Key_Enter) and not event.modifiers() & Qt.ShiftModifier:
            self.submitted.emit()
            return
        if event.key() == Qt.Key_Escape:
            self.reverted.emit()
            return
        super().keyPressEvent(event)


class CommandLineEditor(QWidget):
    """The command line, kept in step with the plan; edits are applied on Enter or Apply."""

    apply_requested = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.current = CommandLine("", True, ())
        self.edited = False
        self.edit = CommandLineEdit()
        self.apply_button = QPushButton("Apply")
        self.apply_button.setToolTip("Read this command line into the plan (Enter)")
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the command line")
        self.status = QLabel(objectName="commandStatus", wordWrap=True, alignment=Qt.AlignLeft | Qt.AlignTop,
                             textInteractionFlags=Qt.TextSelectableByMouse)
        # a fixed height: notes coming and going must not move the grid above (the whole text is the tooltip)
        self.status.setFixedHeight(STATUS_LINES * self.status.fontMetrics().lineSpacing() + 4)
        buttons = QVBoxLayout()
        buttons.setSpacing(6)
        buttons.addWidget(self.apply_button)
        buttons.addWidget(self.copy_button)
        buttons.addStretch(1)
        row = QHBoxLayout()
        row.setSpacing(8)
        row.addWidget(self.edit, 1)
        row.addLayout(buttons)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self.edit.textChanged.connect(self._on_text_changed)
        self.edit.submitted.connect(self.apply)
        self.edit.reverted.connect(self.revert)
        self.apply_button.clicked.connect(self.apply)
        self.copy_button.clicked.connect(self.copy)

    @property
    def text(self) -> str:
        return self.edit.toPlainText()

    def set_command_line(self, command_line: CommandLine, force: bool = False) -> None:
        """Show the plan's command line, unless the user is in the middle of editing it."""
        self.current = command_line
        if self.edited and not force:
            self._show_status("Edited: Enter applies it to the plan, Esc goes back to the plan's line.", "note")
            return
        self.edit.blockSignals(True)
        self.edit.setPlainText(command_line.text)
        self.edit.blockSignals(False)
        self.edited = False
        self._show_notes()

    def apply(self) -> None:
        self.apply_requested.emit(self.text)

    def applied(self) -> None:
        """The line was read into the plan: show the plan's own line and its notes at once."""
        self.edited = False
        self.set_command_line(self.current, force=True)

    def revert(self) -> None:
        self.edited = False
        self.set_command_line(self.current, force=True)

    def copy(self) -> None:
        from PySide6.QtWidgets import QApplication
        QApplication.clipboard().setText(self.text)

    def show_error(self, message: str) -> None:
        self._show_status(f"Cannot read this command line: {message}. The plan is unchanged.", "error")

    def _on_text_changed(self) -> None:
        self.edited = self.text != self.current.text
        if self.edited:
            self._show_status("Edited: Enter applies it to the plan, Esc goes back to the plan's line.", "note")
        else:
            self._show_notes()

    def _show_notes(self) -> None:
        notes = list(self.current.notes)
        self._show_status("\n".join(notes), "warning" if not self.current.exact else "muted")

    def _show_status(self, text: str, level: str) -> None:
        self.status.setText(text)
        self.status.setToolTip(text)
        self.status.setProperty("level", level)
        self.status.style().unpolish(self.status)
        self.status.style().polish(self.status)


class DesignerDialogs:
    """The designer's modal dialogs, in one place that tests replace with non-blocking fakes."""

    def ask_gpu_capacity(self, parent: QWidget) -> str | None:
        text, ok = QInputDialog.getText(parent, "Add a simulated GPU",
                                        "Memory of the GPU to plan for (e.g. 24GiB, 12GB, 80G):", text="24GiB")
        return text if ok and text.strip() else None

    def save_plan_path(self, parent: QWidget, suggested: str) -> str | None:
        path, _ = QFileDialog.getSaveFileName(parent, "Save the plan", suggested, "Plans (*.json)")
        return path or None

    def open_plan_path(self, parent: QWidget) -> str | None:
        path, _ = QFileDialog.getOpenFileName(parent, "Load a plan", str(Path.home()), "Plans (*.json)")
        return path or None
