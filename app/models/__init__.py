"""Qt models over engine objects. Views bind these; they hold no model math themselves.

Custom roles shared by every model of the app, so a delegate or a proxy can ask any of them
for the same thing: exact byte counts, the device a row sits on, a key to sort by.
"""
from PySide6.QtCore import Qt

BytesRole = Qt.UserRole + 1      # int: exact bytes of the row's tensor/file
DeviceRole = Qt.UserRole + 2     # str: llama.cpp buffer name of the row's device: CPU, CUDA0, ...
SortRole = Qt.UserRole + 3       # what QSortFilterProxyModel sorts by: numbers for numeric columns
PathRole = Qt.UserRole + 4       # str: a file path
TensorRole = Qt.UserRole + 5     # engine.inventory.InventoryTensor of the row

__all__ = ["BytesRole", "DeviceRole", "SortRole", "PathRole", "TensorRole"]
