"""The designer's expert strip: one layer's routed-expert tensors, one tile per expert, each on
one device, with the router's selection counts as heat."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PySide6.QtCore import QAbstractTableModel, QMimeData, QModelIndex, QObject, Qt

from app.models import BytesRole, DeviceRole, plain_tooltip
from app.models.placement_items import (MIME_TYPE, ColorRole, DevicesRole, HeatRole, Index, RefsRole, encode_refs,
                                        exact_bytes, short_bytes)
from app.theme import device_color
from engine.plan.inventory import Inventory, InventoryTensor, Role
from engine.plan.placement import Moved, Placement, TensorRef


class ExpertStripModel(QAbstractTableModel):
    """Rows: the routed-expert tensors of one layer; columns: its experts; each tile on one device."""

    def __init__(self, inventory: Inventory | None = None, placement: Placement | None = None,
                 layer: int | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.inventory, self.placement = inventory, placement
        self.heat: np.ndarray | None = None         # (n_layer, n_expert) router selection counts
        self.layer: int | None = None
        self._tensors: list[InventoryTensor] = []
        self._row_devices: dict[int, tuple[str, ...]] = {}
        self._set_layer(layer)

    def _set_layer(self, layer: int | None) -> None:
        self._row_devices = {}
        self.layer = layer
        if self.inventory is None or layer is None or not 0 <= layer < self.inventory.n_layer:
            self.layer, self._tensors = None, []
            return
        order = {g: i for i, g in enumerate(self.inventory.groups())}
        self._tensors = sorted((t for t in self.inventory.layers[layer].tensors
                                if t.role is Role.ROUTED_EXPERTS and t.n_experts),
                               key=lambda t: (order.get(t.group, 99), t.name))

    def set_model(self, inventory: Inventory | None, placement: Placement | None) -> None:
        self.beginResetModel()
        self.inventory, self.placement, self.heat = inventory, placement, None
        self._set_layer(None)
        self.endResetModel()

    def set_layer(self, layer: int | None) -> None:
        if layer == self.layer:
            return
        self.beginResetModel()
        self._set_layer(layer)
        self.endResetModel()

    def set_placement(self, placement: Placement) -> None:
        self.placement = placement
        self._row_devices = {}
        self._all_changed()

    def set_heat(self, heat: np.ndarray | None) -> None:
        """Router selection counts, shape (n_layer, n_expert); None turns the heat off."""
        self.heat = None if heat is None else np.asarray(heat, dtype=np.float64)
        self._all_changed()

    def _all_changed(self) -> None:
        if self._tensors:
            self.dataChanged.emit(self.index(0, 0), self.index(len(self._tensors) - 1, self.columnCount() - 1))

    def tensors_moved(self, moved: Iterable[Moved]) -> None:
        """dataChanged over the rows and the span of experts that moved in this layer."""
        rows_of = {t.name: r for r, t in enumerate(self._tensors)}
        rows, experts = [], []
        for m in moved:
            row = rows_of.get(m.ref.name)
            if row is None:
                continue
            rows.append(row)
            self._row_devices.pop(row, None)
            experts.extend((min(m.ref.experts), max(m.ref.experts)) if m.ref.experts else (0, self.columnCount() - 1))
        if rows:
            self.dataChanged.emit(self.index(min(rows), min(experts)), self.index(max(rows), max(experts)))

    def rowCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._tensors)

    def columnCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() or not self._tensors else max(t.n_experts for t in self._tensors)

    def tensor(self, row: int) -> InventoryTensor:
        return self._tensors[row]

    def row_devices(self, row: int) -> tuple[str, ...]:
        devices = self._row_devices.get(row)
        if devices is None:
            devices = self._row_devices[row] = self.placement.expert_devices(self._tensors[row].name)
        return devices

    def heat_of(self, expert: int) -> float | None:
        if self.heat is None or self.layer is None or self.layer >= len(self.heat):
            return None
        counts = self.heat[self.layer]
        top = counts.max() if len(counts) else 0
        return float(counts[expert] / top) if top > 0 and expert < len(counts) else 0.0

    def refs_for(self, cells: Iterable[tuple[int, int]]) -> list[TensorRef]:
        """(row, expert) pairs -> one ref per tensor; a tensor with every expert picked moves whole."""
        by_row: dict[int, set[int]] = {}
        for row, expert in cells:
            by_row.setdefault(row, set()).add(expert)
        refs = []
        for row, experts in sorted(by_row.items()):
            t = self._tensors[row]
            refs.append(TensorRef(t.name) if len(experts) == t.n_experts else TensorRef(t.name, frozenset(experts)))
        return refs

    def flags(self, index: Index) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.NoItemFlags
        return Qt.ItemIsEnabled | Qt.ItemIsSelectable | Qt.ItemIsDragEnabled

    def mimeTypes(self) -> list[str]:
        return [MIME_TYPE]

    def mimeData(self, indexes: Sequence[QModelIndex]) -> QMimeData:
        return encode_refs(self.refs_for((i.row(), i.column()) for i in indexes if i.isValid()))

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid() or self.placement is None:
            return None
        row, expert = index.row(), index.column()
        t = self._tensors[row]
        if expert >= t.n_experts:
            return None
        device = self.row_devices(row)[expert]
        if role in (DeviceRole, ColorRole, Qt.BackgroundRole):
            return device if role == DeviceRole else device_color(device)
        if role == BytesRole:
            return t.expert_bytes
        if role == HeatRole:
            return self.heat_of(expert)
        if role == DevicesRole:
            return {device: t.expert_bytes}
        if role == RefsRole:
            return [TensorRef(t.name, frozenset([expert]))]
        if role == Qt.ToolTipRole:
            return plain_tooltip(self.tooltip(t, expert, device))
        return None

    def tooltip(self, t, expert: int, device: str) -> str:
        """"expert 17 of 256 · 7.9 MiB · on CUDA0 · router picks 1,204 / 3.2 %", then the tensor and exact bytes."""
        parts = [f"expert {expert} of {t.n_experts}", short_bytes(t.expert_bytes), f"on {device}"]
        if self.heat is not None and self.layer is not None:
            counts = self.heat[self.layer]
            total = float(counts.sum())
            share = f" / {100 * counts[expert] / total:.1f} %" if total else ""
            parts.append(f"router picks {counts[expert]:,.0f}{share}")
        return " · ".join(parts) + f"\n{t.name}: {exact_bytes(t.expert_bytes)} per expert"

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole):
        if role != Qt.DisplayRole:
            return None
        if orientation == Qt.Horizontal and 0 <= section < self.columnCount():
            return str(section)
        if orientation == Qt.Vertical and 0 <= section < len(self._tensors):
            return self._tensors[section].group
        return None
