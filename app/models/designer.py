"""The designer's Qt models: device lanes, the layer × tensor-group grid, one layer's expert strip.

They read an `engine.plan.placement.Placement` and a `MemoryEstimate`; they never move anything
themselves. A move reaches them as `tensors_moved(moved)` and comes out as one `dataChanged`
over the cells it touched, never a reset. Drags carry `TensorRef`s in `MIME_TYPE`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
from PySide6.QtCore import QAbstractTableModel, QByteArray, QMimeData, QModelIndex, QObject, QPersistentModelIndex, Qt
from PySide6.QtGui import QColor

from app.models import BytesRole, DeviceRole, RowTableModel
from engine.plan.inventory import Inventory, InventoryTensor, Role
from engine.plan.memory import MemoryEstimate
from engine.plan.placement import INPUT_SLOT, Moved, Placement, TensorRef, expert_ranges, tensor_slot
from engine.units import format_bytes

DevicesRole = Qt.UserRole + 20      # dict[str, int]: bytes of the cell (or tile) on each device, largest first
SplitRole = Qt.UserRole + 21        # bool: a tensor in the cell has its experts on several devices (ours only)
ExpertCountRole = Qt.UserRole + 22  # int: experts of the cell's routed-expert tensors (0: none)
ColorRole = Qt.UserRole + 23        # QColor of the (majority) device
HeatRole = Qt.UserRole + 24         # float 0..1: how often the router picked this expert, if known
FitsRole = Qt.UserRole + 25         # bool: the device's estimate fits its capacity
RefsRole = Qt.UserRole + 26         # list[TensorRef]: what moving this cell moves

MIME_TYPE = "application/x-offload-studio-tensor-refs"

CPU_COLOR = "#858a94"
GPU_COLORS = ("#4c8dff", "#2fbf8f", "#f0a33a", "#b07cf0", "#34c0d8", "#f06fa8", "#9ccc3c", "#ff8a4c")
OVER_COLOR = "#e5484d"
ALIGN_CENTER = int(Qt.AlignCenter)
ALIGN_RIGHT = int(Qt.AlignRight | Qt.AlignVCenter)

GROUP_LABELS = {"attention": "attn_*", "norm": "*_norm", "router": "ffn_gate_inp", "ffn": "ffn (dense)",
                "shared_expert": "ffn_*_shexp", "other": "other"}
GROUP_HELP = {"attention": "Attention weights; the layer's KV cache sits with them",
              "norm": "Norm weights", "router": "Expert router (gate) and its bias",
              "ffn": "Dense feed-forward network", "shared_expert": "Shared expert, used by every token",
              "other": "Other tensors"}

Index = QModelIndex | QPersistentModelIndex


_DEVICE_COLORS: dict[str, QColor] = {}


def device_color(name: str) -> QColor:
    """CPU grey; CUDA0, CUDA1, ... each its own hue. Shared instances: copy before changing one."""
    colour = _DEVICE_COLORS.get(name)
    if colour is None:
        digits = "".join(ch for ch in name if ch.isdigit())
        hex_colour = CPU_COLOR if name == "CPU" or not digits else GPU_COLORS[int(digits) % len(GPU_COLORS)]
        colour = _DEVICE_COLORS[name] = QColor(hex_colour)
    return colour


def short_bytes(n_bytes: int) -> str:
    """Cell text: three significant figures at most ('7.0 GiB', '126 MiB', '28 KiB')."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1000 or unit == "TiB":
            return f"{value:.0f} {unit}" if value >= 100 or unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def exact_bytes(n_bytes: int) -> str:
    return f"{n_bytes:,} B ({format_bytes(n_bytes)})"


def group_label(group: str) -> str:
    return GROUP_LABELS.get(group, group)


def encode_refs(refs: Iterable[TensorRef]) -> QMimeData:
    items = [[r.name, sorted(r.experts) if r.experts is not None else None] for r in refs]
    mime = QMimeData()
    mime.setData(MIME_TYPE, QByteArray(json.dumps(items).encode()))
    mime.setText("\n".join(r.name + (f" [{expert_ranges(r.experts)}]" if r.experts is not None else "")
                           for r in refs))
    return mime


def decode_refs(mime: QMimeData) -> list[TensorRef]:
    if not mime.hasFormat(MIME_TYPE):
        return []
    items = json.loads(bytes(mime.data(MIME_TYPE)).decode())
    return [TensorRef(name, frozenset(experts) if experts is not None else None) for name, experts in items]


def _sorted_devices(by_device: dict[str, int]) -> dict[str, int]:
    return dict(sorted(by_device.items(), key=lambda kv: -kv[1]))


# --- device lanes ----------------------------------------------------------------------------

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
            return QColor(OVER_COLOR)
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
                      f"compute buffers {exact_bytes(est.compute_bytes)}", f"overhead {exact_bytes(est.overhead_bytes)}"]
            if est.margin_bytes:
                lines.append(f"margin kept free {exact_bytes(est.margin_bytes)}")
            lines.append(f"free {format_bytes(est.free_bytes)}" if est.fits else
                         f"over capacity by {format_bytes(-est.free_bytes)}")
        return "\n".join(lines)


# --- the layer grid --------------------------------------------------------------------------

class LayerGridModel(QAbstractTableModel):
    """Rows: the input tensors, one row per layer, the output tensors; columns: `inventory.groups()`.

    A layer cell holds that layer's tensors of the column's group; a row outside the layers holds
    one tensor, in column 0 (the view spans it over the row).
    """

    def __init__(self, inventory: Inventory | None = None, placement: Placement | None = None,
                 parent: QObject | None = None):
        super().__init__(parent)
        self._set(inventory, placement)

    def _set(self, inventory: Inventory | None, placement: Placement | None) -> None:
        self.inventory, self.placement = inventory, placement
        self.groups: list[str] = inventory.groups() if inventory else []
        self._rows: list[tuple[int | None, str]] = []       # (layer or None, label)
        self._cells: dict[tuple[int, int], list[InventoryTensor]] = {}
        self._cell_of: dict[str, tuple[int, int]] = {}
        self._devices_cache: dict[tuple[int, int], dict[str, int]] = {}
        if inventory is None:
            return
        n_layer = inventory.n_layer
        before = [t for t in inventory.globals if tensor_slot(t.name, t.layer, n_layer) in (INPUT_SLOT, 0)]
        after = [t for t in inventory.globals if t not in before]
        for t in before:
            self._add_global_row(t, "input")
        column = {g: c for c, g in enumerate(self.groups)}
        for layer in inventory.layers:
            row = len(self._rows)
            self._rows.append((layer.index, f"blk.{layer.index}"))
            for t in layer.tensors:
                self._add_cell(row, column[t.group], t)
        for t in sorted(after, key=lambda t: t.name != "output_norm.weight"):
            self._add_global_row(t, "output")

    def _add_global_row(self, tensor: InventoryTensor, label: str) -> None:
        self._rows.append((None, label))
        self._add_cell(len(self._rows) - 1, 0, tensor)

    def _add_cell(self, row: int, column: int, tensor: InventoryTensor) -> None:
        self._cells.setdefault((row, column), []).append(tensor)
        self._cell_of[tensor.name] = (row, column)

    def set_model(self, inventory: Inventory | None, placement: Placement | None) -> None:
        self.beginResetModel()
        self._set(inventory, placement)
        self.endResetModel()

    def set_placement(self, placement: Placement) -> None:
        """A whole new placement over the same inventory (auto-fit, undo of one): every cell may change."""
        self.placement = placement
        self._devices_cache.clear()
        if self._rows and self.groups:
            self.dataChanged.emit(self.index(0, 0), self.index(len(self._rows) - 1, len(self.groups) - 1))

    def tensors_moved(self, moved: Iterable[Moved]) -> None:
        """One dataChanged over the box of the cells whose tensors moved."""
        cells = {self._cell_of[m.ref.name] for m in moved if m.ref.name in self._cell_of}
        if not cells:
            return
        for cell in cells:
            self._devices_cache.pop(cell, None)
        rows, columns = [r for r, _ in cells], [c for _, c in cells]
        self.dataChanged.emit(self.index(min(rows), min(columns)), self.index(max(rows), max(columns)))

    # --- structure -----------------------------------------------------------------------------

    def rowCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.groups)

    def layer_of_row(self, row: int) -> int | None:
        return self._rows[row][0]

    def row_of_layer(self, layer: int) -> int:
        return next(r for r, (il, _) in enumerate(self._rows) if il == layer)

    def is_layer_row(self, row: int) -> bool:
        return self._rows[row][0] is not None

    def layer_rows(self) -> range:
        rows = [r for r, (il, _) in enumerate(self._rows) if il is not None]
        return range(rows[0], rows[-1] + 1) if rows else range(0)

    def index_of_tensor(self, name: str) -> QModelIndex:
        row, column = self._cell_of[name]
        return self.index(row, column)

    def tensors(self, index: Index) -> list[InventoryTensor]:
        return self._cells.get((index.row(), index.column()), []) if index.isValid() else []

    def refs_for(self, indexes: Iterable[Index]) -> list[TensorRef]:
        seen, refs = set(), []
        for index in indexes:
            for t in self.tensors(index):
                if t.name not in seen:
                    seen.add(t.name)
                    refs.append(TensorRef(t.name))
        return refs

    def flags(self, index: Index) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.NoItemFlags
        if not self.tensors(index):
            return Qt.ItemIsEnabled
        return Qt.ItemIsEnabled | Qt.ItemIsSelectable | Qt.ItemIsDragEnabled

    def mimeTypes(self) -> list[str]:
        return [MIME_TYPE]

    def mimeData(self, indexes: Sequence[QModelIndex]) -> QMimeData:
        return encode_refs(self.refs_for(indexes))

    def supportedDragActions(self) -> Qt.DropAction:
        return Qt.MoveAction

    # --- data ----------------------------------------------------------------------------------

    def cell_devices(self, row: int, column: int) -> dict[str, int]:
        key = (row, column)
        cached = self._devices_cache.get(key)
        if cached is None:
            by_device: dict[str, int] = {}
            for t in self._cells.get(key, []):
                for device, n_bytes in self.placement.device_bytes(t.name).items():
                    by_device[device] = by_device.get(device, 0) + n_bytes
            cached = self._devices_cache[key] = _sorted_devices(by_device)
        return cached

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid() or self.placement is None:
            return None
        tensors = self.tensors(index)
        if not tensors:
            return None
        row, column = index.row(), index.column()
        if role == Qt.DisplayRole:
            n_bytes = sum(t.n_bytes for t in tensors)
            if not self.is_layer_row(row):
                return f"{tensors[0].name.rsplit('.', 1)[0]}   {short_bytes(n_bytes)}"
            return short_bytes(n_bytes)
        if role in (DeviceRole, ColorRole, Qt.BackgroundRole):
            device = next(iter(self.cell_devices(row, column)), "CPU")
            return device if role == DeviceRole else device_color(device)
        if role == BytesRole:
            return sum(t.n_bytes for t in tensors)
        if role == DevicesRole:
            return dict(self.cell_devices(row, column))
        if role == SplitRole:
            return any(self.placement.is_split(t.name) for t in tensors if t.n_experts)
        if role == ExpertCountRole:
            return max((t.n_experts for t in tensors), default=0)
        if role == RefsRole:
            return [TensorRef(t.name) for t in tensors]
        if role == Qt.ToolTipRole:
            return self._tooltip(tensors)
        if role == Qt.TextAlignmentRole:
            return ALIGN_CENTER
        return None

    def _tooltip(self, tensors: list[InventoryTensor]) -> str:
        lines = []
        for t in tensors:
            shape = " × ".join(str(d) for d in t.shape)
            lines.append(f"{t.name}   {t.type_name}   [{shape}]")
            lines.append(f"    {exact_bytes(t.n_bytes)}")
            if t.n_experts:
                lines.append(f"    {t.n_experts} experts × {t.expert_bytes:,} B ({format_bytes(t.expert_bytes)}) each")
            if self.placement.is_split(t.name):
                per_device = self.placement.device_bytes(t.name)
                experts = _experts_by_device(self.placement.expert_devices(t.name))
                lines.append("    split (ours only): " + "; ".join(
                    f"{d} experts {expert_ranges(es)} ({format_bytes(per_device[d])})" for d, es in experts.items()))
            else:
                lines.append(f"    on {self.placement.device_of(t.name)}")
        if len(tensors) > 1:
            lines.append(f"total {exact_bytes(sum(t.n_bytes for t in tensors))}")
        return "\n".join(lines)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole):
        if orientation == Qt.Horizontal and 0 <= section < len(self.groups):
            group = self.groups[section]
            if role == Qt.DisplayRole:
                return group_label(group)
            if role == Qt.ToolTipRole:
                total = sum(t.n_bytes for (r, c), ts in self._cells.items() if c == section and self.is_layer_row(r)
                            for t in ts)
                what = GROUP_HELP.get(group, f"Routed experts: {group}")
                return f"{what}\nall layers: {exact_bytes(total)}\nClick to select the whole column"
        if orientation == Qt.Vertical and 0 <= section < len(self._rows):
            layer, label = self._rows[section]
            if role == Qt.DisplayRole:
                return label if layer is None else str(layer)
            if role == Qt.ToolTipRole and layer is not None and self.inventory is not None:
                n_bytes = self.inventory.layers[layer].n_bytes
                return f"blk.{layer}: {exact_bytes(n_bytes)}\nKV cache on {self.placement.layer_home_device(layer)}" \
                    if self.placement is not None else f"blk.{layer}"
        return None


def _experts_by_device(devices: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e, d in enumerate(devices):
        out.setdefault(d, []).append(e)
    return out


# --- one layer's experts ---------------------------------------------------------------------

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
            heat = self.heat_of(expert)
            picked = "" if heat is None else f"\nrouter picks: {self.heat[self.layer][expert]:,.0f} ({heat:.0%} of the most)"
            return f"expert {expert} of {t.name}\n{exact_bytes(t.expert_bytes)} on {device}{picked}"
        return None

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole):
        if role != Qt.DisplayRole:
            return None
        if orientation == Qt.Horizontal and 0 <= section < self.columnCount():
            return str(section)
        if orientation == Qt.Vertical and 0 <= section < len(self._tensors):
            return self._tensors[section].group
        return None
