"""The chat panel's Qt models: the messages of one conversation, and the list of conversations.

Streaming text is appended to one row with a `dataChanged` for that row alone: a long
conversation is never re-laid out because its last message grew.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from PySide6.QtCore import QAbstractListModel, QModelIndex, QObject, QPersistentModelIndex, Qt, Signal

from app.conversations import ConversationSummary, Message
from app.models import plain_tooltip

Index = QModelIndex | QPersistentModelIndex

SpeakerRole = Qt.UserRole + 20      # str: "user", "assistant" or "system"
StatsRole = Qt.UserRole + 21        # str: the line under an assistant message ("" for none)
StreamingRole = Qt.UserRole + 22    # bool: the message is still being generated
ErrorRole = Qt.UserRole + 23        # str: why the turn ended early ("" for none)
ConversationIdRole = Qt.UserRole + 24   # str: a conversation's id
UpdatedRole = Qt.UserRole + 25      # float: Unix time of a conversation's last change

FINISH_TEXT = {"stop": "", "length": "stopped at the token limit", "cancelled": "stopped"}


def format_stats(stats: dict) -> str:
    """`128 tokens · 41.3 tok/s · prompt 52 tokens at 812 tok/s · stopped`; "" when there is nothing to say."""
    parts = []
    n_generated = stats.get("generation_tokens")
    if n_generated:
        parts.append(f"{n_generated} token{'s' if n_generated != 1 else ''}")
        if stats.get("generation_tps"):
            parts.append(f"{stats['generation_tps']:.1f} tok/s")
    if stats.get("prompt_tokens"):
        prompt = f"prompt {stats['prompt_tokens']} tokens"
        evaluated = stats.get("prompt_evaluated")
        if evaluated is not None and evaluated < stats["prompt_tokens"]:
            prompt += f" ({evaluated} evaluated, the rest cached)"
        if stats.get("prompt_tps"):
            prompt += f" at {stats['prompt_tps']:.0f} tok/s"
        parts.append(prompt)
    finish = FINISH_TEXT.get(stats.get("finish_reason") or "", "")
    if finish:
        parts.append(finish)
    return "  ·  ".join(parts)


class MessageListModel(QAbstractListModel):
    """The turns of one conversation (the system prompt lives elsewhere), one row each."""

    def __init__(self, messages: Iterable[Message] = (), parent: QObject | None = None):
        super().__init__(parent)
        self._messages: list[Message] = list(messages)
        self._streaming_row = -1

    # --- Qt's interface ---

    def rowCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._messages)

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid() or not 0 <= index.row() < len(self._messages):
            return None
        message = self._messages[index.row()]
        if role in (Qt.DisplayRole, Qt.EditRole):
            return message.content
        if role == SpeakerRole:
            return message.role
        if role == StatsRole:
            if message.role != "assistant":
                return ""
            stats = format_stats(message.stats)
            if message.alternatives:    # LM Studio's "< 2/3 >": Alt+Left / Alt+Right, or the context menu
                n = len(message.alternatives) + 1
                stats = f"‹ {message.version + 1}/{n} ›" + (f"  ·  {stats}" if stats else "")
            return stats
        if role == StreamingRole:
            return index.row() == self._streaming_row
        if role == ErrorRole:
            return message.error
        if role == Qt.ToolTipRole:
            return plain_tooltip(message.error) or None
        if role == Qt.AccessibleTextRole:
            return f"{message.role}: {message.content}"
        return None

    def flags(self, index: Index) -> Qt.ItemFlags:
        if not index.isValid():
            return Qt.NoItemFlags
        return Qt.ItemIsEnabled | Qt.ItemIsSelectable

    # --- editing, by the panel ---

    def messages(self) -> list[Message]:
        return list(self._messages)

    def message(self, row: int) -> Message:
        return self._messages[row]

    def set_messages(self, messages: Iterable[Message]) -> None:
        self.beginResetModel()
        self._messages = list(messages)
        self._streaming_row = -1
        self.endResetModel()

    def append_message(self, message: Message, streaming: bool = False) -> int:
        row = len(self._messages)
        self.beginInsertRows(QModelIndex(), row, row)
        self._messages.append(message)
        if streaming:
            self._streaming_row = row
        self.endInsertRows()
        return row

    def append_text(self, row: int, text: str) -> None:
        """Streaming: add text to the end of one message and repaint that row only."""
        if not text:
            return
        self._messages[row].content += text
        self._row_changed(row, [Qt.DisplayRole, Qt.EditRole])

    def finish_streaming(self, stats: dict | None = None, error: str = "") -> None:
        row, self._streaming_row = self._streaming_row, -1
        if not 0 <= row < len(self._messages):
            return
        message = self._messages[row]
        if stats is not None:
            message.stats = dict(stats)
        if error:
            message.error = error
        self._row_changed(row, [StatsRole, StreamingRole, ErrorRole, Qt.ToolTipRole])

    @property
    def streaming_row(self) -> int:
        return self._streaming_row

    def truncate(self, n_rows: int) -> None:
        """Keep the first `n_rows` messages."""
        if n_rows >= len(self._messages):
            return
        self.beginRemoveRows(QModelIndex(), n_rows, len(self._messages) - 1)
        del self._messages[n_rows:]
        if self._streaming_row >= n_rows:
            self._streaming_row = -1
        self.endRemoveRows()

    def replace_message(self, row: int, message: Message) -> None:
        """Put `message` in place of row `row` (another version of a reply shown)."""
        self._messages[row] = message
        self._row_changed(row, [Qt.DisplayRole, Qt.EditRole, StatsRole, ErrorRole, Qt.ToolTipRole])

    def _row_changed(self, row: int, roles: Sequence[int]) -> None:
        index = self.index(row)
        self.dataChanged.emit(index, index, list(roles))


class ConversationListModel(QAbstractListModel):
    """Saved conversations, the most recently updated first. Editing a title in place emits
    `title_edited(id, title)`; the panel saves it."""

    title_edited = Signal(str, str)

    def __init__(self, summaries: Iterable[ConversationSummary] = (), parent: QObject | None = None):
        super().__init__(parent)
        self._rows: list[ConversationSummary] = sorted(summaries, key=lambda s: s.updated_s, reverse=True)

    def rowCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._rows)

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid() or not 0 <= index.row() < len(self._rows):
            return None
        summary = self._rows[index.row()]
        if role in (Qt.DisplayRole, Qt.EditRole):
            return summary.title
        if role == ConversationIdRole:
            return summary.id
        if role == UpdatedRole:
            return summary.updated_s
        if role == Qt.ToolTipRole:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.updated_s))
            return plain_tooltip(f"{summary.title}\n{summary.n_messages} messages · last changed {when}")
        return None

    def setData(self, index: Index, value, role: int = Qt.EditRole) -> bool:
        if role != Qt.EditRole or not index.isValid() or not isinstance(value, str) or not value.strip():
            return False
        summary = self._rows[index.row()]
        title = value.strip()
        if title == summary.title:
            return False
        self._rows[index.row()] = ConversationSummary(summary.id, title, summary.updated_s, summary.n_messages)
        self.dataChanged.emit(index, index, [Qt.DisplayRole, Qt.EditRole, Qt.ToolTipRole])
        self.title_edited.emit(summary.id, title)
        return True

    def flags(self, index: Index) -> Qt.ItemFlags:
        if not index.isValid():
            return Qt.NoItemFlags
        return Qt.ItemIsEnabled | Qt.ItemIsSelectable | Qt.ItemIsEditable

    # --- by the panel ---

    def set_conversations(self, summaries: Iterable[ConversationSummary]) -> None:
        self.beginResetModel()
        self._rows = sorted(summaries, key=lambda s: s.updated_s, reverse=True)
        self.endResetModel()

    def row_of(self, conversation_id: str) -> int:
        return next((row for row, s in enumerate(self._rows) if s.id == conversation_id), -1)

    def id_at(self, row: int) -> str:
        return self._rows[row].id

    def summary_at(self, row: int) -> ConversationSummary:
        return self._rows[row]

    def upsert(self, summary: ConversationSummary) -> int:
        """Add or update a conversation and move it to where its update time sorts it; returns its row."""
        old_row = self.row_of(summary.id)
        if old_row >= 0:
            self._rows[old_row] = summary
            index = self.index(old_row)
            self.dataChanged.emit(index, index, [Qt.DisplayRole, Qt.EditRole, Qt.ToolTipRole, UpdatedRole])
        new_row = next((row for row, s in enumerate(self._rows)
                        if s.id != summary.id and s.updated_s < summary.updated_s), None)
        if old_row < 0:
            row = len(self._rows) if new_row is None else new_row
            self.beginInsertRows(QModelIndex(), row, row)
            self._rows.insert(row, summary)
            self.endInsertRows()
            return row
        return self._move(old_row, len(self._rows) if new_row is None else new_row)

    def _move(self, old_row: int, before_row: int) -> int:
        """Move `old_row` in front of `before_row` (Qt's beginMoveRows convention)."""
        if before_row in (old_row, old_row + 1):
            return old_row
        self.beginMoveRows(QModelIndex(), old_row, old_row, QModelIndex(), before_row)
        summary = self._rows.pop(old_row)
        row = before_row if before_row < old_row else before_row - 1
        self._rows.insert(row, summary)
        self.endMoveRows()
        return row

    def remove(self, conversation_id: str) -> bool:
        row = self.row_of(conversation_id)
        if row < 0:
            return False
        self.beginRemoveRows(QModelIndex(), row, row)
        del self._rows[row]
        self.endRemoveRows()
        return True
