"""A small line plot of perplexity per chunk, painted with QPainter (no plotting library).

Two series over chunks 1..n: the running estimate (the `[i]` values llama-perplexity prints; a
solid line with dots) and, faintly, each chunk's own perplexity. The y axis gets "nice" ticks
(1, 2 or 5 times a power of ten) and zooms to the data, since a perplexity curve settles in a
narrow band that an axis starting at zero would flatten.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QFontMetrics, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from app import theme

RUNNING_COLOUR = theme.color("accent")
CHUNK_COLOUR = theme.color("muted", 0.59)
GRID_COLOUR = theme.color("border")
AXIS_TEXT_COLOUR = theme.color("muted")
BACKGROUND = theme.color("base")
BORDER = theme.color("border")
MAX_DOTS = 60           # beyond this many chunks, the dots would merge into the line
TARGET_Y_TICKS = 5
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 18, 40, 30


def nice_step(span: float, target_ticks: int = TARGET_Y_TICKS) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving about `target_ticks` ticks over `span`."""
    if not span > 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(1, target_ticks)
    power = 10.0 ** math.floor(math.log10(raw))
    for multiple in (1.0, 2.0, 5.0, 10.0):
        if raw <= multiple * power:
            return multiple * power
    return 10.0 * power


def y_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(low, high, step) of a y axis that holds `values` with a little room, on tick boundaries."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0, 0.25
    low, high = min(finite), max(finite)
    if high - low < 1e-9:
        pad = max(abs(high) * 0.05, 0.5)
        low, high = low - pad, high + pad
    step = nice_step(high - low)
    return math.floor(low / step) * step, math.ceil(high / step) * step, step


def x_ticks(n_points: int, max_ticks: int = 8) -> list[int]:
    """1-based chunk numbers to label: 1, the last one, and round numbers between."""
    if n_points <= 0:
        return []
    if n_points <= max_ticks:
        return list(range(1, n_points + 1))
    step = int(nice_step(n_points - 1, max_ticks - 1))
    ticks = [1] + list(range(step, n_points, step))
    if n_points - ticks[-1] < step / 2:
        ticks.pop()
    return ticks + [n_points]


def format_tick(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


class PerplexityPlot(QWidget):
    """Running perplexity per chunk; `append` as chunks finish, `clear` for a new run."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("perplexityPlot")
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.setMinimumHeight(160)
        self._running: list[float] = []
        self._chunks: list[float] = []
        self._n_expected = 0
        self.title = "Running perplexity per chunk"
        self.empty_text = "Run perplexity to see the estimate settle chunk by chunk."

    # --- data ---

    def clear(self, n_expected: int = 0) -> None:
        """Forget the curve; `n_expected` chunks sets the x axis before any arrive."""
        self._running, self._chunks, self._n_expected = [], [], max(0, n_expected)
        self.update()

    def append(self, running_ppl: float, chunk_ppl: float | None = None) -> None:
        self._running.append(float(running_ppl))
        if chunk_ppl is not None:
            self._chunks.append(float(chunk_ppl))
        self.update()

    def set_values(self, running_ppl: Sequence[float], chunk_ppl: Sequence[float] = ()) -> None:
        self._running = [float(v) for v in running_ppl]
        self._chunks = [float(v) for v in chunk_ppl]
        self.update()

    def running_values(self) -> list[float]:
        return list(self._running)

    def chunk_values(self) -> list[float]:
        return list(self._chunks)

    def sizeHint(self) -> QSize:
        return QSize(520, 240)

    # --- painting ---

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        frame = QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5)
        painter.setPen(QPen(BORDER, 1))
        painter.setBrush(BACKGROUND)
        painter.drawRoundedRect(frame, 6, 6)
        self._draw_title(painter)
        plot = QRectF(self.rect()).adjusted(MARGIN_LEFT, MARGIN_TOP, -MARGIN_RIGHT, -MARGIN_BOTTOM)
        if plot.width() < 20 or plot.height() < 20:
            return
        if not self._running:
            painter.setPen(AXIS_TEXT_COLOUR)
            painter.drawText(plot, Qt.AlignCenter | Qt.TextWordWrap, self.empty_text)
            return
        n_points = max(len(self._running), len(self._chunks), self._n_expected)
        low, high, step = y_range(self._running + self._chunks)
        self._draw_axes(painter, plot, n_points, low, high, step)
        to_point = self._mapper(plot, n_points, low, high)
        painter.setClipRect(plot.adjusted(-4, -4, 4, 4))
        self._draw_series(painter, self._chunks, to_point, CHUNK_COLOUR, 1.2, dots=False)
        self._draw_series(painter, self._running, to_point, RUNNING_COLOUR, 2.0, dots=n_points <= MAX_DOTS)
        painter.setClipping(False)
        self._draw_last_value(painter, plot, to_point)

    def _draw_title(self, painter: QPainter) -> None:
        font = QFont(self.font())
        font.setBold(True)
        painter.setFont(font)
        painter.setPen(theme.color("text_secondary"))
        painter.drawText(QRectF(12, 6, self.width() - 24, MARGIN_TOP - 8), Qt.AlignLeft | Qt.AlignVCenter, self.title)
        if self._chunks:
            legend = QRectF(12, 6, self.width() - 24, MARGIN_TOP - 8)
            painter.setFont(self.font())
            metrics = QFontMetrics(self.font())
            x = legend.right()
            for text, colour in (("each chunk", CHUNK_COLOUR), ("running", RUNNING_COLOUR)):
                x -= metrics.horizontalAdvance(text)
                painter.setPen(AXIS_TEXT_COLOUR)
                painter.drawText(QPointF(x, legend.center().y() + metrics.ascent() / 2 - 1), text)
                x -= 20
                painter.setPen(QPen(colour, 2))
                painter.drawLine(QPointF(x, legend.center().y()), QPointF(x + 14, legend.center().y()))
                x -= 14
        painter.setFont(self.font())

    def _mapper(self, plot: QRectF, n_points: int, low: float, high: float):
        def to_point(i: int, value: float) -> QPointF:
            fx = 0.5 if n_points <= 1 else i / (n_points - 1)
            fy = (value - low) / (high - low) if high > low else 0.5
            return QPointF(plot.left() + fx * plot.width(), plot.bottom() - fy * plot.height())
        return to_point

    def _draw_axes(self, painter: QPainter, plot: QRectF, n_points: int, low: float, high: float, step: float) -> None:
        metrics = QFontMetrics(self.font())
        value = low
        while value <= high + step / 2:
            y = plot.bottom() - (value - low) / (high - low) * plot.height()
            painter.setPen(QPen(GRID_COLOUR, 1))
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
            painter.setPen(AXIS_TEXT_COLOUR)
            label = format_tick(value, step)
            painter.drawText(QRectF(4, y - 10, MARGIN_LEFT - 10, 20), Qt.AlignRight | Qt.AlignVCenter, label)
            value += step
        for chunk in x_ticks(n_points):
            fx = 0.5 if n_points <= 1 else (chunk - 1) / (n_points - 1)
            x = plot.left() + fx * plot.width()
            painter.setPen(QPen(GRID_COLOUR, 1))
            painter.drawLine(QPointF(x, plot.bottom()), QPointF(x, plot.bottom() + 4))
            painter.setPen(AXIS_TEXT_COLOUR)
            width = metrics.horizontalAdvance(str(chunk)) + 8
            painter.drawText(QRectF(x - width / 2, plot.bottom() + 6, width, metrics.height()), Qt.AlignCenter, str(chunk))
        painter.drawText(QRectF(plot.left(), plot.bottom() + 6, plot.width(), metrics.height()),
                         Qt.AlignRight | Qt.AlignVCenter, "" if n_points > 1 else "chunk")

    @staticmethod
    def _draw_series(painter: QPainter, values: Sequence[float], to_point, colour: QColor, width: float,
                     dots: bool) -> None:
        points = [to_point(i, v) for i, v in enumerate(values) if math.isfinite(v)]
        if not points:
            return
        path = QPainterPath(points[0])
        for point in points[1:]:
            path.lineTo(point)
        painter.setPen(QPen(colour, width, Qt.SolidLine, Qt.RoundCap, Qt.RoundJoin))
        painter.setBrush(Qt.NoBrush)
        painter.drawPath(path)
        if dots or len(points) == 1:
            painter.setBrush(colour)
            painter.setPen(QPen(BACKGROUND, 1.5))
            for point in points:
                painter.drawEllipse(point, 3.5, 3.5)

    def _draw_last_value(self, painter: QPainter, plot: QRectF, to_point) -> None:
        last = self._running[-1]
        if not math.isfinite(last):
            return
        point = to_point(len(self._running) - 1, last)
        text = f"{last:.4f}"
        metrics = QFontMetrics(self.font())
        box = QRectF(0, 0, metrics.horizontalAdvance(text) + 12, metrics.height() + 4)
        box.moveBottomRight(QPointF(min(point.x() + box.width() / 2, plot.right()), point.y() - 8))
        if box.top() < plot.top() - MARGIN_TOP / 2:
            box.moveTop(point.y() + 8)
        box.moveLeft(max(box.left(), plot.left()))
        painter.setPen(Qt.NoPen)
        painter.setBrush(theme.color("highlight", 0.86))
        painter.drawRoundedRect(box, 4, 4)
        painter.setPen(theme.color("on_accent"))
        painter.drawText(box, Qt.AlignCenter, text)
