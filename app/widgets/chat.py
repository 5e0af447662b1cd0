"""The chat panel: saved conversations, a streaming message view, sampling controls and live speed.

Two halves that meet only through the bridge:

* `ChatRunner` lives on the engine thread (only jobs touch it). It owns the model, its chat
  `Session` (the KV cache, reused across turns so each turn evaluates only what changed) and the
  chat template, and rebuilds them when the model, the run config or the placement changes.
* `ChatPanel` is the GUI. It sends a `ChatRequest` per turn and receives a `TurnStarted` and then
  `GenerationEvent`s; streamed text is buffered and appended to the open message a few dozen
  times a second, so a fast model never floods the view.

Conversations are saved through `app.conversations` on a background writer thread (atomic
writes with fsync; never on the GUI thread).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from PySide6.QtCore import QCoreApplication, QItemSelectionModel, QModelIndex, QPoint, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QListView,
                               QMenu, QMessageBox, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QSplitter,
                               QToolButton, QVBoxLayout, QWidget)

from app.bridge import Bridge, JobContext, JobHandle, LoadedModel
from app.conversations import Conversation, ConversationStore, Message, title_from_text
from app.models.chat import ConversationIdRole, ConversationListModel, MessageListModel
from app.widgets import MessageBar
from app.widgets.chat_messages import ChatInput, MessageView
from engine.generate import FINISH_CANCELLED, GenerationEvent, Session, generate
from engine.run_config import RunConfig
from engine.sampling import SamplerSettings

log = logging.getLogger(__name__)

# The panel's own look, on top of resources/style.qss (same palette).
PANEL_STYLE = """
QWidget#chatSidebar, QWidget#chatSettings { background: #1a1b1f; }
QListView#conversationList { background: transparent; border: none; outline: 0; }
QListView#conversationList::item { padding: 7px 8px; border-radius: 6px; color: #c8cbd2; }
QListView#conversationList::item:hover { background: #24262b; }
QListView#conversationList::item:selected { background: #2b3448; color: #ffffff; }
QTreeView#messageView { background: #1b1c20; border: none; }
QTreeView#messageView::item, QTreeView#messageView::item:selected, QTreeView#messageView::item:hover {
    background: transparent; border: none; }
QLabel#chatTitle { font-size: 13pt; font-weight: 600; color: #f2f3f5; }
QPlainTextEdit#chatInput, QPlainTextEdit#systemPrompt {
    background: #17181b; border: 1px solid #34363d; border-radius: 8px; padding: 4px 6px;
    selection-background-color: #3d6fd9; }
QPlainTextEdit#chatInput:focus, QPlainTextEdit#systemPrompt:focus { border-color: #5b8def; }
QPushButton#newChatButton { text-align: left; padding: 7px 12px; font-weight: 600; }
QPushButton#stopButton { background: #3b2023; border-color: #7a2e34; color: #ffc9cb; }
QPushButton#stopButton:hover { background: #4a2529; }
QToolButton#linkButton { color: #78a6ff; border: none; padding: 2px 4px; background: transparent; }
QToolButton#linkButton:hover { color: #a9c6ff; }
QToolButton#linkButton:disabled { color: #5d616a; }
QWidget#chatStats { border-top: 1px solid #26282d; background: #1b1c20; }
QLabel#statLabel { color: #9a9ea8; }
QProgressBar#contextBar { background: #2b2d33; border: none; border-radius: 3px; }
QProgressBar#contextBar::chunk { background: #5b8def; border-radius: 3px; }
QProgressBar#contextBar[level="high"]::chunk { background: #e6a23c; }
"""
FLUSH_INTERVAL_MS = 33          # streamed text reaches the view ~30 times a second
DEFAULT_MAX_TOKENS = 512
SEED_RANDOM = -1


# ---- the engine-thread side -------------------------------------------------------------------

class ChatTurnError(ValueError):
    """A turn that cannot run: a template that fails, a conversation longer than the context."""


@dataclass(frozen=True)
class ChatRequest:
    loaded: LoadedModel
    run_config: RunConfig
    placement: Any                          # opaque to the chat; a change rebuilds the session
    messages: tuple[dict[str, str], ...]    # role/content, system prompt first when there is one
    settings: SamplerSettings
    max_tokens: int


@dataclass(frozen=True)
class TurnStarted:
    """Yielded once the prompt is tokenized, before it is evaluated."""
    n_ctx: int
    prompt_tokens: int
    reused_tokens: int      # the prefix the KV cache already held
    template_name: str


ModelFactory = Callable[[Any, RunConfig, Any], Any]


def default_model_factory(model_file, run_config: RunConfig, placement: Any):
    """The engine model over an open GGUF. Weights are memory-mapped, so this is quick."""
    from engine.model import Model
    return Model(model_file, run_config)


class ChatRunner:
    """The chat's model, Session and template on the engine thread; reused until the model,
    run config or placement changes. Never touched from the GUI thread."""

    def __init__(self, model_factory: ModelFactory = default_model_factory):
        self.model_factory = model_factory
        self.session: Session | None = None
        self.template = None
        self._key: tuple | None = None

    def release(self, ctx: JobContext | None = None) -> None:
        """Drop the model and its KV cache (the memory goes back)."""
        self.session, self.template, self._key = None, None, None

    def _ensure_session(self, request: ChatRequest, ctx: JobContext) -> Session:
        from engine.chat_template import ChatTemplate, ChatTemplateError
        key = (request.loaded.model_file, request.run_config, request.placement)
        if self._key is not None and self._key[0] is key[0] and self._key[1:] == key[1:] and self.session is not None:
            return self.session
        self.release()
        ctx.note(f"preparing {request.loaded.path.name}")
        model = self.model_factory(request.loaded.model_file, request.run_config, request.placement)
        try:
            template = ChatTemplate.from_metadata(model.metadata, request.loaded.model_file.architecture)
        except ChatTemplateError as e:
            raise ChatTurnError(f"The model's chat template cannot be used: {e}") from e
        self.session, self.template, self._key = Session(model), template, key
        return self.session

    def turn(self, request: ChatRequest, ctx: JobContext) -> Iterator[TurnStarted | GenerationEvent]:
        """One assistant reply: render, tokenize, then stream `generate`'s events."""
        from engine.chat_template import ChatTemplateError
        session = self._ensure_session(request, ctx)
        try:
            prompt = self.template.render_prompt(list(request.messages), add_generation_prompt=True)
        except ChatTemplateError as e:
            raise ChatTurnError(f"Cannot build the prompt: {e}") from e
        tokens = session.tokenizer.encode(prompt, add_special=True, parse_special=True)
        if len(tokens) >= session.n_ctx:
            raise ChatTurnError(f"The conversation is {len(tokens)} tokens long and the context holds "
                                f"{session.n_ctx}: start a new chat, shorten this one, or raise the context length.")
        reused = _common_prefix(session.tokens, tokens)
        yield TurnStarted(session.n_ctx, len(tokens), reused, self.template.name)
        try:
            yield from generate(session, tokens, request.settings, request.max_tokens, (), ctx.cancel_event,
                                lambda done, total: ctx.progress(done, total, "reading the prompt"))
        except Exception:
            self._forget_cache(session)     # what the cache holds is unknown after a failure mid-step
            raise

    @staticmethod
    def _forget_cache(session: Session) -> None:
        session.tokens.clear()
        session.cache.reset()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, max(0, len(b) - 1))


# ---- the GUI side -----------------------------------------------------------------------------

class ChatDialogs:
    """The chat's modal questions, in one place that tests replace."""

    def confirm_delete(self, parent: QWidget, title: str) -> bool:
        answer = QMessageBox.question(parent, "Delete conversation", f"Delete “{title}”? This cannot be undone.",
                                      QMessageBox.Delete | QMessageBox.Cancel, QMessageBox.Cancel)
        return answer == QMessageBox.Delete


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
        layout.addWidget(self.state_label)
        layout.addStretch(1)
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
        self.context_bar.setProperty("level", "high" if fraction > 0.9 else "normal")
        self.context_bar.style().unpolish(self.context_bar)
        self.context_bar.style().polish(self.context_bar)
        self.context_bar.setToolTip(f"{fraction:.0%} of the context is used" if n_ctx else "No context yet")


def _tps(value: float | None) -> str:
    return "—" if not value else f"{value:,.1f} tok/s"


class ChatPanel(QWidget):
    """Chat with the open model. Public API: `set_model`, `set_run_config`, `set_placement`, `send`,
    `stop`, `regenerate`, `edit_and_resend`, `new_conversation`, `open_conversation`,
    `rename_conversation`, `delete_conversation`, `flush_saves`, `shutdown`."""

    error_occurred = Signal(str)            # one line, also shown in the panel's own message bar
    turn_finished = Signal(str)             # "stop", "length", "cancelled" or "error"
    _save_failed = Signal(str)              # from the writer thread

    def __init__(self, bridge: Bridge, store: ConversationStore | None = None, dialogs: ChatDialogs | None = None,
                 runner: ChatRunner | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("chatPanel")
        self.setStyleSheet(PANEL_STYLE)
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
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conversations")
        self._saves: list[Future] = []
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
        """A new placement: the next turn rebuilds the session. Pass an immutable snapshot."""
        self.placement = placement.to_dict() if hasattr(placement, "to_dict") else placement

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
        handle.returned.connect(lambda _result: self._end_turn(handle, self._finish_reason()))
        handle.cancelled.connect(lambda: self._end_turn(handle, FINISH_CANCELLED))
        handle.errored.connect(lambda message: self._end_turn(handle, "error", message))
        self._flush_timer.start()
        self._update_actions()

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

    def _write(self, action: Callable[[], Any]) -> None:
        future = self._writer.submit(action)
        future.add_done_callback(self._on_write_done)
        self._saves = [f for f in self._saves if not f.done()] + [future]

    def _on_write_done(self, future: Future) -> None:
        error = future.exception()
        if error is not None:       # on the writer thread: the signal queues the message to the GUI
            self._save_failed.emit(str(error))

    def _on_save_failed(self, message: str) -> None:
        self.show_error(f"Could not save the conversation: {message}")

    def flush_saves(self, timeout_s: float = 10.0) -> bool:
        """Wait for pending saves; True when all are on disk."""
        if all(f.done() for f in self._saves):
            return True
        marker = self._writer.submit(lambda: True)      # the writer runs in order: this runs after them
        return marker.result(timeout=timeout_s)

    def shutdown(self) -> None:
        """Stop a reply, save the open conversation and wait for the writer (the app is quitting)."""
        self.stop()
        if self.messages.streaming_row >= 0:
            self._flush_pending()
        self._sync_conversation()
        if self.conversation.messages:
            self._save_conversation()
        self._writer.shutdown(wait=True)
        self._writer = _ClosedWriter()

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


class _ClosedWriter:
    """Stands in for the writer after shutdown: late saves run at once, on the calling thread."""

    def submit(self, action: Callable[[], Any]) -> Future:
        future: Future = Future()
        try:
            future.set_result(action())
        except Exception as e:
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass
