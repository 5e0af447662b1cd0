"""Qt models over engine objects. Views bind these; they hold no model math themselves.

Custom roles shared by every model of the app, so a delegate or a proxy can ask any of them
for the same thing: exact byte counts, the device a row sits on, a key to sort by.
"""
import html

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt

BytesRole = Qt.UserRole + 1      # int: exact bytes of the row's tensor/file
DeviceRole = Qt.UserRole + 2     # str: llama.cpp buffer name of the row's device: CPU, CUDA0, ...
SortRole = Qt.UserRole + 3       # what QSortFilterProxyModel sorts by: numbers for numeric columns
PathRole = Qt.UserRole + 4       # str: a file path
TensorRole = Qt.UserRole + 5     # engine.plan.inventory.InventoryTensor of the row

ALIGN_RIGHT = int(Qt.AlignRight | Qt.AlignVCenter)
Index = QModelIndex | QPersistentModelIndex


def plain_tooltip(text: str | None) -> str | None:
    """text as a tooltip shown verbatim. Qt renders a tooltip as HTML whenever it looks like
    markup, so a GGUF key, a tensor name or a chat title written as `<img src=...>` or a huge
    `<table>` would be interpreted; escaped inside a rich-text paragraph it is shown as typed,
    line breaks and runs of spaces kept."""
    if not text:
        return text
    return f'<p style="white-space:pre-wrap">{html.escape(text)}</p>'


class RowTableModel(QAbstractTableModel):
    """A flat table: one column per entry of HEADERS, one row per item of `rows()`. Columns in
    RIGHT_ALIGNED (numbers) get right-aligned headers."""

    HEADERS: tuple[str, ...] = ()
    RIGHT_ALIGNED: frozenset[int] = frozenset()

    def rows(self):
        return self._rows

    def rowCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows())

    def columnCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.HEADERS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole):
        if orientation != Qt.Horizontal or not 0 <= section < len(self.HEADERS):
            return None
        if role == Qt.DisplayRole:
            return self.HEADERS[section]
        if role == Qt.TextAlignmentRole and section in self.RIGHT_ALIGNED:
            return ALIGN_RIGHT
        return None


__all__ = ["BytesRole", "DeviceRole", "SortRole", "PathRole", "TensorRole", "RowTableModel", "ALIGN_RIGHT"]
