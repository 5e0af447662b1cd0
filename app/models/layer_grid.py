"""The designer's layer grid: the input tensors, one row per layer, the output tensors; one column
per tensor group. A cell's colour is the device most of its bytes sit on."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from PySide6.QtCore import QAbstractTableModel, QMimeData, QModelIndex, QObject, Qt

from app.models import BytesRole, DeviceRole
from app.models.placement_items import (ALIGN_CENTER, GROUP_HELP, MIME_TYPE, ColorRole, DevicesRole, ExpertCountRole,
                                        Index, RefsRole, SplitRole, encode_refs, exact_bytes, experts_by_device,
                                        group_label, short_bytes, sorted_devices)
from app.theme import device_color
from engine.plan.inventory import Inventory, InventoryTensor
from engine.plan.placement import INPUT_SLOT, Moved, Placement, TensorRef, expert_ranges, tensor_slot
from engine.units import format_bytes

DELTA_NET_MARK = "\u0394"      # row header mark of a Gated DeltaNet (recurrent) layer
ATTENTION_MARK = "A"            # ... of a full-attention layer in a hybrid model


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

    def layer_kind(self, layer: int) -> str:
        """In a hybrid model, whether the layer is DeltaNet or attention; "" elsewhere."""
        hp = self.inventory.hparams if self.inventory is not None else None
        if hp is None or not any(hp.is_recurrent(il) for il in range(hp.n_layer)):
            return ""
        return DELTA_NET_MARK if hp.is_recurrent(layer) else ATTENTION_MARK

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
            cached = self._devices_cache[key] = sorted_devices(by_device)
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
                experts = experts_by_device(self.placement.expert_devices(t.name))
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
                return label if layer is None else f"{layer} {self.layer_kind(layer)}".rstrip()
            if role == Qt.ToolTipRole and layer is not None and self.inventory is not None:
                n_bytes = self.inventory.layers[layer].n_bytes
                cache = "recurrent state (DeltaNet layer)" if self.layer_kind(layer) == DELTA_NET_MARK else "KV cache"
                return f"blk.{layer}: {exact_bytes(n_bytes)}\n{cache} on {self.placement.layer_home_device(layer)}" \
                    if self.placement is not None else f"blk.{layer}"
        return None
