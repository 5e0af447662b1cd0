"""The designer's two selection views: the layer × tensor-group grid and one layer's expert strip.

Both only select and drag: a drag carries the selection's tensor refs (`MIME_TYPE`) to a device
lane; Ctrl+0 (CPU), Ctrl+1.. (the GPUs in order) and Delete ask for a move by keyboard
(`move_key(device_index)`); the panel builds the context menu. The grid paints its cells with a
delegate: the device colour, stripes where a cell spans devices, a corner mark on a per-expert
split (ours only).
"""
from __future__ import annotations

import functools

from PySide6.QtCore import QEvent, QItemSelection, QItemSelectionModel, QModelIndex, QPoint, QRect, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QDrag, QFont, QKeyEvent, QKeySequence, QMouseEvent, QPainter, QPainterPath, QPixmap, QPolygonF
from PySide6.QtWidgets import (QAbstractItemView, QApplication, QHeaderView, QRubberBand, QStyle, QToolTip,
                               QStyledItemDelegate, QStyleOptionViewItem, QTableView, QWidget)

from app import theme
from app.models.expert_strip import ExpertStripModel
from app.models.layer_grid import LayerGridModel
from app.models.placement_items import DevicesRole, SplitRole, short_bytes
from app.theme import device_color

BASE = theme.color("base")
CELL_TEXT = theme.color("text_strong")
SPLIT_MARK = theme.color("ours_only")
SELECTED = theme.color("on_accent")
MUTED = theme.color("muted")
ROW_HEIGHT = 24
TILE = 11               # expert tile height, px
TILE_GAP = 2
ROW_STEP = TILE + TILE_GAP
MIN_COLUMN_STEP = 11    # expert tile width plus gap: narrower lines wrap into more chunks
MAX_COLUMN_STEP = 15
LABEL_WIDTH = 108       # tensor names left of the expert tiles
CHUNK_HEADER = 15       # expert numbers above each chunk
CHUNK_GAP = 8
MIN_SHARE_PX = 8        # narrowest device share drawn in a mixed grid cell


def blend(colour: QColor, amount: float, base: QColor = BASE) -> QColor:
    """`amount` of `colour` over `base`: the soft fills of the dark theme. Shared instances."""
    return _blend(colour.rgb(), round(amount, 3), base.rgb())


@functools.lru_cache(maxsize=4096)
def _blend(rgb: int, amount: float, base_rgb: int) -> QColor:
    colour, base = QColor.fromRgb(rgb), QColor.fromRgb(base_rgb)
    return QColor(int(base.red() + (colour.red() - base.red()) * amount),
                  int(base.green() + (colour.green() - base.green()) * amount),
                  int(base.blue() + (colour.blue() - base.blue()) * amount))


def drag_badge(text: str, colour: QColor, font: QFont) -> QPixmap:
    """The pill that follows the pointer during a drag: what is moving and how big it is."""
    pixmap = QPixmap(1, 1)
    painter = QPainter(pixmap)
    painter.setFont(font)
    width = painter.fontMetrics().horizontalAdvance(text) + 28
    painter.end()
    pixmap = QPixmap(width, 26)
    pixmap.fill(Qt.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.Antialiasing)
    painter.setFont(font)
    painter.setPen(Qt.NoPen)
    painter.setBrush(blend(colour, 0.85))
    painter.drawRoundedRect(QRectF(0, 0, width, 26), 13, 13)
    painter.setPen(theme.color("on_accent"))
    painter.drawText(QRectF(0, 0, width, 26), Qt.AlignCenter, text)
    painter.end()
    return pixmap


def move_key_index(event: QKeyEvent) -> int | None:
    """Ctrl+0 -> 0 (the CPU), Ctrl+1.. -> the GPUs in order, Delete/Backspace -> 0; else None."""
    key = event.key()
    if key in (Qt.Key_Delete, Qt.Key_Backspace) and not event.modifiers() & ~Qt.KeypadModifier:
        return 0
    if event.modifiers() & Qt.ControlModifier and Qt.Key_0 <= key <= Qt.Key_9:
        return key - Qt.Key_0
    return None


class CellDelegate(QStyledItemDelegate):
    """Paints a grid cell as a soft tile of its device colour with the size in the middle."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: QModelIndex) -> None:
        text = index.data(Qt.DisplayRole)
        if text is None:
            return
        devices = index.data(DevicesRole) or {}
        total = sum(devices.values()) or 1
        rect = QRectF(option.rect).adjusted(2, 2, -2, -1)
        painter.save()
        painter.setRenderHint(QPainter.Antialiasing)
        path = QPainterPath()
        path.addRoundedRect(rect, 4, 4)
        painter.setClipPath(path)
        majority = next(iter(devices), "CPU")
        painter.fillRect(rect, blend(device_color(majority), 0.5))
        if len(devices) > 1:
            bar = QRectF(rect.left() + 5, rect.bottom() - 6, rect.width() - 10, 3)
            painter.fillRect(bar.adjusted(-1, -1, 1, 1), BASE)
            self._paint_share_bar(painter, bar, devices, total)
        else:
            painter.fillRect(QRectF(rect.left(), rect.top(), rect.width(), 2), device_color(majority))
        painter.setClipping(False)
        selected = bool(option.state & QStyle.State_Selected)
        if selected:
            painter.setPen(SELECTED)
            painter.setBrush(theme.color("on_accent", 0.16))
            painter.drawRoundedRect(rect.adjusted(0.5, 0.5, -0.5, -0.5), 4, 4)
        if index.data(SplitRole):
            corner = QPolygonF([rect.topRight() + QPoint(-9, 0), rect.topRight(), rect.topRight() + QPoint(0, 9)])
            painter.setPen(Qt.NoPen)
            painter.setBrush(SPLIT_MARK)
            painter.drawPolygon(corner)
        painter.setPen(CELL_TEXT)
        painter.setFont(option.font)
        text_rect = rect.adjusted(6, -1, -6, -4) if len(devices) > 1 else rect.adjusted(6, 0, -6, 0)
        painter.drawText(text_rect, int(index.data(Qt.TextAlignmentRole) or Qt.AlignCenter), text)
        painter.restore()

    @staticmethod
    def _paint_share_bar(painter: QPainter, bar: QRectF, devices: dict[str, int], total: int) -> None:
        """Each device's share of a mixed cell; a small share still gets a visible sliver."""
        widths = [max(bar.width() * n / total, MIN_SHARE_PX) for n in devices.values()]
        scale = bar.width() / sum(widths)
        x = bar.left()
        for device, width in zip(devices, widths):
            painter.fillRect(QRectF(x, bar.top(), width * scale + 0.5, bar.height()), device_color(device))
            x += width * scale

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex) -> QSize:
        return QSize(84, ROW_HEIGHT)


class _MoveKeys:
    """Ctrl+digit must reach the view even where the window binds the same keys to its own actions."""

    def _move_key_event(self, event: QEvent) -> bool:
        if event.type() == QEvent.ShortcutOverride and move_key_index(event) is not None:
            event.accept()
            return True
        if event.type() == QEvent.KeyPress and (index := move_key_index(event)) is not None:
            self.move_key.emit(index)
            event.accept()
            return True
        return False


class LayerGridView(_MoveKeys, QTableView):
    """Layers × tensor groups; the selection can be cells, layers (row header) or groups (column header)."""

    move_key = Signal(int)
    layer_activated = Signal(int)

    def __init__(self, model: LayerGridModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("layerGrid")
        self.setModel(model)
        self.setItemDelegate(CellDelegate(self))
        self.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.setSelectionBehavior(QAbstractItemView.SelectItems)
        self.setDragEnabled(True)
        self.setDragDropMode(QAbstractItemView.DragOnly)
        self.setDefaultDropAction(Qt.MoveAction)
        self.setShowGrid(False)
        self.setWordWrap(False)
        self.setMouseTracking(True)
        self.setContextMenuPolicy(Qt.CustomContextMenu)
        self.setVerticalScrollMode(QAbstractItemView.ScrollPerPixel)
        self.setHorizontalScrollMode(QAbstractItemView.ScrollPerPixel)
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.Stretch)
        header.setMinimumSectionSize(72)
        header.setHighlightSections(True)
        header.sectionPressed.connect(self._keep_layer_rows_only)      # after the view's own selectColumn
        header.sectionEntered.connect(self._keep_layer_rows_only)
        rows = self.verticalHeader()
        rows.setSectionResizeMode(QHeaderView.Fixed)
        rows.setDefaultSectionSize(ROW_HEIGHT)
        rows.setDefaultAlignment(Qt.AlignRight | Qt.AlignVCenter)
        rows.setMinimumWidth(56)
        model.modelReset.connect(self._apply_spans)
        self.clicked.connect(self._activate)
        self._apply_spans()

    def grid_model(self) -> LayerGridModel:
        return self.model()

    def _apply_spans(self) -> None:
        self.clearSpans()
        model = self.grid_model()
        for row in range(model.rowCount()):
            if not model.is_layer_row(row) and model.columnCount() > 1:
                self.setSpan(row, 0, 1, model.columnCount())

    def _keep_layer_rows_only(self, column: int) -> None:
        """A group header selects that group in every layer, not the input and output tensors."""
        model = self.grid_model()
        drop = QItemSelection()
        for row in range(model.rowCount()):
            if not model.is_layer_row(row):
                drop.select(model.index(row, 0), model.index(row, model.columnCount() - 1))
        self.selectionModel().select(drop, QItemSelectionModel.Deselect)

    def _activate(self, index: QModelIndex) -> None:
        layer = self.grid_model().layer_of_row(index.row()) if index.isValid() else None
        if layer is not None:
            self.layer_activated.emit(layer)

    def currentChanged(self, current: QModelIndex, previous: QModelIndex) -> None:
        super().currentChanged(current, previous)
        self._activate(current)

    def selected_refs(self) -> list:
        return self.grid_model().refs_for(self.selectionModel().selectedIndexes())

    def select_column(self, column: int) -> None:
        model = self.grid_model()
        rows = model.layer_rows()
        if rows:
            selection = QItemSelection(model.index(rows.start, column), model.index(rows.stop - 1, column))
            self.selectionModel().select(selection, QItemSelectionModel.ClearAndSelect)

    def event(self, event: QEvent) -> bool:
        return self._move_key_event(event) or super().event(event)

    def startDrag(self, supported_actions: Qt.DropAction) -> None:
        indexes = [i for i in self.selectionModel().selectedIndexes() if self.grid_model().tensors(i)]
        if not indexes:
            return
        model = self.grid_model()
        n_bytes = sum(t.n_bytes for i in indexes for t in model.tensors(i))
        n_tensors = len(model.refs_for(indexes))
        drag = QDrag(self)
        drag.setMimeData(model.mimeData(indexes))
        badge = drag_badge(f"{n_tensors} tensor{'s' if n_tensors != 1 else ''} · {short_bytes(n_bytes)}",
                           theme.color("highlight"), self.font())
        drag.setPixmap(badge)
        drag.setHotSpot(QPoint(badge.width() // 2, badge.height() + 6))
        drag.exec(Qt.MoveAction)


class ExpertStripView(_MoveKeys, QWidget):
    """One layer's experts as tiles, one line per routed-expert tensor, wrapped in chunks of experts.

    Click selects a tile, Ctrl+click toggles one, dragging on empty space or an unselected tile
    draws a rubber band (Ctrl adds to the selection), dragging a selected tile drags the
    selection, clicking a tensor's name selects all its experts.
    """

    move_key = Signal(int)
    selection_changed = Signal()
    content_height_changed = Signal(int)

    def __init__(self, model: ExpertStripModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("expertStrip")
        self.model = model
        self.selection: set[tuple[int, int]] = set()
        self._band = QRubberBand(QRubberBand.Rectangle, self)
        self._press: QPoint | None = None
        self._press_on_selected = False
        self._band_base: set[tuple[int, int]] = set()
        self.setFocusPolicy(Qt.StrongFocus)
        self.setContextMenuPolicy(Qt.CustomContextMenu)
        self.setMouseTracking(True)
        model.modelReset.connect(self._on_reset)
        model.dataChanged.connect(self._on_data_changed)
        self._on_reset()

    # --- geometry ------------------------------------------------------------------------------

    def line_layout(self, width: int | None = None) -> tuple[int, int]:
        """(experts per line, px per expert): the most experts per line, a power of two, that keeps
        each tile at least MIN_COLUMN_STEP px wide."""
        room = max((self.width() if width is None else width) - LABEL_WIDTH, 0)
        most = max(self.model.columnCount(), 8)
        per_line = 8
        while per_line < most and room // (per_line * 2) >= MIN_COLUMN_STEP:
            per_line *= 2
        return per_line, max(min(room // per_line, MAX_COLUMN_STEP), MIN_COLUMN_STEP)

    def per_line(self, width: int | None = None) -> int:
        return self.line_layout(width)[0]

    def _chunk_height(self) -> int:
        return CHUNK_HEADER + self.model.rowCount() * ROW_STEP + CHUNK_GAP

    def height_for(self, width: int) -> int:
        n_expert = self.model.columnCount()
        if not n_expert:
            return 0
        n_chunks = -(-n_expert // self.per_line(width))
        return n_chunks * self._chunk_height() - CHUNK_GAP

    def tile_rect(self, row: int, expert: int) -> QRect:
        per_line, step = self.line_layout()
        chunk, column = divmod(expert, per_line)
        x = LABEL_WIDTH + column * step
        y = chunk * self._chunk_height() + CHUNK_HEADER + row * ROW_STEP
        return QRect(x, y, step - TILE_GAP, TILE)

    def tile_at(self, pos: QPoint) -> tuple[int, int] | None:
        per_line, step = self.line_layout()
        chunk, y = divmod(pos.y(), self._chunk_height())
        row, y_in = divmod(y - CHUNK_HEADER, ROW_STEP)
        column, x_in = divmod(pos.x() - LABEL_WIDTH, step)
        expert = chunk * per_line + column
        if (y < CHUNK_HEADER or not 0 <= row < self.model.rowCount() or not 0 <= column < per_line
                or expert >= self.model.columnCount() or x_in >= step - TILE_GAP or y_in >= TILE):
            return None
        return int(row), int(expert)

    def label_row_at(self, pos: QPoint) -> int | None:
        if pos.x() >= LABEL_WIDTH:
            return None
        _, y = divmod(pos.y(), self._chunk_height())
        row = (y - CHUNK_HEADER) // ROW_STEP
        return int(row) if y >= CHUNK_HEADER and 0 <= row < self.model.rowCount() else None

    def tiles_in(self, rect: QRect) -> set[tuple[int, int]]:
        return {(row, e) for row in range(self.model.rowCount()) for e in range(self.model.columnCount())
                if rect.intersects(self.tile_rect(row, e))}

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit_height()

    def _fit_height(self) -> None:
        height = self.height_for(self.width())
        if height != self.minimumHeight():
            self.setMinimumHeight(height)
            self.content_height_changed.emit(height)

    def sizeHint(self) -> QSize:
        width = LABEL_WIDTH + 64 * MAX_COLUMN_STEP
        return QSize(width, self.height_for(width))

    # --- model ---------------------------------------------------------------------------------

    def _on_reset(self) -> None:
        self.selection = set()
        self._fit_height()
        self.update()
        self.selection_changed.emit()

    def _on_data_changed(self, top_left: QModelIndex, bottom_right: QModelIndex, roles=()) -> None:
        """Repaint the tiles of the changed rows and experts only."""
        per_line = self.per_line()
        first_chunk, last_chunk = top_left.column() // per_line, bottom_right.column() // per_line
        columns = (range(top_left.column() % per_line, bottom_right.column() % per_line + 1)
                   if first_chunk == last_chunk else range(per_line))
        for chunk in range(first_chunk, last_chunk + 1):
            first = self.tile_rect(top_left.row(), chunk * per_line + columns.start)
            last = self.tile_rect(bottom_right.row(), chunk * per_line + columns.stop - 1)
            self.update(first.united(last).adjusted(-2, -2, 2, 2))

    def selected_refs(self) -> list:
        return self.model.refs_for(self.selection)

    def set_selection(self, cells: set[tuple[int, int]]) -> None:
        self.selection = set(cells)
        self.update()
        self.selection_changed.emit()

    # --- painting ------------------------------------------------------------------------------

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        model = self.model
        n_rows, n_expert = model.rowCount(), model.columnCount()
        if not n_rows:
            painter.end()
            return
        per_line, step = self.line_layout()
        chunk_height = self._chunk_height()
        small = QFont(self.font())
        small.setPointSizeF(max(self.font().pointSizeF() - 1.5, 7))
        heat_on = model.heat is not None
        area, region = event.rect(), event.region()
        first_column = max((area.left() - LABEL_WIDTH) // step, 0)
        last_column = min((area.right() - LABEL_WIDTH) // step, per_line - 1)
        for chunk in range(-(-n_expert // per_line)):
            top = chunk * chunk_height
            if top > area.bottom() or top + chunk_height < area.top():
                continue
            painter.setFont(small)
            painter.setPen(MUTED)
            for column in range(0, per_line, 8):
                expert = chunk * per_line + column
                if expert < n_expert:
                    painter.drawText(QRect(LABEL_WIDTH + column * step, top, 8 * step, CHUNK_HEADER - 2),
                                     Qt.AlignLeft | Qt.AlignBottom, str(expert))
            for row in range(n_rows):
                y = top + CHUNK_HEADER + row * ROW_STEP
                if not region.intersects(QRect(0, y, self.width(), ROW_STEP)):
                    continue        # a move repaints the lines of the tensors it moved, not the strip
                if area.left() < LABEL_WIDTH:
                    painter.drawText(QRect(0, y - 1, LABEL_WIDTH - 10, ROW_STEP), Qt.AlignRight | Qt.AlignVCenter,
                                     model.tensor(row).group)
                devices = model.row_devices(row)
                for column in range(first_column, last_column + 1):
                    expert = chunk * per_line + column
                    if expert >= len(devices):
                        break
                    amount = 0.82 if not heat_on else 0.25 + 0.75 * (model.heat_of(expert) or 0.0)
                    painter.fillRect(LABEL_WIDTH + column * step, y, step - TILE_GAP, TILE,
                                     blend(device_color(devices[expert]), amount))
        self._paint_selection(painter)
        painter.end()

    def _paint_selection(self, painter: QPainter) -> None:
        if not self.selection:
            return
        painter.setPen(SELECTED)
        painter.setBrush(Qt.NoBrush)
        for row, expert in self.selection:
            painter.drawRect(self.tile_rect(row, expert).adjusted(-1, -1, 0, 0))

    # --- mouse and keys ------------------------------------------------------------------------

    def mousePressEvent(self, event: QMouseEvent) -> None:
        self.setFocus(Qt.MouseFocusReason)
        if event.button() != Qt.LeftButton:
            return super().mousePressEvent(event)
        pos = event.position().toPoint()
        ctrl = bool(event.modifiers() & Qt.ControlModifier)
        tile = self.tile_at(pos)
        label_row = self.label_row_at(pos)
        self._press = pos
        self._press_on_selected = tile in self.selection and not ctrl
        if label_row is not None:
            row_tiles = {(label_row, e) for e in range(self.model.tensor(label_row).n_experts)}
            self.set_selection(self.selection | row_tiles if ctrl else row_tiles)
            self._press = None
            return
        if self._press_on_selected:
            return
        self._band_base = set(self.selection) if ctrl else set()
        if tile is not None and ctrl:
            self._band_base ^= {tile}
        self.set_selection(self._band_base | ({tile} if tile is not None and not ctrl else set()))
        self._band.setGeometry(QRect(pos, QSize()))
        self._band.show()

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._press is None or not event.buttons() & Qt.LeftButton:
            return
        pos = event.position().toPoint()
        if self._press_on_selected:
            if (pos - self._press).manhattanLength() >= QApplication.startDragDistance():
                self._press = None
                self.start_drag()
            return
        band = QRect(self._press, pos).normalized()
        self._band.setGeometry(band)
        self.set_selection(self._band_base | self.tiles_in(band))

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._press is not None and self._press_on_selected:
            tile = self.tile_at(event.position().toPoint())
            self.set_selection({tile} if tile is not None else set())
        self._press = None
        self._band.hide()

    def start_drag(self) -> None:
        refs = self.selected_refs()
        if not refs:
            return
        n_bytes = sum(self.model.tensor(row).expert_bytes for row, _ in self.selection)
        drag = QDrag(self)
        drag.setMimeData(self.model.mimeData([self.model.index(r, e) for r, e in self.selection]))
        badge = drag_badge(f"{len(self.selection)} expert tile{'s' if len(self.selection) != 1 else ''} · "
                           f"{short_bytes(n_bytes)}", theme.color("highlight"), self.font())
        drag.setPixmap(badge)
        drag.setHotSpot(QPoint(badge.width() // 2, badge.height() + 6))
        drag.exec(Qt.MoveAction)

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.ToolTip:
            return self._show_tile_tooltip(event)
        return self._move_key_event(event) or super().event(event)

    def tooltip_at(self, pos: QPoint) -> str:
        """What the model says about the tile under `pos` ("" off the tiles)."""
        tile = self.tile_at(pos)
        return self.model.data(self.model.index(*tile), Qt.ToolTipRole) or "" if tile is not None else ""

    def _show_tile_tooltip(self, event) -> bool:
        text = self.tooltip_at(event.pos())
        if text:
            QToolTip.showText(event.globalPos(), text, self, self.tile_rect(*self.tile_at(event.pos())))
        else:
            QToolTip.hideText()
            event.ignore()
        return True

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.matches(QKeySequence.SelectAll):
            self.set_selection({(r, e) for r in range(self.model.rowCount())
                                for e in range(self.model.tensor(r).n_experts)})
            return
        if event.key() == Qt.Key_Escape:
            self.set_selection(set())
            return
        super().keyPressEvent(event)
