"""The chat panel: saved conversations, a streaming message view, sampling controls and live speed.

The panel sends one `ChatRequest` per turn to the engine thread, where `app.engine_jobs.ChatRunner`
keeps the model and its KV cache between turns, and receives a `TurnStarted` and then
`GenerationEvent`s. Streamed text is buffered and appended to the open message a few dozen times
a second, so a fast model never floods the view.

Conversations are saved through `app.conversations` on a background writer thread (atomic
writes with fsync; never on the GUI thread).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from PySide6.QtCore import QCoreApplication, QItemSelectionModel, QModelIndex, QPoint, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QLabel, QListView, QMenu, QMessageBox,
                               QPlainTextEdit, QPushButton, QSplitter, QToolButton, QVBoxLayout, QWidget)

from app.bridge import Bridge, JobHandle, LoadedModel
from app.conversations import BackgroundWriter, Conversation, ConversationStore, Message, title_from_text
from app.engine_jobs import ChatRequest, ChatRunner, TurnStarted
from app.models.chat import ConversationIdRole, ConversationListModel, MessageListModel
from app.widgets import MessageBar
from app.widgets.chat_widgets import CHAT_STYLE, ChatInput, ChatStats, MessageView, SamplingControls
from engine.run.generate import FINISH_CANCELLED, GenerationEvent
from engine.run_config import RunConfig
from engine.run.sampling import SamplerSettings

log = logging.getLogger(__name__)

FLUSH_INTERVAL_MS = 33          # streamed text reaches the view ~30 times a second


class ChatDialogs:
    """The chat's modal questions, in one place that tests replace."""

    def confirm_delete(self, parent: QWidget, title: str) -> bool:
        answer = QMessageBox.question(parent, "Delete conversation", f"Delete “{title}”? This cannot be undone.",
                                      QMessageBox.Delete | QMessageBox.Cancel, QMessageBox.Cancel)
        return answer == QMessageBox.Delete


class ChatPanel(QWidget):
    """Chat with the open model. Public API: `set_model`, `set_run_config`, `set_placement`, `send`,
    `stop`, `regenerate`, `edit_and_resend`, `new_conversation`, `open_conversation`,
    `rename_conversation`, `delete_conversation`, `flush_saves`, `shutdown`."""

    error_occurred = Signal(str)            # one line, also shown in the panel's own message bar
    turn_finished = Signal(str)             # "stop", "length", "cancelled" or "error"
    expert_counts = Signal(object)          # int64 (n_layer, n_expert): router selections of the session
    _save_failed = Signal(str)              # from the writer thread

    def __init__(self, bridge: Bridge, store: ConversationStore | None = None, dialogs: ChatDialogs | None = None,
                 runner: ChatRunner | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("chatPanel")
        self.setStyleSheet(CHAT_STYLE)
        self.bridge = bridge
        self.store = store or ConversationStore()
        self.dialogs = dialogs or ChatDialogs()
        self.runner = runner or ChatRunner()
        self.loaded: LoadedModel | None = None
        self.run_config = RunConfig()
        self.placement: Any = None
        self.conversation = Conversation()
        self._job: JobHandle | None = None
        self._pending_text = ""
        self._last_event: GenerationEvent | None = None
        self._n_ctx: int | None = None
        self.last_turn: TurnStarted | None = None      # what the engine said about the latest turn's prompt
        self._edit_row: int | None = None
        self._selecting = False
        self._writer = BackgroundWriter(on_error=lambda error: self._save_failed.emit(str(error)))
        self._flush_timer = QTimer(self, interval=FLUSH_INTERVAL_MS)
        self._flush_timer.timeout.connect(self._flush_pending)
        self._save_failed.connect(self._on_save_failed)

        self.messages = MessageListModel(parent=self)
        self.conversations = ConversationListModel(parent=self)
        self.conversations.title_edited.connect(self.rename_conversation)
        self._build()
        self._load_conversation_list()
        self._show_conversation(self.conversation)
        self._update_actions()
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    # --- building -------------------------------------------------------------------------------

    def _build(self) -> None:
        self.message_bar = MessageBar()
        splitter = QSplitter(Qt.Horizontal, childrenCollapsible=False)
        splitter.addWidget(self._build_sidebar())
        splitter.addWidget(self._build_conversation())
        splitter.addWidget(self._build_settings())
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setStretchFactor(2, 0)
        splitter.setSizes([220, 820, 270])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.message_bar)
        layout.addWidget(splitter, 1)

    def _build_sidebar(self) -> QWidget:
        self.new_button = QPushButton("+   New chat", objectName="newChatButton")
        self.new_button.setShortcut(QKeySequence("Ctrl+N"))
        self.new_button.clicked.connect(self.new_conversation)
        self.conversation_view = QListView(objectName="conversationList")
        self.conversation_view.setModel(self.conversations)
        self.conversation_view.setEditTriggers(QAbstractItemView.EditKeyPressed | QAbstractItemView.SelectedClicked)
        self.conversation_view.setTextElideMode(Qt.ElideRight)
        self.conversation_view.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)   # long titles elide instead
        self.conversation_view.setUniformItemSizes(True)
        self.conversation_view.setContextMenuPolicy(Qt.CustomContextMenu)
        self.conversation_view.customContextMenuRequested.connect(self._conversation_menu)
        self.conversation_view.selectionModel().currentChanged.connect(self._on_conversation_chosen)
        self.rename_button = QToolButton(text="Rename", autoRaise=True, objectName="linkButton")
        self.rename_button.clicked.connect(self._rename_current)
        self.delete_button = QToolButton(text="Delete", autoRaise=True, objectName="linkButton")
        self.delete_button.clicked.connect(lambda: self.delete_conversation(self.conversation.id))
        buttons = QHBoxLayout()
        buttons.addWidget(self.rename_button)
        buttons.addWidget(self.delete_button)
        buttons.addStretch(1)
        sidebar = QWidget(objectName="chatSidebar")
        layout = QVBoxLayout(sidebar)
        layout.setContentsMargins(12, 12, 4, 10)
        layout.setSpacing(8)
        layout.addWidget(self.new_button)
        layout.addWidget(QLabel("Conversations", objectName="sectionTitle"))
        layout.addWidget(self.conversation_view, 1)
        layout.addLayout(buttons)
        return sidebar

    def _build_conversation(self) -> QWidget:
        self.title_label = QLabel(objectName="chatTitle")
        self.model_label = QLabel(objectName="mutedLabel")
        header = QHBoxLayout()
        header.setContentsMargins(18, 12, 18, 6)
        header.addWidget(self.title_label, 1)
        header.addWidget(self.model_label)

        self.message_view = MessageView()
        self.message_view.setModel(self.messages)
        self.message_view.setContextMenuPolicy(Qt.CustomContextMenu)
        self.message_view.customContextMenuRequested.connect(self._message_menu)
        self.message_view.doubleClicked.connect(lambda index: self.begin_edit(index.row()))
        copy = QAction("Copy", self.message_view, shortcut=QKeySequence.Copy)
        copy.setShortcutContext(Qt.WidgetShortcut)
        copy.triggered.connect(self._copy_current)
        self.message_view.addAction(copy)
        self.stats = ChatStats()

        self.edit_banner = QLabel(objectName="noteLabel")
        self.edit_banner.hide()
        self.input = ChatInput()
        self.input.submitted.connect(self.send)
        self.input.escaped.connect(self.cancel_edit)
        self.input.textChanged.connect(self._update_actions)
        self.send_button = QPushButton("Send", default=True, objectName="sendButton")
        self.send_button.clicked.connect(lambda: self.send())
        self.stop_button = QPushButton("Stop", objectName="stopButton")
        self.stop_button.setShortcut(QKeySequence("Ctrl+."))
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button = QPushButton("Regenerate", objectName="regenerateButton")
        self.regenerate_button.setToolTip("Replace the last reply with a new one")
        self.regenerate_button.clicked.connect(self.regenerate)
        buttons = QVBoxLayout()
        buttons.setSpacing(6)
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.regenerate_button)
        buttons.addStretch(1)
        composer = QHBoxLayout()
        composer.setContentsMargins(18, 6, 18, 14)
        composer.setSpacing(10)
        composer.addWidget(self.input, 1)
        composer.addLayout(buttons)

        column = QWidget(objectName="chatColumn")
        layout = QVBoxLayout(column)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addLayout(header)
        layout.addWidget(self.message_view, 1)
        layout.addWidget(self.stats)
        banner_row = QHBoxLayout()
        banner_row.setContentsMargins(18, 6, 18, 0)
        banner_row.addWidget(self.edit_banner)
        layout.addLayout(banner_row)
        layout.addLayout(composer)
        return column

    def _build_settings(self) -> QWidget:
        self.system_prompt = QPlainTextEdit(objectName="systemPrompt")
        self.system_prompt.setPlaceholderText("Optional: how the assistant should behave")
        self.system_prompt.setFixedHeight(120)
        self.system_prompt.textChanged.connect(self._on_system_prompt_changed)
        self.sampling = SamplingControls()
        panel = QWidget(objectName="chatSettings")
        layout = QVBoxLayout(panel)
        layout.setContentsMargins(8, 12, 14, 10)
        layout.setSpacing(8)
        layout.addWidget(QLabel("System prompt", objectName="sectionTitle"))
        layout.addWidget(self.system_prompt)
        layout.addSpacing(8)
        layout.addWidget(QLabel("Sampling", objectName="sectionTitle"))
        layout.addWidget(self.sampling)
        layout.addStretch(1)
        return panel

    # --- the model ------------------------------------------------------------------------------

    def set_model(self, loaded: LoadedModel | None) -> None:
        """A new model (or none): stop any reply and let the engine drop the old session."""
        if loaded is self.loaded:
            return
        self.stop()
        self.loaded = loaded
        self._n_ctx = None
        self.bridge.submit(self.runner.release, "releasing the chat session")
        self.model_label.setText(f"{loaded.name}" if loaded else "No model open")
        self.model_label.setToolTip(str(loaded.path) if loaded else "")
        self.stats.show_stats()
        self._update_actions()

    def set_run_config(self, run_config: RunConfig) -> None:
        """New run settings (context length, KV cache types...): the next turn rebuilds the session."""
        self.run_config = run_config
        self._n_ctx = None

    def set_placement(self, placement: Any) -> None:
        """A new `engine.plan.placement.Placement` (None: all on the CPU); the next turn rebuilds the session."""
        self.placement = placement.copy() if placement is not None else None     # later edits must not leak in

    # --- turns ----------------------------------------------------------------------------------

    @property
    def is_generating(self) -> bool:
        return self._job is not None

    def send(self, text: str | None = None) -> bool:
        """Send `text` (default: the input box) as the next user message; False when it cannot go now."""
        text = self.input.toPlainText() if text is None else text
        if not text.strip() or self.is_generating or self.loaded is None:
            return False
        if self._edit_row is not None:
            return self.edit_and_resend(self._edit_row, text)
        self.input.clear()
        self._append_user_message(text)
        self._start_turn()
        return True

    def regenerate(self) -> bool:
        """Drop the last reply and generate a new one for the same conversation."""
        if self.is_generating or self.loaded is None:
            return False
        messages = self.messages.messages()
        n_keep = len(messages)
        while n_keep and messages[n_keep - 1].role == "assistant":
            n_keep -= 1
        if n_keep == 0:
            return False
        self.messages.truncate(n_keep)
        self._start_turn()
        return True

    def edit_and_resend(self, row: int, text: str) -> bool:
        """Replace user message `row` with `text`, drop everything after it and generate again."""
        if self.is_generating or self.loaded is None or not text.strip():
            return False
        if not 0 <= row < self.messages.rowCount() or self.messages.message(row).role != "user":
            return False
        self._end_edit()
        self.input.clear()
        self.messages.truncate(row)
        self._append_user_message(text)
        self._start_turn()
        return True

    def begin_edit(self, row: int) -> bool:
        """Put user message `row` in the input box; sending then resends from there."""
        if self.is_generating or not 0 <= row < self.messages.rowCount():
            return False
        message = self.messages.message(row)
        if message.role != "user":
            return False
        self._edit_row = row
        self.input.setPlainText(message.content)
        self.input.setFocus()
        self.edit_banner.setText("Editing an earlier message: Enter resends from there (later messages are "
                                 "dropped), Esc cancels.")
        self.edit_banner.show()
        self._update_actions()
        return True

    def cancel_edit(self) -> None:
        if self._edit_row is not None:
            self._end_edit()
            self.input.clear()

    def _end_edit(self) -> None:
        self._edit_row = None
        self.edit_banner.hide()
        self._update_actions()

    def stop(self) -> None:
        """Stop the reply being generated; what was written so far stays."""
        if self._job is not None:
            self._job.cancel()
            self.stats.state_label.setText("Stopping…")

    def sampler_settings(self) -> SamplerSettings:
        return self.sampling.settings()

    def _append_user_message(self, text: str) -> None:
        if not self.conversation.titled_by_user and not any(m.role == "user" for m in self.messages.messages()):
            self.conversation.title = title_from_text(text)
            self.title_label.setText(self.conversation.title)
        self.messages.append_message(Message("user", text))

    def _start_turn(self) -> None:
        self._sync_conversation()
        request = ChatRequest(self.loaded, self.run_config, self.placement,
                              tuple(self.conversation.chat_messages()), self.sampler_settings(),
                              self.sampling.max_tokens.value())
        self._save_conversation()
        self.messages.append_message(Message("assistant", ""), streaming=True)
        self.message_view.scrollToBottom()
        self._pending_text, self._last_event = "", None
        handle = self.bridge.submit(partial(self.runner.turn, request), "chat reply")
        self._job = handle
        handle.started.connect(lambda: self.stats.state_label.setText("Reading the prompt…"))
        handle.progress.connect(self._on_progress)
        handle.yielded.connect(self._on_yielded)
        handle.returned.connect(lambda result: self._on_turn_returned(handle, result))
        handle.cancelled.connect(lambda: self._end_turn(handle, FINISH_CANCELLED))
        handle.errored.connect(lambda message: self._end_turn(handle, "error", message))
        self._flush_timer.start()
        self._update_actions()

    def _on_turn_returned(self, handle, counts) -> None:
        if counts is not None and counts.size:
            self.expert_counts.emit(counts)
        self._end_turn(handle, self._finish_reason())

    def _finish_reason(self) -> str:
        return (self._last_event.finish_reason if self._last_event is not None else None) or "stop"

    def _on_progress(self, done: int, total: int, text: str) -> None:
        if total > 0:
            self.stats.state_label.setText(f"Reading the prompt: {done:,} / {total:,} tokens")
        elif text:
            self.stats.state_label.setText(text[0].upper() + text[1:] + "…")

    def _on_yielded(self, item: object) -> None:
        if isinstance(item, TurnStarted):
            self.last_turn = item
            self._n_ctx = item.n_ctx
            self.stats.show_stats(None, None, item.reused_tokens, item.n_ctx)
            return
        if isinstance(item, GenerationEvent):
            self._pending_text += item.text
            if self._last_event is None:
                self.stats.state_label.setText("Writing…")
            self._last_event = item

    def _flush_pending(self) -> None:
        row = self.messages.streaming_row
        if row < 0:
            return
        event = self._last_event
        if event is not None:
            self.stats.show_stats(event.prompt_tps, event.generation_tps, event.context_used, self._n_ctx)
        if not self._pending_text:
            return
        follow = self.message_view.is_at_bottom()
        self.messages.append_text(row, self._pending_text)
        self._pending_text = ""
        if follow:
            self.message_view.scrollToBottom()

    def _end_turn(self, handle: JobHandle, reason: str, error: str = "") -> None:
        """The reply is over: keep what was written (a turn that wrote nothing leaves no bubble)."""
        if handle is not self._job:
            return
        self._flush_pending()
        self._flush_timer.stop()
        row = self.messages.streaming_row
        event = self._last_event
        stats = {}
        if event is not None:
            stats = {"prompt_tokens": event.prompt_tokens, "prompt_tps": round(event.prompt_tps, 2),
                     "generation_tokens": event.generation_tokens,
                     "generation_tps": round(event.generation_tps, 2), "context_used": event.context_used}
        stats["finish_reason"] = reason
        self.messages.finish_streaming(stats, error)
        if row >= 0 and not self.messages.message(row).content:
            self.messages.truncate(row)
        if error:
            self.show_error(error)
        self.stats.state_label.setText({"cancelled": "Stopped", "error": "Failed"}.get(reason, ""))
        self._sync_conversation()
        self._save_conversation()
        self._job = None
        self._update_actions()
        self.turn_finished.emit(reason)

    def show_error(self, text: str) -> None:
        log.info("chat: %s", text)
        self.message_bar.show_message(text, MessageBar.ERROR)
        self.error_occurred.emit(text)

    # --- conversations --------------------------------------------------------------------------

    def new_conversation(self) -> None:
        if self.is_generating:
            return
        self._sync_conversation()
        self._show_conversation(Conversation())

    def open_conversation(self, conversation_id: str) -> bool:
        if self.is_generating:
            return False
        if conversation_id == self.conversation.id:
            return True
        try:
            conversation = self.store.load(conversation_id)
        except ValueError as e:
            self.show_error(str(e))
            return False
        self._sync_conversation()
        self._show_conversation(conversation)
        return True

    def rename_conversation(self, conversation_id: str, title: str) -> None:
        title = title.strip()
        if not title:
            return
        row = self.conversations.row_of(conversation_id)
        if row >= 0 and self.conversations.summary_at(row).title != title:
            self.conversations.setData(self.conversations.index(row), title)   # comes back here through title_edited
            return
        if conversation_id == self.conversation.id:
            self.conversation.title, self.conversation.titled_by_user = title, True
            self.title_label.setText(title)
            if self.conversation.messages:
                self._save_conversation()
        else:
            self._write(partial(self.store.rename, conversation_id, title))

    def delete_conversation(self, conversation_id: str) -> bool:
        if self.is_generating:
            return False
        row = self.conversations.row_of(conversation_id)
        title = self.conversations.summary_at(row).title if row >= 0 else self.conversation.title
        if row < 0 and conversation_id != self.conversation.id:
            return False
        if not self.dialogs.confirm_delete(self, title):
            return False
        self._selecting = True      # the list moves its selection to a neighbour: that is not a choice
        try:
            self.conversations.remove(conversation_id)
        finally:
            self._selecting = False
        self._write(partial(self.store.delete, conversation_id))
        if conversation_id == self.conversation.id:
            self._show_conversation(Conversation())
        return True

    def _rename_current(self) -> None:
        row = self.conversations.row_of(self.conversation.id)
        if row >= 0:
            self.conversation_view.edit(self.conversations.index(row))

    def _show_conversation(self, conversation: Conversation) -> None:
        self._end_edit()
        self.conversation = conversation
        self.messages.set_messages(conversation.messages)
        self.system_prompt.blockSignals(True)
        self.system_prompt.setPlainText(conversation.system_prompt)
        self.system_prompt.blockSignals(False)
        self.title_label.setText(conversation.title)
        self._select_in_list(conversation.id)
        self.message_view.scrollToBottom()
        self._update_actions()

    def _select_in_list(self, conversation_id: str) -> None:
        row = self.conversations.row_of(conversation_id)
        selection = self.conversation_view.selectionModel()
        self._selecting = True      # a selection made here is not the user choosing a conversation
        try:
            if row >= 0:
                selection.setCurrentIndex(self.conversations.index(row), QItemSelectionModel.ClearAndSelect)
            else:
                selection.clear()
        finally:
            self._selecting = False

    def _on_conversation_chosen(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if self._selecting:
            return
        if current.isValid() and not self.open_conversation(current.data(ConversationIdRole)):
            self._select_in_list(self.conversation.id)

    def _on_system_prompt_changed(self) -> None:
        self.conversation.system_prompt = self.system_prompt.toPlainText()

    def _load_conversation_list(self) -> None:
        try:
            self.store.remove_stale_temps()
            self.conversations.set_conversations(self.store.list())
        except OSError as e:
            self.show_error(f"Cannot read the saved conversations in {self.store.directory}: {e}")

    def _sync_conversation(self) -> None:
        self.conversation.messages = self.messages.messages()
        self.conversation.system_prompt = self.system_prompt.toPlainText()

    def _save_conversation(self) -> None:
        """Save a snapshot of the open conversation on the writer thread; empty ones are not kept."""
        if not self.conversation.messages:
            return
        self.conversation.touch()
        snapshot = Conversation.from_dict(self.conversation.to_dict())
        self.conversations.upsert(snapshot.summary())
        self._select_in_list(snapshot.id)
        self._write(partial(self.store.save, snapshot))

    def _write(self, action) -> None:
        self._writer.submit(action)

    def _on_save_failed(self, message: str) -> None:
        self.show_error(f"Could not save the conversation: {message}")

    def flush_saves(self, timeout_s: float = 10.0) -> bool:
        """Wait for pending saves; True when all are on disk."""
        return self._writer.flush(timeout_s)

    def shutdown(self) -> None:
        """Stop a reply, save the open conversation and wait for the writer (the app is quitting)."""
        self.stop()
        if self.messages.streaming_row >= 0:
            self._flush_pending()
        self._sync_conversation()
        if self.conversation.messages:
            self._save_conversation()
        self._writer.close()

    # --- menus and small actions ------------------------------------------------------------------

    def _conversation_menu(self, point: QPoint) -> None:
        index = self.conversation_view.indexAt(point)
        if not index.isValid():
            return
        conversation_id = index.data(ConversationIdRole)
        menu = QMenu(self)
        menu.addAction("Rename", lambda: self.conversation_view.edit(index))
        menu.addAction("Delete…", lambda: self.delete_conversation(conversation_id))
        menu.popup(self.conversation_view.viewport().mapToGlobal(point))

    def _message_menu(self, point: QPoint) -> None:
        index = self.message_view.indexAt(point)
        if not index.isValid():
            return
        row = index.row()
        message = self.messages.message(row)
        menu = QMenu(self)
        menu.addAction("Copy", lambda: QGuiApplication.clipboard().setText(message.content))
        if message.role == "user":
            menu.addAction("Edit and resend…", lambda: self.begin_edit(row)).setEnabled(not self.is_generating)
        if message.role == "assistant" and row == self.messages.rowCount() - 1:
            menu.addAction("Regenerate", self.regenerate).setEnabled(not self.is_generating)
        menu.popup(self.message_view.viewport().mapToGlobal(point))

    def _copy_current(self) -> None:
        index = self.message_view.currentIndex()
        if index.isValid():
            QGuiApplication.clipboard().setText(self.messages.message(index.row()).content)

    def _update_actions(self) -> None:
        busy = self.is_generating
        has_model = self.loaded is not None
        has_user_turn = any(m.role == "user" for m in self.messages.messages())
        self.send_button.setVisible(not busy)
        self.stop_button.setVisible(busy)
        self.send_button.setEnabled(has_model and bool(self.input.toPlainText().strip()))
        self.send_button.setText("Resend" if self._edit_row is not None else "Send")
        self.regenerate_button.setEnabled(has_model and not busy and has_user_turn)
        for widget in (self.new_button, self.conversation_view, self.rename_button, self.delete_button):
            widget.setEnabled(not busy)
        self.input.setPlaceholderText("Message the model — Enter sends, Shift+Enter for a new line" if has_model
                                      else "Open a model to chat with it")
        self.message_view.empty_text = ("Start the conversation below." if has_model
                                        else "No model open.\nOpen a GGUF to chat with it.")
        self.message_view.viewport().update()

    # --- screenshots ------------------------------------------------------------------------------

    def demo_fill(self, messages: Sequence[tuple[str, str]] | Sequence[Message], title: str = "",
                  model_name: str = "", stats: tuple[float, float, int, int] | None = None) -> None:
        """Show a conversation without a model (for screenshots): (role, text) pairs or Messages."""
        conversation = Conversation(title=title or "Demo conversation")
        conversation.messages = [m if isinstance(m, Message) else Message(m[0], m[1]) for m in messages]
        self._show_conversation(conversation)
        if model_name:
            self.model_label.setText(model_name)
        if stats is not None:
            self.stats.show_stats(*stats)
