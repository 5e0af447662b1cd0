"""Model options: metadata overrides, llama.cpp's `--override-kv KEY=TYPE:VALUE` made visual.

The table (`app.models.model_options.OverridesModel`) lists the overrides; a key field completes
over the file's keys and the keys llama.cpp knows for the architecture, and the type follows the
key. Apply checks the whole set against the file's metadata here on the GUI thread (a copy of a
dict: cheap) and shows any problem in red; a valid set goes out as `apply_requested`, and the
window reopens the model with it on the engine thread.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gguf.constants import Keys
from PySide6.QtCore import QStringListModel, Qt, Signal
from PySide6.QtGui import QGuiApplication, QKeySequence, QShortcut
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QCompleter, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QPushButton, QSpinBox, QTableView, QVBoxLayout, QWidget)

from app import theme
from app.engine_jobs import LoadedModel
from app.models.inspector import format_value
from app.models.model_options import (OverridesModel, override_key_candidates, override_kv_flags,
                                      override_type_of)
from engine.arch.overrides import (OVERRIDE_TYPES, MetadataOverride, OverrideError, apply_overrides, parse_override_kv,
                                   parse_override_kv_list)

# on top of resources/style.qss (colours are app/theme.py's)
OPTIONS_STYLE = theme.style_sheet("""
QLabel#overrideError { color: @error; background: @error_fill/0.08;
    border: 1px solid @error_fill/0.40; border-radius: 6px; padding: 6px 10px; }
QLineEdit#overrideFlags { font-family: monospace; color: @text_secondary; }
QComboBox, QSpinBox { background: @control; border: 1px solid @border_strong; border-radius: 6px; padding: 4px 8px; }
""")
NO_FLAGS = "(no overrides: the file's metadata as it is)"


class ModelOptionsWidget(QWidget):
    """The overrides of the open model. Emits `apply_requested(tuple[MetadataOverride, ...])` with
    a set that `apply_overrides` accepts; it never reopens the model itself."""

    apply_requested = Signal(object)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("modelOptions")
        self.setStyleSheet(OPTIONS_STYLE)
        self.loaded: LoadedModel | None = None
        self.arch = ""
        self.file_metadata: Mapping[str, Any] = {}
        self.model = OverridesModel(parent=self)
        self._build()
        for signal in (self.model.rowsInserted, self.model.rowsRemoved, self.model.modelReset,
                       self.model.dataChanged):
            signal.connect(self._on_rows_changed)
        self.set_model(None)

    # --- building ----------------------------------------------------------------------------

    def _build(self) -> None:
        intro = QLabel("Override the model's metadata for this session, as llama.cpp's --override-kv does. "
                       "Apply reopens the model with them.", objectName="mutedLabel", wordWrap=True)
        self.table = self._build_table()
        self.error_label = QLabel(objectName="overrideError", wordWrap=True,
                                  textInteractionFlags=Qt.TextSelectableByMouse)
        self.error_label.hide()
        self.status_label = QLabel(objectName="mutedLabel", wordWrap=True)
        self.flags_edit = QLineEdit(objectName="overrideFlags", readOnly=True, placeholderText=NO_FLAGS)
        self.flags_edit.setToolTip("The same overrides on llama.cpp's command line")
        self.copy_button = QPushButton("Copy", clicked=self.copy_flags)
        self.revert_button = QPushButton("Revert", clicked=self.revert)
        self.revert_button.setToolTip("Back to the overrides in effect")
        self.apply_button = QPushButton("Apply", clicked=self.apply, default=True)
        self.apply_button.setToolTip("Check the overrides and reopen the model with them")

        flags_row = QHBoxLayout()
        flags_row.addWidget(QLabel("llama.cpp:", objectName="mutedLabel"))
        flags_row.addWidget(self.flags_edit, 1)
        flags_row.addWidget(self.copy_button)
        buttons_row = QHBoxLayout()
        buttons_row.addWidget(self.status_label, 1)
        buttons_row.addWidget(self.revert_button)
        buttons_row.addWidget(self.apply_button)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 6, 0)
        layout.setSpacing(6)
        layout.addWidget(intro)
        layout.addWidget(self.table, 1)
        layout.addLayout(self._build_entry_row())
        layout.addWidget(self._build_presets())
        layout.addWidget(self.error_label)
        layout.addLayout(flags_row)
        layout.addLayout(buttons_row)

    def _build_table(self) -> QTableView:
        table = QTableView(objectName="overridesTable")
        table.setModel(self.model)
        table.setSelectionBehavior(QAbstractItemView.SelectRows)
        table.setEditTriggers(QAbstractItemView.DoubleClicked | QAbstractItemView.EditKeyPressed)
        table.setShowGrid(False)
        table.setWordWrap(False)
        table.verticalHeader().hide()
        table.verticalHeader().setDefaultSectionSize(24)
        header = table.horizontalHeader()
        header.setHighlightSections(False)
        header.setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        header.setSectionResizeMode(OverridesModel.COL_KEY, QHeaderView.Stretch)
        for column, width in ((OverridesModel.COL_TYPE, 56), (OverridesModel.COL_VALUE, 110),
                              (OverridesModel.COL_FILE_VALUE, 110)):
            header.setSectionResizeMode(column, QHeaderView.Interactive)
            header.resizeSection(column, width)
        delete = QShortcut(QKeySequence.Delete, table, context=Qt.WidgetShortcut)
        delete.activated.connect(self.remove_selected)
        return table

    def _build_entry_row(self) -> QHBoxLayout:
        self.key_edit = QLineEdit(placeholderText="Key, e.g. llama.expert_used_count — or KEY=TYPE:VALUE",
                                  clearButtonEnabled=True)
        self.key_completions = QStringListModel(self)
        completer = QCompleter(self.key_completions, self)
        completer.setCaseSensitivity(Qt.CaseInsensitive)
        completer.setFilterMode(Qt.MatchContains)      # "expert" finds llama.expert_used_count
        self.key_edit.setCompleter(completer)
        self.key_edit.textChanged.connect(self._on_key_changed)
        self.key_edit.returnPressed.connect(self.add_from_fields)
        self.type_combo = QComboBox()
        self.type_combo.addItems(OVERRIDE_TYPES)
        self.value_edit = QLineEdit(placeholderText="Value")
        self.value_edit.returnPressed.connect(self.add_from_fields)
        self.add_button = QPushButton("Add", clicked=self.add_from_fields)
        self.remove_button = QPushButton("Remove", clicked=self.remove_selected)
        row = QHBoxLayout()
        row.addWidget(self.key_edit, 3)
        row.addWidget(self.type_combo)
        row.addWidget(self.value_edit, 1)
        row.addWidget(self.add_button)
        row.addWidget(self.remove_button)
        return row

    def _build_presets(self) -> QWidget:
        self.presets = QWidget()
        self.experts_spin = QSpinBox(minimum=1)
        self.experts_spin.setToolTip("How many experts the router picks for each token")
        self.experts_button = QPushButton("Set", clicked=self.set_experts_used)
        row = QHBoxLayout(self.presets)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Experts used:", objectName="mutedLabel"))
        row.addWidget(self.experts_spin)
        row.addWidget(self.experts_button)
        row.addStretch(1)
        return self.presets

    # --- binding -----------------------------------------------------------------------------

    def set_model(self, loaded: LoadedModel | None) -> None:
        """Show the overrides in effect for `loaded`; drops any edits not applied."""
        self.loaded = loaded
        self.file_metadata = loaded.metadata_in_file if loaded else {}
        self.arch = str(self.file_metadata.get(Keys.General.ARCHITECTURE, ""))
        self.key_completions.setStringList(override_key_candidates(self.arch, self.file_metadata) if loaded else [])
        self.model.set_overrides(loaded.overrides if loaded else (), self.file_metadata)
        self._set_up_presets()
        self.clear_error()
        self.setEnabled(loaded is not None)

    def _set_up_presets(self) -> None:
        n_expert = self.file_metadata.get(Keys.LLM.EXPERT_COUNT.format(arch=self.arch), 0)
        n_expert = n_expert if isinstance(n_expert, int) else 0
        self.presets.setVisible(n_expert > 1)
        if n_expert > 1:
            self.experts_spin.setMaximum(n_expert)
            effective = self.loaded.model_file.metadata.get(self.experts_used_key(), n_expert)
            self.experts_spin.setValue(int(effective) if isinstance(effective, int) else n_expert)

    def experts_used_key(self) -> str:
        return Keys.LLM.EXPERT_USED_COUNT.format(arch=self.arch)

    # --- editing -----------------------------------------------------------------------------

    def _on_key_changed(self, text: str) -> None:
        """The type follows the key; the value field shows what the file holds."""
        key = text.strip()
        kind = override_type_of(self.arch, self.file_metadata, key) if key and "=" not in key else None
        if kind in OVERRIDE_TYPES:
            self.type_combo.setCurrentText(kind)
        in_file = self.file_metadata.get(key) if kind in OVERRIDE_TYPES else None
        self.value_edit.setPlaceholderText(f"file: {format_value(in_file)}" if in_file is not None else "Value")

    def add_from_fields(self) -> bool:
        """Add the key field's override (or a pasted KEY=TYPE:VALUE[,...]) to the table."""
        key = self.key_edit.text().strip()
        if not key:
            self.show_error("Type a metadata key, or paste KEY=TYPE:VALUE.")
            return False
        try:
            if "=" in key:
                overrides = parse_override_kv_list(key)
            else:
                overrides = [parse_override_kv(f"{key}={self.type_combo.currentText()}:{self.value_edit.text()}")]
        except OverrideError as e:
            self.show_error(str(e))
            return False
        for override in overrides:
            self.model.put(override)
        self.key_edit.clear()
        self.value_edit.clear()
        return True

    def remove_selected(self) -> None:
        self.model.remove_rows(index.row() for index in self.table.selectionModel().selectedRows())

    def set_experts_used(self) -> None:
        self.model.put(MetadataOverride(self.experts_used_key(), "int", self.experts_spin.value()))

    def revert(self) -> None:
        self.model.set_overrides(self.loaded.overrides if self.loaded else ())

    def copy_flags(self) -> None:
        QGuiApplication.clipboard().setText(self.flags_edit.text())

    # --- checking and applying ---------------------------------------------------------------

    def problem(self) -> str | None:
        """Why the table's overrides cannot apply to this model, or None."""
        try:
            apply_overrides(self.file_metadata, self.model.overrides())
        except OverrideError as e:
            return str(e)
        return None

    def apply(self) -> bool:
        """Check the overrides; when they hold and differ from those in effect, ask for a reopen."""
        if self.loaded is None:
            return False
        problem = self.problem()
        if problem is not None:
            self.show_error(problem)
            return False
        self.clear_error()
        overrides = self.model.overrides()
        if overrides == tuple(self.loaded.overrides):
            self.status_label.setText("These overrides are already in effect.")
            return True
        self.status_label.setText(f"Reopening {self.loaded.path.name}…")
        self.apply_requested.emit(overrides)
        return True

    def _on_rows_changed(self, *_args) -> None:
        overrides = self.model.overrides()
        self.flags_edit.setText(override_kv_flags(overrides))
        self.flags_edit.setCursorPosition(0)
        pending = self.loaded is not None and overrides != tuple(self.loaded.overrides)
        self.revert_button.setEnabled(pending)
        self.status_label.setText(self._status_text(pending))
        problem = self.problem() if pending else None
        if problem is None:
            self.clear_error()
        else:
            self.show_error(problem)

    def _status_text(self, pending: bool) -> str:
        if pending:
            return "Not applied yet."
        n = len(self.loaded.overrides) if self.loaded else 0
        return f"{n} override{'s' if n != 1 else ''} in effect." if n else "As in the file."

    def show_error(self, text: str) -> None:
        self.error_label.setText(text)
        self.error_label.show()

    def clear_error(self) -> None:
        self.error_label.clear()
        self.error_label.hide()

    @property
    def error_text(self) -> str:
        return self.error_label.text() if not self.error_label.isHidden() else ""
