"""The inspector's tables: a GGUF's metadata and its tensors, plus the search proxy over them."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, QSortFilterProxyModel, Qt
from PySide6.QtGui import QFontDatabase

from app.models import (ALIGN_RIGHT, BytesRole, DeviceRole, Index, RowTableModel, SortRole, TensorRole,
                        plain_tooltip)
from engine.gguf.quoting import printable
from engine.plan.inventory import Inventory, InventoryTensor
from engine.arch.overrides import value_kind
from engine.units import format_bytes

LONG_ARRAY = 16             # arrays longer than this (vocabularies, merges) are summarised
ARRAY_PREVIEW = 3           # ... by their first few items
MAX_DISPLAY_CHARS = 160     # one table line; the tooltip shows more
MAX_TOOLTIP_CHARS = 4000    # chat templates run to several kB
DIGITS_RE = re.compile(r"\d+")


def value_type_name(value: Any) -> str:
    """GGUF-style type of a metadata value as parsed: string, int, float, bool or array[...]."""
    if isinstance(value, list):
        return f"array[{value_type_name(value[0]) if value else '?'}]"
    kind = value_kind(value)
    return "string" if kind == "str" else kind


def format_scalar(value: Any) -> str:
    if isinstance(value, float):
        as_f32 = np.float32(value)
        return str(as_f32) if float(as_f32) == value else repr(value)    # GGUF floats are mostly f32
    if isinstance(value, str):
        return repr(value)
    return str(value)


def format_value(value: Any) -> str:
    """One line for the table: long arrays as a count and a preview, newlines shown as ⏎."""
    if isinstance(value, list):
        if len(value) > LONG_ARRAY:
            preview = ", ".join(format_scalar(v) for v in value[:ARRAY_PREVIEW])
            text = f"[{len(value):,} items: {preview}, …]"
        else:
            text = "[" + ", ".join(format_scalar(v) for v in value) + "]"
    elif isinstance(value, str):
        text = printable(value.replace("\r\n", "⏎").replace("\n", "⏎"), MAX_DISPLAY_CHARS)
    else:
        text = format_scalar(value)
    return text if len(text) <= MAX_DISPLAY_CHARS else text[:MAX_DISPLAY_CHARS - 1] + "…"


def format_shape(shape: tuple[int, ...]) -> str:
    return " × ".join(str(d) for d in shape) if shape else "scalar"


def natural_key(text: str) -> str:
    """`blk.2` before `blk.10`: digits zero-padded, so a plain string compare sorts like a human."""
    return DIGITS_RE.sub(lambda m: m.group().zfill(8), text)


class MetadataModel(RowTableModel):
    """One row per GGUF metadata key, in file order."""

    COL_KEY, COL_TYPE, COL_VALUE = range(3)
    HEADERS = ("Key", "Type", "Value")

    def __init__(self, metadata: Mapping[str, Any] | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self._rows: list[tuple[str, Any]] = list((metadata or {}).items())

    def set_metadata(self, metadata: Mapping[str, Any] | None) -> None:
        self.beginResetModel()
        self._rows = list((metadata or {}).items())
        self.endResetModel()

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        key, value = self._rows[index.row()]
        column = index.column()
        if role in (Qt.DisplayRole, SortRole):
            if column == self.COL_KEY:
                return printable(key, MAX_DISPLAY_CHARS)       # keys, like values, are the file's to choose
            if column == self.COL_TYPE:
                return value_type_name(value)
            if role == SortRole and isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
            return format_value(value)
        if role == Qt.ToolTipRole:
            return plain_tooltip(self._tooltip(value) if column == self.COL_VALUE else key)
        if role == Qt.FontRole and column == self.COL_KEY:
            return QFontDatabase.systemFont(QFontDatabase.FixedFont)
        return None

    def _tooltip(self, value: Any) -> str:
        if isinstance(value, list):
            text = ", ".join(format_scalar(v) for v in value[:64]) + (", …" if len(value) > 64 else "")
        else:
            text = value if isinstance(value, str) else format_scalar(value)
        return text if len(text) <= MAX_TOOLTIP_CHARS else text[:MAX_TOOLTIP_CHARS] + "\n…"

    def display_text(self, row: int, column: int) -> str:
        return str(self.data(self.index(row, column)))

    def key_at(self, row: int) -> str:
        return self._rows[row][0]

    def value_at(self, row: int) -> Any:
        return self._rows[row][1]


class TensorTableModel(RowTableModel):
    """One row per tensor, in file order, with the device it is placed on.

    `device_of(name)` says where a tensor lives; without one every tensor is on the CPU. When a
    placement changes, `refresh_devices(names)` repaints only those rows' device cells.
    """

    COL_NAME, COL_TYPE, COL_SHAPE, COL_BYTES, COL_DEVICE = range(5)
    # shapes in llama.cpp's ne order, as gguf-dump and llama.cpp's load log print them
    HEADERS = ("Name", "Type", "Shape (ne)", "Bytes", "Device")
    RIGHT_ALIGNED = frozenset({COL_BYTES})

    sorts_itself = True     # SearchFilterProxy hands sorting to `sort` below: one C-level sorted() call

    def __init__(self, inventory: Inventory | None = None, device_of: Callable[[str], str] | None = None,
                 parent: QObject | None = None):
        super().__init__(parent)
        self._device_of = device_of
        self._sort_column, self._sort_order = -1, Qt.AscendingOrder
        self._set_tensors(list(inventory.tensors) if inventory else [])

    def _set_tensors(self, tensors: list[InventoryTensor]) -> None:
        self._file_order = tensors
        self._tensors = self._sorted(self._sort_column, self._sort_order)
        self._row_of = {t.name: row for row, t in enumerate(self._tensors)}

    def _sorted(self, column: int, order: Qt.SortOrder) -> list[InventoryTensor]:
        if not 0 <= column < len(self.HEADERS):
            return list(self._file_order)
        return sorted(self._file_order, key=lambda t: self._sort_key(t, column), reverse=order == Qt.DescendingOrder)

    def set_inventory(self, inventory: Inventory | None) -> None:
        self.beginResetModel()
        self._set_tensors(list(inventory.tensors) if inventory else [])
        self.endResetModel()

    def sort(self, column: int, order: Qt.SortOrder = Qt.AscendingOrder) -> None:
        """Reorder rows by a column's SortRole (kept for the next inventory); column -1 restores file
        order. Persistent indexes (selections) follow their tensors."""
        self.layoutAboutToBeChanged.emit()
        self._sort_column, self._sort_order = column, order
        tensors = self._sorted(column, order)
        old_tensors = self._tensors
        self._tensors = tensors
        self._row_of = {t.name: row for row, t in enumerate(tensors)}
        persistent = self.persistentIndexList()
        self.changePersistentIndexList(persistent, [
            self.index(self._row_of[old_tensors[i.row()].name], i.column()) for i in persistent])
        self.layoutChanged.emit()

    def set_device_of(self, device_of: Callable[[str], str] | None) -> None:
        self._device_of = device_of
        self.refresh_devices()

    def refresh_devices(self, names: Iterable[str] | None = None) -> None:
        """Tell views the device of these tensors (all when None) changed: one dataChanged per run of rows."""
        if not self._tensors:
            return
        rows = range(len(self._tensors)) if names is None else sorted(
            self._row_of[n] for n in set(names) if n in self._row_of)
        for first, last in _runs(rows):
            self.dataChanged.emit(self.index(first, self.COL_DEVICE), self.index(last, self.COL_DEVICE),
                                  [Qt.DisplayRole, DeviceRole, SortRole])

    def rows(self):
        return self._tensors

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        tensor = self._tensors[index.row()]
        column = index.column()
        if role == Qt.DisplayRole:
            return self._display(tensor, column)
        if role == SortRole:
            return self._sort_key(tensor, column)
        if role == BytesRole:
            return tensor.n_bytes
        if role == DeviceRole:
            return self.device_of(tensor.name)
        if role == TensorRole:
            return tensor
        if role == Qt.ToolTipRole:
            return plain_tooltip(self._tooltip(tensor, column))
        if role == Qt.TextAlignmentRole and column == self.COL_BYTES:
            return ALIGN_RIGHT
        if role == Qt.FontRole and column == self.COL_NAME:
            return QFontDatabase.systemFont(QFontDatabase.FixedFont)
        return None

    def display_text(self, row: int, column: int) -> str:
        """DisplayRole without building a QModelIndex: what the search proxy reads per row."""
        return self._display(self._tensors[row], column)

    def device_of(self, name: str) -> str:
        return self._device_of(name) if self._device_of else "CPU"

    def _display(self, tensor: InventoryTensor, column: int) -> str:
        if column == self.COL_NAME:
            return tensor.name
        if column == self.COL_TYPE:
            return tensor.type_name
        if column == self.COL_SHAPE:
            return format_shape(tuple(reversed(tensor.shape)))
        if column == self.COL_BYTES:
            return format_bytes(tensor.n_bytes)
        return self.device_of(tensor.name)

    def _sort_key(self, tensor: InventoryTensor, column: int):
        if column == self.COL_NAME:
            return natural_key(tensor.name)
        if column == self.COL_SHAPE:
            return int(np.prod(tensor.shape, dtype=np.int64)) if tensor.shape else 1
        if column == self.COL_BYTES:
            return tensor.n_bytes
        return self._display(tensor, column)

    def _tooltip(self, tensor: InventoryTensor, column: int) -> str | None:
        if column == self.COL_SHAPE:
            ne = ", ".join(str(d) for d in reversed(tensor.shape))
            return (f"llama.cpp's ne order (as gguf-dump prints it): ne = [{ne}]\n"
                    f"numpy order (rows first): {format_shape(tensor.shape)}")
        if column == self.COL_BYTES:
            text = f"{tensor.n_bytes:,} bytes"
            if tensor.n_experts:
                text += f"\n{tensor.n_experts} experts × {tensor.expert_bytes:,} bytes " \
                        f"({format_bytes(tensor.expert_bytes)} each)"
            return text
        if column == self.COL_NAME:
            return f"{tensor.name}\nrole: {tensor.role.value}, group: {tensor.group}"
        return None

    def tensor_at(self, row: int) -> InventoryTensor:
        return self._tensors[row]

    def row_of(self, name: str) -> int:
        return self._row_of[name]


def _runs(rows: Iterable[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 8] -> [(1, 3), (7, 8)]"""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and row == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], row)
        else:
            runs.append((row, row))
    return runs


class SearchFilterProxy(QSortFilterProxyModel):
    """Keeps rows where any of `columns` matches the search: a case-insensitive regex (searched, like
    llama.cpp's `-ot` patterns), or the literal text when it is not a valid regex.

    A source model with `sorts_itself` does its own sorting (one `sorted()` instead of a Python
    comparison per pair of rows); this proxy then keeps the source's order and only filters.
    """

    def __init__(self, columns: Iterable[int], parent: QObject | None = None):
        super().__init__(parent)
        self._columns = tuple(columns)
        self._pattern: re.Pattern[str] | None = None
        self.setSortRole(SortRole)

    def set_search(self, text: str) -> bool:
        """Filter by `text`; False when it is not a valid regex (and is matched literally instead)."""
        valid = True
        if not text:
            pattern = None
        else:
            try:
                pattern = re.compile(text, re.IGNORECASE)
            except re.error:
                pattern = re.compile(re.escape(text), re.IGNORECASE)
                valid = False
        if hasattr(self, "beginFilterChange"):      # Qt >= 6.10; invalidateRowsFilter is deprecated there
            self.beginFilterChange()
            self._pattern = pattern
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self._pattern = pattern
            self.invalidateRowsFilter()
        return valid

    def sort(self, column: int, order: Qt.SortOrder = Qt.AscendingOrder) -> None:
        source = self.sourceModel()
        if getattr(source, "sorts_itself", False):
            source.sort(column, order)
        else:
            super().sort(column, order)

    def filterAcceptsRow(self, source_row: int, source_parent: Index) -> bool:
        if self._pattern is None:
            return True
        model = self.sourceModel()
        text_of = getattr(model, "display_text", None)
        if text_of is None:
            return any(self._pattern.search(str(model.data(model.index(source_row, column, source_parent)) or ""))
                       for column in self._columns)
        return any(self._pattern.search(text_of(source_row, column)) for column in self._columns)
