"""The designer's device lanes: one row per device, its capacity and the memory estimate's parts."""
from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QObject, Qt
from PySide6.QtGui import QColor

from app.models import BytesRole, DeviceRole, RowTableModel
from app.models.placement_items import ALIGN_RIGHT, ColorRole, FitsRole, Index, exact_bytes
from app.theme import ERROR_FILL, device_color
from engine.plan.memory import MemoryEstimate
from engine.units import format_bytes


class DeviceLaneModel(RowTableModel):
    """One row per device: its capacity and the estimate's parts; a hovering drag's preview if any."""

    (COL_DEVICE, COL_CAPACITY, COL_WEIGHTS, COL_KV, COL_COMPUTE, COL_OVERHEAD, COL_MARGIN, COL_TOTAL,
     COL_FREE) = range(9)
    HEADERS = ("Device", "Capacity", "Weights", "KV cache", "Compute", "Overhead", "Margin", "Total", "Free")
    _FIELDS = {COL_WEIGHTS: "weights_bytes", COL_KV: "kv_bytes", COL_COMPUTE: "compute_bytes",
               COL_OVERHEAD: "overhead_bytes", COL_MARGIN: "margin_bytes", COL_TOTAL: "total_bytes",
               COL_FREE: "free_bytes", COL_CAPACITY: "capacity_bytes"}

    def __init__(self, devices: Sequence = (), estimate: MemoryEstimate | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.devices = list(devices)
        self.estimate = estimate
        self.preview: MemoryEstimate | None = None

    def set_devices(self, devices: Sequence, estimate: MemoryEstimate | None) -> None:
        self.beginResetModel()
        self.devices, self.estimate, self.preview = list(devices), estimate, None
        self.endResetModel()

    def set_estimate(self, estimate: MemoryEstimate | None) -> None:
        self.estimate = estimate
        self._all_changed()

    def set_preview(self, preview: MemoryEstimate | None) -> None:
        if preview is None and self.preview is None:
            return
        self.preview = preview
        self._all_changed()

    def _all_changed(self) -> None:
        if self.devices:
            self.dataChanged.emit(self.index(0, 0), self.index(len(self.devices) - 1, len(self.HEADERS) - 1))

    def rows(self):
        return self.devices

    def device_estimate(self, row: int):
        """The row's DeviceEstimate: the preview's while a drag hovers, else the current one."""
        estimate = self.preview or self.estimate
        if estimate is None:
            return None
        try:
            return estimate[self.devices[row].name]
        except KeyError:
            return None

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        device = self.devices[index.row()]
        column = index.column()
        est = self.device_estimate(index.row())
        if role == DeviceRole:
            return device.name
        if role in (ColorRole, Qt.DecorationRole) and column == self.COL_DEVICE:
            return device_color(device.name)
        if role == FitsRole:
            return est.fits if est else True
        if role == BytesRole:
            return self._bytes(device, est, column)
        if role == Qt.DisplayRole:
            if column == self.COL_DEVICE:
                return device.name
            n_bytes = self._bytes(device, est, column)
            return None if n_bytes is None else format_bytes(n_bytes)
        if role == Qt.ToolTipRole:
            return self._tooltip(device, est)
        if role == Qt.ForegroundRole and column == self.COL_FREE and est is not None and not est.fits:
            return QColor(ERROR_FILL)
        if role == Qt.TextAlignmentRole and column != self.COL_DEVICE:
            return ALIGN_RIGHT
        return None

    def _bytes(self, device, est, column: int) -> int | None:
        if column == self.COL_CAPACITY:
            return device.total_bytes
        if column == self.COL_DEVICE or est is None:
            return None
        return getattr(est, self._FIELDS[column])

    def _tooltip(self, device, est) -> str:
        lines = [f"{device.name}: {device.description or device.kind}" + (" (simulated)" if device.simulated else ""),
                 f"capacity {exact_bytes(device.total_bytes)}"]
        if est is not None:
            lines += [f"weights {exact_bytes(est.weights_bytes)}", f"KV cache {exact_bytes(est.kv_bytes)}",
                      f"compute buffers {exact_bytes(est.compute_bytes)}"
                      + (" (derived from llama.cpp's graph, not measured on a GPU)" if est.compute_derived else ""),
                      f"overhead {exact_bytes(est.overhead_bytes)}"]
            lines += [f"  {t.name} {format_bytes(t.n_bytes)}" + (" (derived)" if t.derived else "")
                      for t in getattr(est, "overhead_terms", ())]
            if est.margin_bytes:
                lines.append(f"margin kept free {exact_bytes(est.margin_bytes)}")
            lines.append(f"free {format_bytes(est.free_bytes)}" if est.fits else
                         f"over capacity by {format_bytes(-est.free_bytes)}")
        return "\n".join(lines)
