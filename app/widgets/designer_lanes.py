"""Device lanes: one card per device with a stacked memory bar, and the drop target for moves.

A lane paints one row of a `DeviceLaneModel`: weights, KV cache, compute buffers and overhead
stacked against a line at capacity, red past it, and the numbers in text. Dropping tensor refs
(`MIME_TYPE`) on a lane asks for them to move there; while a drag hovers, every lane shows the
estimate as it would be after the drop.
"""
from __future__ import annotations

from PySide6.QtCore import QModelIndex, QRectF, Qt, Signal
from PySide6.QtGui import (QBrush, QColor, QContextMenuEvent, QDragEnterEvent, QDragLeaveEvent, QDropEvent, QFont,
                           QFontMetricsF, QPainter, QPainterPath, QPen)
from PySide6.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from app import theme
from app.models.device_lanes import DeviceLaneModel
from app.models.placement_items import MIME_TYPE, decode_refs
from app.theme import ERROR_FILL, device_color

GIB = 1 << 30
LANE_HEIGHT = 78
BAR_HEIGHT = 14
CARD_BG = theme.color("raised")
CARD_BORDER = theme.color("control_hover")
TRACK_BG = theme.color("sidebar")
TEXT = theme.color("text")
MUTED = theme.color("muted")
OVERHEAD_COLOR = theme.color("device_overhead")
FREE_COLOR = theme.color("device_free")


def gib_text(n_bytes: int) -> str:
    """Lane numbers: GiB with one decimal, smaller amounts in MiB."""
    if abs(n_bytes) < GIB:
        return f"{n_bytes / (1 << 20):.0f} MiB"
    return f"{n_bytes / GIB:.1f} GiB"


def gib_number(n_bytes: int) -> str:
    """A part of a lane, in GiB: two decimals below 10 GiB so small parts do not read as zero."""
    value = n_bytes / GIB
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


class DeviceLane(QWidget):
    """One device's card; emits `refs_dropped(refs, device)` when tensors are dropped on it."""

    refs_dropped = Signal(object, str)          # list[TensorRef], device name
    drag_hovered = Signal(object, str)          # list[TensorRef] or None (left), device name
    context_requested = Signal(str, object)     # device name, global QPoint

    def __init__(self, model: DeviceLaneModel, row: int, parent: QWidget | None = None):
        super().__init__(parent)
        self.model, self.row = model, row
        self.device = model.devices[row]
        self.drop_hover = False
        self.setAcceptDrops(True)
        self.setMinimumHeight(LANE_HEIGHT)
        self.setMaximumHeight(LANE_HEIGHT)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setAttribute(Qt.WA_OpaquePaintEvent, False)
        self.setToolTip(model.data(model.index(row, 0), Qt.ToolTipRole))
        self.setObjectName(f"lane_{self.device.name}")

    def refresh(self) -> None:
        self.setToolTip(self.model.data(self.model.index(self.row, 0), Qt.ToolTipRole))
        self.update()

    # --- drops ---------------------------------------------------------------------------------

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if not event.mimeData().hasFormat(MIME_TYPE):
            event.ignore()
            return
        event.setDropAction(Qt.MoveAction)
        event.accept()
        self.drop_hover = True
        self.drag_hovered.emit(decode_refs(event.mimeData()), self.device.name)
        self.update()

    def dragMoveEvent(self, event) -> None:
        if event.mimeData().hasFormat(MIME_TYPE):
            event.setDropAction(Qt.MoveAction)
            event.accept()

    def dragLeaveEvent(self, event: QDragLeaveEvent) -> None:
        self.drop_hover = False
        self.drag_hovered.emit(None, self.device.name)
        self.update()

    def dropEvent(self, event: QDropEvent) -> None:
        refs = decode_refs(event.mimeData())
        self.drop_hover = False
        self.drag_hovered.emit(None, self.device.name)
        self.update()
        if not refs:
            event.ignore()
            return
        event.setDropAction(Qt.MoveAction)
        event.accept()
        self.refs_dropped.emit(refs, self.device.name)

    def contextMenuEvent(self, event: QContextMenuEvent) -> None:
        self.context_requested.emit(self.device.name, event.globalPos())

    # --- painting ------------------------------------------------------------------------------

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        colour = device_color(self.device.name)
        est = self.model.device_estimate(self.row)
        card = QRectF(self.rect()).adjusted(1, 3, -1, -3)
        border = colour if self.drop_hover else CARD_BORDER
        painter.setPen(QPen(border, 2 if self.drop_hover else 1))
        painter.setBrush(CARD_BG.lighter(112) if self.drop_hover else CARD_BG)
        painter.drawRoundedRect(card, 7, 7)
        inner = card.adjusted(12, 8, -12, -8)
        self._paint_title(painter, inner, colour, est)
        bar = QRectF(inner.left(), inner.top() + 24, inner.width(), BAR_HEIGHT)
        self._paint_bar(painter, bar, colour, est)
        self._paint_parts(painter, QRectF(inner.left(), bar.bottom() + 4, inner.width(), 16), est)
        painter.end()

    def _paint_title(self, painter: QPainter, rect: QRectF, colour: QColor, est) -> None:
        painter.setPen(Qt.NoPen)
        painter.setBrush(colour)
        painter.drawEllipse(QRectF(rect.left(), rect.top() + 5, 9, 9))
        bold = QFont(self.font())
        bold.setBold(True)
        painter.setFont(bold)
        painter.setPen(TEXT)
        line = QRectF(rect.left() + 16, rect.top(), rect.width() - 16, 18)
        painter.drawText(line, Qt.AlignLeft | Qt.AlignVCenter, self.device.name)
        name_width = painter.fontMetrics().horizontalAdvance(self.device.name)
        if est is not None:
            used = f"{gib_text(est.total_bytes + est.margin_bytes)} / {gib_text(self.device.total_bytes)}"
            painter.setPen(TEXT if est.fits else QColor(ERROR_FILL))
            painter.drawText(line, Qt.AlignRight | Qt.AlignVCenter, used)
        painter.setFont(self.font())
        painter.setPen(MUTED)
        kind = "simulated" if self.device.simulated else self.device.description
        painter.drawText(line.adjusted(name_width + 8, 0, 0, 0), Qt.AlignLeft | Qt.AlignVCenter,
                         painter.fontMetrics().elidedText(kind, Qt.ElideRight, int(line.width() / 2 - name_width)))

    def _paint_bar(self, painter: QPainter, bar: QRectF, colour: QColor, est) -> None:
        painter.setPen(Qt.NoPen)
        painter.setBrush(TRACK_BG)
        painter.drawRoundedRect(bar, 4, 4)
        if est is None or est.capacity_bytes <= 0:
            return
        used = est.total_bytes + est.margin_bytes
        scale = bar.width() / max(est.capacity_bytes, used)
        clip = QPainterPath()
        clip.addRoundedRect(bar, 4, 4)
        painter.save()
        painter.setClipPath(clip)
        x = bar.left()
        for n_bytes, brush in self._segments(colour, est):
            width = n_bytes * scale
            if width <= 0:
                continue
            painter.setBrush(brush)
            painter.drawRect(QRectF(x, bar.top(), width + 0.5, bar.height()))
            if width > 3:
                painter.setBrush(QColor(0, 0, 0, 70))
                painter.drawRect(QRectF(x + width - 1, bar.top(), 1, bar.height()))
            x += width
        capacity_x = bar.left() + est.capacity_bytes * scale
        if used > est.capacity_bytes:
            painter.setBrush(QBrush(QColor(ERROR_FILL), Qt.BDiagPattern))
            painter.drawRect(QRectF(capacity_x, bar.top(), bar.right() - capacity_x, bar.height()))
            painter.setBrush(theme.color("error_fill", 0.43))
            painter.drawRect(QRectF(capacity_x, bar.top(), bar.right() - capacity_x, bar.height()))
        painter.restore()
        painter.setPen(QPen(QColor(ERROR_FILL) if used > est.capacity_bytes else TEXT, 2))
        painter.drawLine(capacity_x - 1, bar.top() - 3, capacity_x - 1, bar.bottom() + 3)

    def _segments(self, colour: QColor, est) -> list[tuple[int, QBrush]]:
        kv = QColor(colour).lighter(150)       # LaneLegend draws the same shades
        compute = QColor(colour)
        compute.setAlpha(120)
        margin = QBrush(theme.color("disabled"), Qt.BDiagPattern)
        return [(est.weights_bytes, QBrush(colour)), (est.kv_bytes, QBrush(kv)), (est.compute_bytes, QBrush(compute)),
                (est.overhead_bytes, QBrush(OVERHEAD_COLOR)), (est.margin_bytes, margin)]

    def _paint_parts(self, painter: QPainter, rect: QRectF, est) -> None:
        if est is None:
            return
        small = QFont(self.font())
        small.setPointSizeF(max(self.font().pointSizeF() - 1.5, 7.5))
        painter.setFont(small)
        if est.fits:
            painter.setPen(FREE_COLOR)
            status = f"{gib_text(est.free_bytes)} free"
        else:
            painter.setPen(QColor(ERROR_FILL))
            status = f"{gib_text(-est.free_bytes)} over"
        painter.drawText(rect, Qt.AlignRight | Qt.AlignVCenter, status)
        x = rect.left()
        metrics = painter.fontMetrics()
        for i, (brush, n_bytes) in enumerate(zip(self._segments(device_color(self.device.name), est), parts_of(est))):
            painter.setPen(Qt.NoPen)
            painter.setBrush(brush[1])
            painter.drawRoundedRect(QRectF(x, rect.center().y() - 4, 8, 8), 2, 2)
            # a GPU's compute buffer is derived from llama.cpp's rules, not measured: marked *
            text = gib_number(n_bytes) + ("*" if i == COMPUTE_PART and getattr(est, "compute_derived", False) else "")
            painter.setPen(MUTED)
            painter.drawText(QRectF(x + 11, rect.top(), 60, rect.height()), Qt.AlignLeft | Qt.AlignVCenter, text)
            x += 11 + metrics.horizontalAdvance(text) + 10
        painter.drawText(QRectF(x - 6, rect.top(), 40, rect.height()), Qt.AlignLeft | Qt.AlignVCenter, "GiB")


COMPUTE_PART = 2        # index of the compute buffers in parts_of


def parts_of(est) -> list[int]:
    """What a lane's bar stacks, in order: weights, KV cache, compute buffers, overhead."""
    return [est.weights_bytes, est.kv_bytes, est.compute_bytes, est.overhead_bytes]


class LaneLegend(QWidget):
    """What the four shades of a lane mean."""

    ITEMS = (("weights", 1.0, False), ("KV cache", 1.5, False), ("compute (* derived, not measured)", 1.0, True),
             ("overhead", 0, False))

    CAPTION = "Each bar:"
    LINE_PX = 18

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setFixedHeight(self.LINE_PX)
        self.setToolTip("What fills each device's bar: its weights, its KV cache, the compute buffers of "
                        "its layers and the fixed overhead (CUDA context). The line is the capacity; "
                        "a bar past it turns red.")
        self.setAccessibleName("Legend of the device bars: " + ", ".join(label for label, *_ in self.ITEMS))

    def _small_font(self) -> QFont:
        small = QFont(self.font())
        small.setPointSizeF(max(self.font().pointSizeF() - 1.5, 7.5))
        return small

    def item_positions(self, width: int) -> list[tuple[float, float]]:
        """Top-left of the caption and of each item, wrapped onto as many lines as `width` needs."""
        metrics = QFontMetricsF(self._small_font())
        widths = [metrics.horizontalAdvance(self.CAPTION) + 8] + \
                 [11 + metrics.horizontalAdvance(label) + 12 for label, *_ in self.ITEMS]
        positions, x, y = [], 0.0, 0.0
        for w in widths:
            if x > 0 and x + w - 12 > width:
                x, y = 0.0, y + self.LINE_PX
            positions.append((x, y))
            x += w
        return positions

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        lines = 1 + int(max(y for _, y in self.item_positions(self.width())) // self.LINE_PX)
        self.setFixedHeight(lines * self.LINE_PX)

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setFont(self._small_font())
        base = device_color("CUDA0")
        (cx, cy), *positions = self.item_positions(self.width())
        painter.setPen(MUTED)
        painter.drawText(QRectF(cx, cy, self.width(), self.LINE_PX), Qt.AlignLeft | Qt.AlignVCenter, self.CAPTION)
        for (label, lighter, faded), (x, y) in zip(self.ITEMS, positions):
            colour = QColor(OVERHEAD_COLOR) if not lighter else QColor(base).lighter(int(100 * lighter))
            if faded:
                colour.setAlpha(120)
            painter.setPen(Qt.NoPen)
            painter.setBrush(colour)
            painter.drawRoundedRect(QRectF(x, y + 5, 8, 8), 2, 2)
            painter.setPen(MUTED)
            painter.drawText(QRectF(x + 11, y, self.width(), self.LINE_PX), Qt.AlignLeft | Qt.AlignVCenter, label)
        painter.end()


class DeviceLanesView(QWidget):
    """The lanes of every device in a `DeviceLaneModel`, rebuilt when the device list changes."""

    refs_dropped = Signal(object, str)
    drag_hovered = Signal(object, str)
    context_requested = Signal(str, object)

    def __init__(self, model: DeviceLaneModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = model
        self.lanes: list[DeviceLane] = []
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.setSpacing(4)
        model.modelReset.connect(self.rebuild)
        model.dataChanged.connect(self._on_data_changed)
        self.rebuild()

    def rebuild(self) -> None:
        for lane in self.lanes:
            self._layout.removeWidget(lane)
            lane.deleteLater()
        self.lanes = []
        for row in range(self.model.rowCount()):
            lane = DeviceLane(self.model, row, self)
            lane.refs_dropped.connect(self.refs_dropped)
            lane.drag_hovered.connect(self.drag_hovered)
            lane.context_requested.connect(self.context_requested)
            self._layout.addWidget(lane)
            self.lanes.append(lane)

    def lane(self, device: str) -> DeviceLane:
        return next(lane for lane in self.lanes if lane.device.name == device)

    def _on_data_changed(self, top_left: QModelIndex, bottom_right: QModelIndex, roles=()) -> None:
        for row in range(top_left.row(), bottom_right.row() + 1):
            if row < len(self.lanes):
                self.lanes[row].refresh()
