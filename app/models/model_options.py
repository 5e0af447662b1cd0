"""The model options table: metadata overrides (llama.cpp's `--override-kv KEY=TYPE:VALUE`) as rows.

Rows are `engine.arch.overrides.MetadataOverride`s, one per key. The table only holds them; checking
them against the model (`engine.arch.overrides.apply_overrides`) is the widget's job, and reopening the
model with them is the window's.
"""
from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from gguf.constants import Keys
from PySide6.QtCore import QModelIndex, QObject, Qt
from PySide6.QtGui import QFontDatabase

from app.models import Index, RowTableModel
from app.models.inspector import format_value
from engine.arch.overrides import MetadataOverride, OverrideError, known_key_kind, parse_override_kv, value_kind

# one role for this model alone, past the app-wide roles of app.models
OverrideRole = Qt.UserRole + 32      # engine.arch.overrides.MetadataOverride of the row

NOT_IN_FILE = "—"


# --- what can be overridden ------------------------------------------------------------------------

def _key_templates(group: type = Keys) -> Iterable[str]:
    """Every key template of gguf.Keys, nested groups (Keys.Attention.Indexer...) included."""
    for name, value in vars(group).items():
        if name.startswith("_"):
            continue
        if isinstance(value, str):
            yield value
        elif isinstance(value, type):
            yield from _key_templates(value)


def override_type_of(arch: str, metadata: Mapping[str, Any], key: str) -> str | None:
    """The override type a key takes ('int', 'float', 'bool', 'str'), 'array' for a key that cannot
    be overridden, or None for a key that is neither in the file nor known for `arch`."""
    if key in metadata:
        return value_kind(metadata[key])
    kind = known_key_kind(arch, key)
    return "int" if kind == "int32" else kind


def override_key_candidates(arch: str, metadata: Mapping[str, Any]) -> list[str]:
    """Keys worth completing: the file's scalar keys, then the keys llama.cpp knows for `arch`
    (those without {id}-style slots), each once, arrays left out (they cannot be overridden)."""
    in_file = [k for k in metadata if override_type_of(arch, metadata, k) != "array"]
    known = {t.format(arch=arch) for t in _key_templates() if "{" not in t.replace("{arch}", "")}
    extra = sorted(k for k in known - set(metadata) if known_key_kind(arch, k) not in (None, "array"))
    return in_file + extra


# --- text forms ----------------------------------------------------------------------------------

def value_text(override: MetadataOverride) -> str:
    """The VALUE part of KEY=TYPE:VALUE."""
    return str(override).partition("=")[2].partition(":")[2]


def _csv_field(text: str) -> str:
    """llama.cpp splits an --override-kv argument at commas (parse_csv_row); quote one that has any."""
    if "," in text or '"' in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def override_kv_flags(overrides: Iterable[MetadataOverride]) -> str:
    """The llama.cpp flags for these overrides, one `--override-kv` each, quoted for a POSIX shell."""
    return " ".join(f"--override-kv {shlex.quote(_csv_field(str(o)))}" for o in overrides)


# --- the model -----------------------------------------------------------------------------------

class OverridesModel(RowTableModel):
    """One row per overridden key: key, type, value, and the value the file holds.

    The value cell is editable; an edit that does not parse as the row's type is refused."""

    COL_KEY, COL_TYPE, COL_VALUE, COL_FILE_VALUE = range(4)
    HEADERS = ("Key", "Type", "Value", "In file")

    def __init__(self, file_metadata: Mapping[str, Any] | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self._rows: list[MetadataOverride] = []
        self._file_metadata: Mapping[str, Any] = file_metadata or {}

    def set_overrides(self, overrides: Iterable[MetadataOverride],
                      file_metadata: Mapping[str, Any] | None = None) -> None:
        self.beginResetModel()
        self._rows = list(overrides)
        if file_metadata is not None:
            self._file_metadata = file_metadata
        self.endResetModel()

    def overrides(self) -> tuple[MetadataOverride, ...]:
        return tuple(self._rows)

    def row_of(self, key: str) -> int:
        return next((i for i, o in enumerate(self._rows) if o.key == key), -1)

    def put(self, override: MetadataOverride) -> int:
        """Add a row, or replace the row of the same key in place; returns its row."""
        row = self.row_of(override.key)
        if row >= 0:
            self._rows[row] = override
            self.dataChanged.emit(self.index(row, self.COL_TYPE), self.index(row, self.COL_VALUE))
            return row
        row = len(self._rows)
        self.beginInsertRows(QModelIndex(), row, row)
        self._rows.append(override)
        self.endInsertRows()
        return row

    def remove_rows(self, rows: Iterable[int]) -> None:
        for row in sorted(set(rows), reverse=True):     # from the bottom, so the rest keep their numbers
            if 0 <= row < len(self._rows):
                self.beginRemoveRows(QModelIndex(), row, row)
                del self._rows[row]
                self.endRemoveRows()

    # --- QAbstractItemModel ------------------------------------------------------------------------

    def flags(self, index: Index) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.NoItemFlags
        flags = Qt.ItemIsEnabled | Qt.ItemIsSelectable | Qt.ItemNeverHasChildren
        return flags | Qt.ItemIsEditable if index.column() == self.COL_VALUE else flags

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        override = self._rows[index.row()]
        column = index.column()
        if role in (Qt.DisplayRole, Qt.EditRole):
            return self._text(override, column)
        if role == OverrideRole:
            return override
        if role == Qt.ToolTipRole:
            return str(override)
        if role == Qt.FontRole and column in (self.COL_KEY, self.COL_VALUE):
            return QFontDatabase.systemFont(QFontDatabase.FixedFont)
        return None

    def _text(self, override: MetadataOverride, column: int) -> str:
        if column == self.COL_KEY:
            return override.key
        if column == self.COL_TYPE:
            return override.type
        if column == self.COL_VALUE:
            return value_text(override)
        if override.key in self._file_metadata:
            return format_value(self._file_metadata[override.key])
        return NOT_IN_FILE

    def setData(self, index: Index, value: Any, role: int = Qt.EditRole) -> bool:
        if not index.isValid() or index.column() != self.COL_VALUE or role != Qt.EditRole:
            return False
        old = self._rows[index.row()]
        try:
            new = parse_override_kv(f"{old.key}={old.type}:{value}")
        except OverrideError:
            return False
        if new != old:
            self._rows[index.row()] = new
            self.dataChanged.emit(index, index, [Qt.DisplayRole, Qt.EditRole, Qt.ToolTipRole])
        return True
