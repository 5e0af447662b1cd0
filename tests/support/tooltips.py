"""What Qt displays for the app's tooltips, which are rich text (file-chosen strings escaped)."""
from PySide6.QtGui import QTextDocument


def shown(tooltip: str) -> str:
    document = QTextDocument()
    document.setHtml(tooltip)
    return document.toPlainText()
