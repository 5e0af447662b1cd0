"""Widgets of the main window. Each binds Qt models and forwards what the user asks for.

Shared here: the message bar that shows errors inside the window instead of in a modal box.
"""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QMessageBox, QToolButton, QWidget

from engine.gguf.quoting import printable

MAX_MESSAGE_CHARS = 2000


class MessageBar(QFrame):
    """A dismissible strip at the top of the window for errors and notices; never modal."""

    ERROR, WARNING, INFO = "error", "warning", "info"
    dismissed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("messageBar")
        self.level = self.INFO
        self.icon = QLabel(objectName="messageIcon")
        # plain text: messages quote model files, whose names must not become markup
        self.label = QLabel(objectName="messageText", wordWrap=True, textFormat=Qt.PlainText,
                            textInteractionFlags=Qt.TextSelectableByMouse)
        close = QToolButton(objectName="messageClose", text="✕", autoRaise=True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.dismiss)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(12, 6, 6, 6)
        layout.addWidget(self.icon)
        layout.addWidget(self.label, 1)
        layout.addWidget(close, 0, Qt.AlignTop)
        self.hide()

    def show_message(self, text: str, level: str = ERROR) -> None:
        self.level = level
        self.setProperty("level", level)
        self.icon.setText("i" if level == self.INFO else "!")
        self.label.setText(printable(text, MAX_MESSAGE_CHARS))     # a 2 MB message would stall the layout
        for widget in (self, self.icon):    # re-read the style sheet: it styles by the `level` property
            widget.style().unpolish(widget)
            widget.style().polish(widget)
        self.show()

    @property
    def text(self) -> str:
        return self.label.text()

    def dismiss(self) -> None:
        self.hide()
        self.dismissed.emit()


def confirm_over_capacity(parent: QWidget, refusal: str) -> bool:
    """Ask whether to run a plan the verdict refuses; Cancel is the default."""
    box = QMessageBox(QMessageBox.Warning, "The plan does not fit", refusal, QMessageBox.Cancel, parent)
    run = box.addButton("Run anyway", QMessageBox.DestructiveRole)
    box.setDefaultButton(QMessageBox.Cancel)
    box.exec()
    return box.clickedButton() is run
