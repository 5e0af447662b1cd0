"""The chat panel's pieces: the message view (bubbles painted by a delegate), the input box, the
sampling controls and the line of speed and context statistics.

The view is a QTreeView used as a flat list, not a QListView: a QTreeView keeps one cached
height per row and, on a `dataChanged` of one row, re-measures that row alone. A QListView in
list mode ignores `dataChanged` for sizes, so a growing message would need a full relayout of
every row on each streamed token. Text layouts are cached by (text, width), so scrolling a
long conversation lays each message out once.
"""
from __future__ import annotations

from collections import OrderedDict

from PySide6.QtCore import QEvent, QModelIndex, QPoint, QPointF, QRect, QRectF, QSize, Qt, Signal
from PySide6.QtGui import (QAbstractTextDocumentLayout, QColor, QFont, QFontMetrics, QKeyEvent, QMouseEvent,
                           QPainter, QPaintEvent, QPalette, QPen, QResizeEvent, QTextDocument, QTextOption)
from PySide6.QtWidgets import (QAbstractItemView, QDoubleSpinBox, QFormLayout, QFrame, QHBoxLayout, QLabel,
                               QPlainTextEdit, QProgressBar, QSizePolicy, QSpinBox, QStyle, QStyledItemDelegate,
                               QStyleOptionViewItem, QToolButton, QTreeView, QWidget)

from app import theme
from app.models.chat import ErrorRole, SpeakerRole, StatsRole, StreamingRole
from engine.run.sampling import SamplerSettings

# The panel's own look, on top of resources/style.qss; colours are app/theme.py's.
CHAT_STYLE = theme.style_sheet("""
QPushButton:disabled { color: @disabled; background: @control_disabled; border-color: @border; }
QWidget#chatSidebar, QWidget#chatSettings { background: @sidebar; }
QListView#conversationList { background: transparent; border: none; outline: 0; }
QListView#conversationList::item { padding: 7px 8px; border-radius: 6px; color: @text_secondary; }
QListView#conversationList::item:hover { background: @hover; }
QListView#conversationList::item:selected { background: @selection; color: @on_accent; }
QTreeView#messageView { background: @view; border: none; }
QTreeView#messageView::item, QTreeView#messageView::item:selected, QTreeView#messageView::item:hover {
    background: transparent; border: none; }
QLabel#chatTitle { font-size: 13pt; font-weight: 600; color: @text_strong; }
QPlainTextEdit#chatInput, QPlainTextEdit#systemPrompt {
    background: @sunken; border: 1px solid @control_hover; border-radius: 8px; padding: 4px 6px;
    selection-background-color: @highlight; }
QPlainTextEdit#chatInput:focus, QPlainTextEdit#systemPrompt:focus { border-color: @accent; }
QPushButton#newChatButton { text-align: left; padding: 7px 12px; font-weight: 600; }
QPushButton#stopButton { background: @error_dark; border-color: @error_dark_border; color: @error_on_dark; }
QPushButton#stopButton:hover { background: @error_dark_hover; }
QToolButton#linkButton { color: @link; border: none; padding: 2px 4px; background: transparent; }
QToolButton#linkButton:hover { color: @link_hover; }
QToolButton#linkButton:disabled { color: @disabled; }
QWidget#chatStats { border-top: 1px solid @border; background: @view; }
QLabel#statLabel { color: @muted; }
QProgressBar#contextBar { background: @control; border: none; border-radius: 3px; }
QProgressBar#contextBar::chunk { background: @accent; border-radius: 3px; }
QProgressBar#contextBar[level="high"]::chunk { background: @warning_fill; }
""")

DEFAULT_MAX_TOKENS = 512
SEED_RANDOM = -1
USER_BUBBLE = theme.color("user_bubble")
USER_TEXT = theme.color("user_text")
ASSISTANT_BUBBLE = theme.color("assistant_bubble")
ASSISTANT_TEXT = theme.color("text")
SYSTEM_BUBBLE = theme.color("system_bubble")
MUTED = theme.color("muted")
ERROR = theme.color("error")
SELECTED_OUTLINE = theme.color("accent")
VIEW_BACKGROUND = theme.color("view")

BUBBLE_MAX_FRACTION = 0.78     # of the view's width
BUBBLE_MAX_PX = 820
PAD_X, PAD_Y = 14, 10          # inside a bubble
ROW_MARGIN_X, ROW_GAP = 18, 8  # around a row
LABEL_GAP = 4
FOOTER_GAP = 4
RADIUS = 12
CACHE_DOCS = 256               # laid-out documents kept for painting
CACHE_HEIGHTS = 4096           # measured text heights
SPEAKER_LABEL = {"user": "You", "assistant": "Assistant", "system": "System"}
STREAMING_CURSOR = " ▍"
ALTERNATIVE_PREVIOUS, ALTERNATIVE_NEXT = "‹", "›"     # the arrows of a reply's "‹ 1/2 ›" (app.models.chat)
ARROW_SLACK_PX = 4
EMPTY_STREAMING_TEXT = "…"


class _TextLayouts:
    """QTextDocuments for message texts, laid out at a width, with LRU caches."""

    def __init__(self):
        self._docs: OrderedDict[tuple[str, int, int], QTextDocument] = OrderedDict()
        self._heights: OrderedDict[tuple[str, int, int], float] = OrderedDict()
        self.font = QFont()

    def clear(self) -> None:
        self._docs.clear()
        self._heights.clear()

    def set_font(self, font: QFont) -> None:
        if font != self.font:
            self.font = QFont(font)
            self.clear()

    def document(self, text: str, width: int) -> QTextDocument:
        key = (text, width, 0)
        doc = self._docs.get(key)
        if doc is not None:
            self._docs.move_to_end(key)
            return doc
        doc = QTextDocument()
        doc.setDocumentMargin(0)
        doc.setDefaultFont(self.font)
        option = QTextOption()
        option.setWrapMode(QTextOption.WrapAtWordBoundaryOrAnywhere)
        doc.setDefaultTextOption(option)
        doc.setPlainText(text)
        doc.setTextWidth(width)
        self._docs[key] = doc
        if len(self._docs) > CACHE_DOCS:
            self._docs.popitem(last=False)
        return doc

    def height(self, text: str, width: int) -> float:
        key = (text, width, 0)
        height = self._heights.get(key)
        if height is None:
            height = self.document(text, width).size().height()
            self._heights[key] = height
            if len(self._heights) > CACHE_HEIGHTS:
                self._heights.popitem(last=False)
        return height

    def ideal_width(self, text: str, width: int) -> float:
        return self.document(text, width).idealWidth()


class MessageDelegate(QStyledItemDelegate):
    """Paints one message as a bubble: the user's on the right, the model's on the left with a
    line of statistics under it, an error line in red when a turn ended badly."""

    def __init__(self, view: QAbstractItemView):
        super().__init__(view)
        self.view = view
        self.layouts = _TextLayouts()
        self.layouts.set_font(view.font())
        self.small_font = QFont(view.font())
        self.small_font.setPointSizeF(max(7.5, view.font().pointSizeF() - 1.5))

    # --- geometry ---

    def _bubble_text_width(self) -> int:
        width = self.view.viewport().width() - 2 * ROW_MARGIN_X
        return max(80, int(min(width * BUBBLE_MAX_FRACTION, BUBBLE_MAX_PX)) - 2 * PAD_X)

    @staticmethod
    def _shown_text(index: QModelIndex) -> str:
        text = index.data(Qt.DisplayRole) or ""
        if index.data(StreamingRole):
            return (text + STREAMING_CURSOR) if text else EMPTY_STREAMING_TEXT
        return text

    def _footer_lines(self, index: QModelIndex) -> list[tuple[str, QColor]]:
        lines = []
        stats = index.data(StatsRole) or ""
        if stats and not index.data(StreamingRole):
            lines.append((stats, MUTED))
        error = index.data(ErrorRole) or ""
        if error:
            lines.append((error, ERROR))
        return lines

    def _footer_height(self, lines: list[tuple[str, QColor]], width: int) -> int:
        metrics = QFontMetrics(self.small_font)
        return sum(metrics.boundingRect(QRect(0, 0, width, 10_000), Qt.TextWordWrap, text).height() + FOOTER_GAP
                   for text, _ in lines)

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex) -> QSize:
        text_width = self._bubble_text_width()
        text_height = self.layouts.height(self._shown_text(index), text_width)
        label_height = QFontMetrics(self.small_font).height() + LABEL_GAP
        footer = self._footer_height(self._footer_lines(index), text_width + 2 * PAD_X)
        height = ROW_GAP + label_height + int(text_height) + 2 * PAD_Y + footer + ROW_GAP
        return QSize(self.view.viewport().width(), height)

    # --- painting ---

    def _bubble(self, row: QRect, index: QModelIndex) -> tuple[QRectF, QTextDocument]:
        """The bubble's rectangle in a row of the view, and its laid-out text."""
        text_width = self._bubble_text_width()
        doc = self.layouts.document(self._shown_text(index), text_width)
        bubble_width = min(text_width, int(doc.idealWidth()) + 1) + 2 * PAD_X
        label_height = QFontMetrics(self.small_font).height() + LABEL_GAP
        bubble_height = int(doc.size().height()) + 2 * PAD_Y
        is_user = index.data(SpeakerRole) == "user"
        left = (row.right() - ROW_MARGIN_X - bubble_width) if is_user else (row.left() + ROW_MARGIN_X)
        return QRectF(left, row.top() + ROW_GAP + label_height, bubble_width, bubble_height), doc

    def alternative_arrows(self, row: QRect, index: QModelIndex) -> tuple[QRectF, QRectF] | None:
        """Where the "‹" and "›" of a reply's "‹ 1/2 ›" are painted in its row (None: no
        alternatives), a few pixels larger than the glyphs so that they are easy to hit."""
        stats = index.data(StatsRole) or ""
        if not stats.startswith(ALTERNATIVE_PREVIOUS) or index.data(StreamingRole) or \
                index.data(SpeakerRole) != "assistant":
            return None
        metrics = QFontMetrics(self.small_font)
        bubble, _doc = self._bubble(row, index)
        left, top = bubble.left() + 4, bubble.bottom() + FOOTER_GAP      # the footer's first line (_paint_footer)
        next_at = stats.find(ALTERNATIVE_NEXT)
        if next_at < 0:
            return None

        def glyph(start_px: float, glyph_text: str) -> QRectF:
            return QRectF(start_px, top, metrics.horizontalAdvance(glyph_text), metrics.height()).adjusted(
                -ARROW_SLACK_PX, -ARROW_SLACK_PX / 2, ARROW_SLACK_PX, ARROW_SLACK_PX / 2)
        return (glyph(left, ALTERNATIVE_PREVIOUS),
                glyph(left + metrics.horizontalAdvance(stats[:next_at]), ALTERNATIVE_NEXT))

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: QModelIndex) -> None:
        speaker = index.data(SpeakerRole) or "assistant"
        small = QFontMetrics(self.small_font)
        row = option.rect
        is_user = speaker == "user"
        bubble, doc = self._bubble(row, index)
        bubble_width = int(bubble.width())

        painter.save()
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setFont(self.small_font)
        painter.setPen(MUTED)
        label_rect = QRectF(bubble.left(), row.top() + ROW_GAP, max(bubble_width, 200), small.height())
        if is_user:
            label_rect.moveRight(bubble.right())
        painter.drawText(label_rect, (Qt.AlignRight if is_user else Qt.AlignLeft) | Qt.AlignVCenter,
                         SPEAKER_LABEL.get(speaker, speaker))

        selected = bool(option.state & QStyle.State_Selected)
        painter.setPen(QPen(SELECTED_OUTLINE, 1.5) if selected else Qt.NoPen)
        painter.setBrush(USER_BUBBLE if is_user else SYSTEM_BUBBLE if speaker == "system" else ASSISTANT_BUBBLE)
        painter.drawRoundedRect(bubble.adjusted(0.5, 0.5, -0.5, -0.5), RADIUS, RADIUS)

        painter.translate(bubble.left() + PAD_X, bubble.top() + PAD_Y)
        context = QAbstractTextDocumentLayout.PaintContext()
        context.palette.setColor(QPalette.Text, USER_TEXT if is_user else ASSISTANT_TEXT)
        if index.data(StreamingRole) and not index.data(Qt.DisplayRole):
            context.palette.setColor(QPalette.Text, MUTED)
        doc.documentLayout().draw(painter, context)
        painter.restore()
        self._paint_footer(painter, index, bubble, is_user)

    def _paint_footer(self, painter: QPainter, index: QModelIndex, bubble: QRectF, is_user: bool) -> None:
        lines = self._footer_lines(index)
        if not lines:
            return
        painter.save()
        painter.setFont(self.small_font)
        metrics = QFontMetrics(self.small_font)
        width = self._bubble_text_width() + 2 * PAD_X
        y = bubble.bottom() + FOOTER_GAP
        for text, colour in lines:
            height = metrics.boundingRect(QRect(0, 0, width, 10_000), Qt.TextWordWrap, text).height()
            rect = QRectF(bubble.left() + 4, y, width - 8, height)
            if is_user:
                rect.moveRight(bubble.right() - 4)
            painter.setPen(colour)
            painter.drawText(rect, Qt.TextWordWrap | (Qt.AlignRight if is_user else Qt.AlignLeft), text)
            y += height + FOOTER_GAP
        painter.restore()


class MessageView(QTreeView):
    """The conversation: a flat list of bubbles, scrolled per pixel, following the end while streaming.

    A click on the "‹" or "›" under a reply asks for its previous or next alternative
    (`alternative_requested(row, step)`), as Alt+Left / Alt+Right do."""

    alternative_requested = Signal(int, int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("messageView")
        self.setHeaderHidden(True)
        self.setRootIsDecorated(False)
        self.setIndentation(0)
        self.setItemsExpandable(False)
        self.setUniformRowHeights(False)
        self.setVerticalScrollMode(QAbstractItemView.ScrollPerPixel)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setSelectionMode(QAbstractItemView.SingleSelection)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.setFrameShape(QFrame.NoFrame)
        self.setMouseTracking(False)
        self.setAllColumnsShowFocus(False)
        self.verticalScrollBar().setSingleStep(24)
        self.empty_text = ""
        self.delegate = MessageDelegate(self)
        self.setItemDelegate(self.delegate)
        self._last_width = -1

    def alternative_step_at(self, pos: QPoint) -> tuple[int, int] | None:
        """(row, -1 or +1) when `pos` (viewport coordinates) is on a reply's "‹" or "›"."""
        index = self.indexAt(pos)
        if not index.isValid():
            return None
        arrows = self.delegate.alternative_arrows(self.visualRect(index), index)
        if arrows is None:
            return None
        for rect, step in zip(arrows, (-1, 1)):
            if rect.contains(QPointF(pos)):
                return index.row(), step
        return None

    def mousePressEvent(self, event: QMouseEvent) -> None:
        hit = self.alternative_step_at(event.position().toPoint()) if event.button() == Qt.LeftButton else None
        if hit is None:
            super().mousePressEvent(event)
            return
        event.accept()
        self.alternative_requested.emit(*hit)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        # quick clicks on an arrow step through the replies; they do not open the message for editing
        hit = self.alternative_step_at(event.position().toPoint()) if event.button() == Qt.LeftButton else None
        if hit is None:
            super().mouseDoubleClickEvent(event)
            return
        event.accept()
        self.alternative_requested.emit(*hit)

    def is_at_bottom(self, slack_px: int = 24) -> bool:
        bar = self.verticalScrollBar()
        return bar.value() >= bar.maximum() - slack_px

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        width = self.viewport().width()
        if width != self._last_width:       # wrapped heights depend on the width: measure again
            self._last_width = width
            at_bottom = self.is_at_bottom()
            self.scheduleDelayedItemsLayout()
            if at_bottom:
                self.executeDelayedItemsLayout()
                self.scrollToBottom()

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.FontChange:
            self.delegate.layouts.set_font(self.font())
            self.scheduleDelayedItemsLayout()

    def paintEvent(self, event: QPaintEvent) -> None:
        super().paintEvent(event)
        model = self.model()
        if self.empty_text and (model is None or model.rowCount() == 0):
            painter = QPainter(self.viewport())
            painter.setPen(MUTED)
            painter.drawText(self.viewport().rect().adjusted(40, 0, -40, 0), Qt.AlignCenter | Qt.TextWordWrap,
                             self.empty_text)


class ChatInput(QPlainTextEdit):
    """The message box: Enter sends, Shift+Enter starts a new line, Esc cancels an edit. Grows
    with its text up to `max_lines`."""

    submitted = Signal()
    escaped = Signal()

    def __init__(self, parent: QWidget | None = None, max_lines: int = 8):
        super().__init__(parent)
        self.setObjectName("chatInput")
        self.max_lines = max_lines
        self.setTabChangesFocus(True)
        self.setWordWrapMode(QTextOption.WrapAtWordBoundaryOrAnywhere)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.document().documentLayout().documentSizeChanged.connect(self._fit_height)
        self._fit_height()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() in (Qt.Key_Return, Qt.Key_Enter) and not (event.modifiers() & Qt.ShiftModifier):
            self.submitted.emit()
            return
        if event.key() == Qt.Key_Escape:
            self.escaped.emit()
            return
        super().keyPressEvent(event)

    def _fit_height(self, *_args) -> None:
        line = QFontMetrics(self.font()).lineSpacing()
        n_lines = int(self.document().size().height())      # a plain-text layout measures in lines
        shown = max(1, min(self.max_lines, n_lines))
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAsNeeded if n_lines > self.max_lines else Qt.ScrollBarAlwaysOff)
        margins = self.contentsMargins()
        chrome = int(2 * self.document().documentMargin()) + margins.top() + margins.bottom() + 2 * self.frameWidth()
        self.setFixedHeight(shown * line + chrome + 4)


def _spin(minimum: float, maximum: float, value: float, step: float, decimals: int, tip: str,
          special: str = "") -> QDoubleSpinBox:
    box = QDoubleSpinBox(minimum=minimum, maximum=maximum, singleStep=step, decimals=decimals)
    box.setValue(value)
    box.setToolTip(tip)
    box.setSpecialValueText(special)
    box.setKeyboardTracking(False)
    return box


def _int_spin(minimum: int, maximum: int, value: int, tip: str, special: str = "") -> QSpinBox:
    box = QSpinBox(minimum=minimum, maximum=maximum)
    box.setValue(value)
    box.setToolTip(tip)
    box.setSpecialValueText(special)
    box.setKeyboardTracking(False)
    return box


class SamplingControls(QWidget):
    """Temperature, top-k, top-p, min-p, repeat penalty, max tokens and seed, with llama.cpp's defaults."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        d = SamplerSettings()
        self.temperature = _spin(0.0, 5.0, d.temperature, 0.05, 2, "0 = greedy (always the most likely token)",
                                 "greedy")
        self.top_k = _int_spin(0, 100_000, d.top_k, "Keep the k most likely tokens (0 = off)", "off")
        self.top_p = _spin(0.0, 1.0, d.top_p, 0.01, 2, "Nucleus sampling: the fewest tokens reaching p (1 = off)")
        self.min_p = _spin(0.0, 1.0, d.min_p, 0.01, 2, "Drop tokens below p × the top probability (0 = off)", "off")
        self.repeat_penalty = _spin(0.5, 3.0, d.repeat_penalty, 0.05, 2,
                                    f"Penalize the last {d.repeat_last_n} tokens (1 = off)")
        self.max_tokens = _int_spin(1, 1_000_000, DEFAULT_MAX_TOKENS, "Stop the reply after this many tokens")
        self.seed = _int_spin(SEED_RANDOM, 2**31 - 1, SEED_RANDOM, "A fixed seed repeats a reply; -1: random",
                              "random")
        reset = QToolButton(text="Reset", objectName="linkButton", autoRaise=True)
        reset.setToolTip("llama.cpp's defaults")
        reset.clicked.connect(self.reset)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.setLabelAlignment(Qt.AlignLeft)
        form.setHorizontalSpacing(12)
        form.setVerticalSpacing(6)
        for label, box in (("Temperature", self.temperature), ("Top-k", self.top_k), ("Top-p", self.top_p),
                           ("Min-p", self.min_p), ("Repeat penalty", self.repeat_penalty),
                           ("Max tokens", self.max_tokens), ("Seed", self.seed)):
            form.addRow(label, box)
        form.addRow("", reset)

    def settings(self) -> SamplerSettings:
        seed = self.seed.value()
        return SamplerSettings(temperature=self.temperature.value(), top_k=self.top_k.value(),
                               top_p=self.top_p.value(), min_p=self.min_p.value(),
                               repeat_penalty=self.repeat_penalty.value(),
                               seed=None if seed == SEED_RANDOM else seed)

    def set_settings(self, settings: SamplerSettings, max_tokens: int | None = None) -> None:
        self.temperature.setValue(settings.temperature)
        self.top_k.setValue(settings.top_k)
        self.top_p.setValue(settings.top_p)
        self.min_p.setValue(settings.min_p)
        self.repeat_penalty.setValue(settings.repeat_penalty)
        self.seed.setValue(SEED_RANDOM if settings.seed is None else settings.seed)
        if max_tokens is not None:
            self.max_tokens.setValue(max_tokens)

    def reset(self) -> None:
        self.set_settings(SamplerSettings(), DEFAULT_MAX_TOKENS)


class ChatStats(QWidget):
    """Prompt and generation speed and context use, under the messages."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("chatStats")
        self.prompt_label = QLabel(objectName="statLabel")
        self.generation_label = QLabel(objectName="statLabel")
        self.context_label = QLabel(objectName="statLabel")
        self.context_bar = QProgressBar(textVisible=False, objectName="contextBar")
        self.context_bar.setFixedSize(110, 6)
        self.state_label = QLabel(objectName="mutedLabel")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(18, 2, 18, 2)
        layout.setSpacing(18)
        # the state line (a compile's "Preparing CPU kernels ... now <kernel>") is cut to the room
        # it has: as a minimum width it pushed the window past a 1280-pixel screen
        self.state_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        layout.addWidget(self.state_label, 1)
        layout.addWidget(self.prompt_label)
        layout.addWidget(self.generation_label)
        layout.addWidget(self.context_label)
        layout.addWidget(self.context_bar)
        self.show_stats()

    def show_stats(self, prompt_tps: float | None = None, generation_tps: float | None = None,
                   context_used: int | None = None, n_ctx: int | None = None) -> None:
        self.prompt_label.setText(f"Prompt  <b>{_tps(prompt_tps)}</b>")
        self.generation_label.setText(f"Generation  <b>{_tps(generation_tps)}</b>")
        used = "—" if context_used is None else f"{context_used:,}"
        total = "—" if not n_ctx else f"{n_ctx:,}"
        self.context_label.setText(f"Context  <b>{used}</b> / {total}")
        self.context_bar.setRange(0, max(1, n_ctx or 1))
        self.context_bar.setValue(min(context_used or 0, n_ctx or 0))
        fraction = (context_used or 0) / n_ctx if n_ctx else 0.0
        level = "high" if fraction > 0.9 else "normal"
        if self.context_bar.property("level") != level:     # re-read the style sheet, which styles by level
            self.context_bar.setProperty("level", level)
            self.context_bar.style().unpolish(self.context_bar)
            self.context_bar.style().polish(self.context_bar)
        self.context_bar.setToolTip(f"{fraction:.0%} of the context is used" if n_ctx else "No context yet")


def _tps(value: float | None) -> str:
    return "—" if not value else f"{value:,.1f} tok/s"
