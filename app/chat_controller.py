"""The chat's controller: the open conversation, its turns on the engine thread and the saved list.

No widgets here. The chat panel binds `messages` and `conversations` (the Qt models of
`app/models/chat.py`), forwards what the user asks for (`send`, `regenerate`, `edit_and_resend`,
`stop`, `new_conversation`, ...) and follows these signals:

    busy_changed(bool)              a turn started or ended
    status_changed(str)             one line on where the turn is ("Reading the prompt…", "Stopped")
    stats_changed(TurnStats)        speed and context use, a few dozen times a second while streaming
    reply_started()                 an empty reply bubble was added
    reply_growing() / reply_grew()  around each append of streamed text (the view follows the end)
    conversation_shown(c)           another `Conversation` is open (the system prompt, the title)
    title_changed(str)              the open conversation's title
    conversation_saved(id)          a snapshot went to the writer thread (the list selects it)
    turn_finished(reason)           "stop", "length", "cancelled" or "error"
    error_occurred(str)             one line for the message bar
    expert_counts(array)            int64 (n_layer, n_expert): router selections of the session
    run_refused(str)                the plan does not fit: the verdict and the ways out; nothing was loaded

A plan the designer's verdict says does not fit is not loaded (`set_fit_refusal`), unless the
user chose to run it anyway (`allow_over_capacity`, for that plan only).

Each turn is one `ChatRequest` to `app.engine_jobs.ChatRunner`, which keeps the model and its KV
cache between turns. Streamed text is buffered and appended to the open message a few dozen times
a second, so a fast model never floods the view. Conversations are saved through
`app.conversations` on a background writer thread (never on the GUI thread).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from app.bridge import Bridge, JobHandle
from app.conversations import BackgroundWriter, Conversation, ConversationStore, Message, title_from_text
from app.engine_jobs import ChatRequest, ChatRunner, LoadedModel, TurnStarted, compiling_text
from app.models.chat import ConversationListModel, MessageListModel
from engine.run.generate import FINISH_CANCELLED, GenerationEvent
from engine.run.sampling import SamplerSettings
from engine.run_config import RunConfig

log = logging.getLogger(__name__)

FLUSH_INTERVAL_MS = 33          # streamed text reaches the view ~30 times a second
END_STATUS = {"cancelled": "Stopped", "error": "Failed"}


@dataclass(frozen=True)
class TurnStats:
    """What the line of statistics under the messages shows; None: not known (yet)."""
    prompt_tps: float | None = None
    generation_tps: float | None = None
    context_used: int | None = None
    n_ctx: int | None = None


def is_base_model(loaded: LoadedModel) -> bool:
    """The built-in Gemma 3 270M: pretrained only, so its turns are completions, not chat."""
    from engine.synth.default_model import GEMMA_FILE
    return loaded.path.name == GEMMA_FILE


def reply_stats(event: GenerationEvent | None, reason: str) -> dict:
    """The statistics kept with a finished reply (what `format_stats` prints under it)."""
    stats: dict = {}
    if event is not None:
        stats = {"prompt_tokens": event.prompt_tokens, "prompt_evaluated": event.prompt_evaluated,
                 "prompt_tps": round(event.prompt_tps, 2),
                 "generation_tokens": event.generation_tokens,
                 "generation_tps": round(event.generation_tps, 2), "context_used": event.context_used}
    stats["finish_reason"] = reason
    return stats


class ChatController(QObject):
    """One conversation at a time with the open model, and the store of saved ones."""

    busy_changed = Signal(bool)
    status_changed = Signal(str)
    stats_changed = Signal(object)              # TurnStats
    reply_started = Signal()
    reply_growing = Signal()
    reply_grew = Signal()
    conversation_shown = Signal(object)         # Conversation
    title_changed = Signal(str)
    conversation_saved = Signal(str)
    turn_finished = Signal(str)
    error_occurred = Signal(str)
    expert_counts = Signal(object)
    run_refused = Signal(str)
    _save_failed = Signal(str)                  # from the writer thread

    def __init__(self, bridge: Bridge, store: ConversationStore | None = None, runner: ChatRunner | None = None,
                 parent: QObject | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.store = store or ConversationStore()
        self.runner = runner or ChatRunner()
        self.messages = MessageListModel(parent=self)
        self.conversations = ConversationListModel(parent=self)
        self.loaded: LoadedModel | None = None
        self.run_config = RunConfig()
        self.placement: Any = None
        self.fit_refusal = ""                   # why the plan may not run ("" when it fits)
        self._over_capacity_allowed = False     # the user chose to run this plan anyway
        self.conversation = Conversation()
        self.job: JobHandle | None = None
        self._prepare_job: JobHandle | None = None
        self.last_turn: TurnStarted | None = None      # what the engine said about the latest turn's prompt
        self._pending_text = ""
        self._last_event: GenerationEvent | None = None
        self._shown_before = 0                  # the reply shown before a regenerate
        self._turn_settings: SamplerSettings | None = None
        self._n_ctx: int | None = None
        self._writer = BackgroundWriter(on_error=lambda error: self._save_failed.emit(str(error)))
        self._save_failed.connect(self._on_save_failed)
        self._flush_timer = QTimer(self, interval=FLUSH_INTERVAL_MS)
        self._flush_timer.timeout.connect(self.flush_pending)
        self.conversations.title_edited.connect(self.rename_conversation)

    # --- the model and its settings ---------------------------------------------------------------

    def set_model(self, loaded: LoadedModel | None) -> bool:
        """A new model (or none): stop any reply and let the engine drop the old session. False: no change."""
        if loaded is self.loaded:
            return False
        self.stop()
        if self._prepare_job is not None:
            self._prepare_job.cancel()      # the old model's: no use any more
        self.loaded = loaded
        self._n_ctx = None
        self.bridge.submit(self.runner.release, "releasing the chat session")
        self.stats_changed.emit(TurnStats())
        return True

    def set_run_config(self, run_config: RunConfig) -> None:
        """New run settings (context length, KV cache types...): the next turn rebuilds the session."""
        self.run_config = run_config
        self._n_ctx = None

    def set_placement(self, placement: Any) -> None:
        """A new `engine.plan.placement.Placement` (None: all on the CPU); the next turn rebuilds the session."""
        self.placement = placement.copy() if placement is not None else None     # later edits must not leak in

    def prepare(self) -> JobHandle | None:
        """Build the open model's session on the engine thread now, compiling its CPU kernels when
        Numba's cache is cold (the status line counts them), so the first prompt need not wait;
        a prompt sent meanwhile queues behind it. None: no model, or a plan that may not run."""
        if self.loaded is None or self.refusal():
            return None
        request = ChatRequest(self.loaded, self.run_config, self.placement, (), SamplerSettings(), 0,
                              completion=is_base_model(self.loaded))
        handle = self.bridge.submit(partial(self.runner.prepare, request), "preparing the chat model")
        handle.compiling.connect(self._on_compiling)
        handle.finished.connect(self._on_prepared)
        self._prepare_job = handle
        return handle

    def _on_compiling(self, progress) -> None:
        if progress.active:
            self.status_changed.emit(compiling_text(progress))

    def _on_prepared(self) -> None:
        if self.sender() is self._prepare_job:
            self._prepare_job = None
        if self.job is None:
            self.status_changed.emit("")

    def set_fit_refusal(self, text: str) -> None:
        """The designer's refusal for the plan as it stands ("" when it fits); a new one asks again."""
        if text != self.fit_refusal:
            self._over_capacity_allowed = False
        self.fit_refusal = text

    def allow_over_capacity(self) -> None:
        """Run the current plan although the verdict says it does not fit (the user said so)."""
        self._over_capacity_allowed = True

    def refusal(self) -> str:
        return "" if self._over_capacity_allowed else self.fit_refusal

    def _refused(self) -> bool:
        if self.refusal():
            self.run_refused.emit(self.fit_refusal)
            return True
        return False

    def set_system_prompt(self, text: str) -> None:
        self.conversation.system_prompt = text

    # --- turns ------------------------------------------------------------------------------------

    @property
    def is_generating(self) -> bool:
        return self.job is not None

    def can_send(self, text: str) -> bool:
        return bool(text.strip()) and not self.is_generating and self.loaded is not None

    def send(self, text: str, settings: SamplerSettings, max_tokens: int) -> bool:
        """`text` as the next user message and a reply to it; False when it cannot go now."""
        if not self.can_send(text) or self._refused():
            return False
        self._append_user_message(text)
        self._start_turn(settings, max_tokens)
        return True

    def regenerate(self, settings: SamplerSettings, max_tokens: int) -> bool:
        """A new reply to the last turn; the earlier ones stay as its alternatives ("< 1/2 >"), and
        a new reply stopped before it wrote anything gives the earlier one back."""
        if self.is_generating or self.loaded is None or self._refused():
            return False
        messages = self.messages.messages()
        n_keep = len(messages)
        while n_keep and messages[n_keep - 1].role == "assistant":
            n_keep -= 1
        if n_keep == 0:
            return False
        earlier = [v for m in messages[n_keep:] for v in m.versions()]
        shown = messages[n_keep:][-1].version if n_keep < len(messages) else 0
        self.messages.truncate(n_keep)
        self._start_turn(settings, max_tokens, earlier, shown)
        return True

    def show_alternative(self, row: int, step: int) -> bool:
        """Show the previous (step -1) or next (+1) reply of an assistant turn; False at either end."""
        if self.is_generating or not 0 <= row < self.messages.rowCount():
            return False
        message = self.messages.message(row)
        index = message.version + step
        if not message.alternatives or not 0 <= index <= len(message.alternatives):
            return False
        self.messages.replace_message(row, message.showing(index))
        self._sync_conversation()
        self._save_conversation()
        return True

    def can_edit(self, row: int) -> bool:
        return (not self.is_generating and 0 <= row < self.messages.rowCount()
                and self.messages.message(row).role == "user")

    def edit_and_resend(self, row: int, text: str, settings: SamplerSettings, max_tokens: int) -> bool:
        """Replace user message `row` with `text`, drop everything after it and generate again."""
        if not self.can_send(text) or not self.can_edit(row) or self._refused():
            return False
        self._keep_copy_before_edit(row)
        self.messages.truncate(row)
        self._append_user_message(text)
        self._start_turn(settings, max_tokens)
        return True

    def _keep_copy_before_edit(self, row: int) -> None:
        """Editing an earlier message drops the turns after it: keep the conversation as it was,
        as a conversation of its own, so nothing the user had is lost."""
        self._sync_conversation()
        messages = self.conversation.messages
        if row >= len(messages) - 1 or messages[row].content == "":
            return
        copy = Conversation.from_dict({**self.conversation.to_dict(), "id": Conversation().id})
        copy.title, copy.titled_by_user = f"{self.conversation.title} (before edit)", True
        self.conversations.upsert(copy.summary())
        self._write(partial(self.store.save, copy))

    def made_with(self) -> dict:
        """The model and settings a reply is made with, kept in its stats."""
        rc = self.run_config
        made = {"n_ctx": rc.n_ctx, "type_k": rc.type_k, "type_v": rc.type_v, "flash_attn": rc.flash_attn}
        if self.loaded is not None:
            made = {"model": self.loaded.name, "model_file": self.loaded.path.name, **made}
        if self._turn_settings is not None:
            made["sampling"] = dataclasses.asdict(self._turn_settings)
        return made

    def stop(self) -> None:
        """Stop the reply being generated; what was written so far stays."""
        if self.job is not None:
            self.job.cancel()
            self.status_changed.emit("Stopping…")

    @property
    def has_user_turn(self) -> bool:
        return any(m.role == "user" for m in self.messages.messages())

    def _append_user_message(self, text: str) -> None:
        if not self.conversation.titled_by_user and not self.has_user_turn:
            self.conversation.title = title_from_text(text)
            self.title_changed.emit(self.conversation.title)
        self.messages.append_message(Message("user", text))

    def _start_turn(self, settings: SamplerSettings, max_tokens: int, earlier: list[Message] = (),
                    shown_before: int = 0) -> None:
        self._sync_conversation()
        request = ChatRequest(self.loaded, self.run_config, self.placement,
                              tuple(self.conversation.chat_messages()), settings, max_tokens,
                              completion=self.loaded is not None and is_base_model(self.loaded))
        if not earlier:
            self._save_conversation()
        # the new reply is the newest version; earlier ones are saved with it from the start
        reply = Message("assistant", "").showing(len(earlier), [*earlier, Message("assistant", "")])
        self._shown_before = shown_before
        self._turn_settings = settings
        self.messages.append_message(reply, streaming=True)
        if earlier:
            self._sync_conversation()
            self._save_conversation()
        self.reply_started.emit()
        self._pending_text, self._last_event = "", None
        handle = self.bridge.submit(partial(self.runner.turn, request), "chat reply")
        self.job = handle
        # bound methods, not lambdas: Qt drops these connections if the controller goes first
        handle.started.connect(self._on_started)
        handle.progress.connect(self._on_progress)
        handle.yielded.connect(self._on_yielded)
        handle.returned.connect(self._on_returned)
        handle.cancelled.connect(self._on_cancelled)
        handle.errored.connect(self._on_errored)
        handle.compiling.connect(self._on_compiling)
        self._flush_timer.start()
        self.busy_changed.emit(True)

    def _on_started(self) -> None:
        self.status_changed.emit("Reading the prompt…")

    def _on_returned(self, counts) -> None:
        self._on_turn_returned(self.sender(), counts)

    def _on_cancelled(self) -> None:
        self._end_turn(self.sender(), FINISH_CANCELLED)

    def _on_errored(self, message: str) -> None:
        self._end_turn(self.sender(), "error", message)

    def _on_turn_returned(self, handle: JobHandle, counts) -> None:
        if counts is not None and counts.size:
            self.expert_counts.emit(counts)
        self._end_turn(handle, self._finish_reason())

    def _finish_reason(self) -> str:
        return (self._last_event.finish_reason if self._last_event is not None else None) or "stop"

    def _on_progress(self, done: int, total: int, text: str) -> None:
        if total > 0:
            self.status_changed.emit(f"Reading the prompt: {done:,} / {total:,} tokens")
        elif text:
            self.status_changed.emit(text[0].upper() + text[1:] + "…")

    def _on_yielded(self, item: object) -> None:
        if isinstance(item, TurnStarted):
            self.last_turn = item
            self._n_ctx = item.n_ctx
            self.stats_changed.emit(TurnStats(None, None, item.reused_tokens, item.n_ctx))
            return
        if isinstance(item, GenerationEvent):
            self._pending_text += item.text
            if self._last_event is None:
                self.status_changed.emit("Writing…")
            self._last_event = item

    def flush_pending(self) -> None:
        """Append the text streamed since the last flush to the open reply."""
        row = self.messages.streaming_row
        if row < 0:
            return
        event = self._last_event
        if event is not None:
            self.stats_changed.emit(TurnStats(event.prompt_tps, event.generation_tps, event.context_used,
                                              self._n_ctx))
        if not self._pending_text:
            return
        self.reply_growing.emit()
        self.messages.append_text(row, self._pending_text)
        self._pending_text = ""
        self.reply_grew.emit()

    def _end_turn(self, handle: JobHandle, reason: str, error: str = "") -> None:
        """The reply is over: keep what was written (a turn that wrote nothing leaves no bubble)."""
        if handle is not self.job:
            return
        self.flush_pending()
        self._flush_timer.stop()
        row = self.messages.streaming_row
        self.messages.finish_streaming({**reply_stats(self._last_event, reason), **self.made_with()}, error)
        if row >= 0 and not self.messages.message(row).content:
            reply = self.messages.message(row)
            if reply.alternatives:      # stopped before a word: the earlier reply comes back
                self.messages.replace_message(row, reply.showing(self._shown_before, reply.alternatives))
            else:
                self.messages.truncate(row)
        if error:
            self.show_error(error)
        self.status_changed.emit(END_STATUS.get(reason, ""))
        self._sync_conversation()
        self._save_conversation()
        self.job = None
        self.busy_changed.emit(False)
        self.turn_finished.emit(reason)

    def show_error(self, text: str) -> None:
        log.info("chat: %s", text)
        self.error_occurred.emit(text)

    # --- conversations ----------------------------------------------------------------------------

    def new_conversation(self) -> bool:
        if self.is_generating:
            return False
        self._sync_conversation()
        self.show_conversation(Conversation())
        return True

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
        self.show_conversation(conversation)
        return True

    def show_conversation(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.messages.set_messages(conversation.messages)
        self.conversation_shown.emit(conversation)

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
            self.title_changed.emit(title)
            if self.conversation.messages:
                self._save_conversation()
        else:
            self._write(partial(self.store.rename, conversation_id, title))

    def title_of(self, conversation_id: str) -> str | None:
        """A conversation's title as listed; None for one that is neither listed nor open."""
        row = self.conversations.row_of(conversation_id)
        if row >= 0:
            return self.conversations.summary_at(row).title
        return self.conversation.title if conversation_id == self.conversation.id else None

    def delete_conversation(self, conversation_id: str) -> bool:
        """Forget a conversation, on disk too (the view has asked the user)."""
        if self.is_generating or self.title_of(conversation_id) is None:
            return False
        self.conversations.remove(conversation_id)
        self._write(partial(self.store.delete, conversation_id))
        if conversation_id == self.conversation.id:
            self.show_conversation(Conversation())
        return True

    def load_conversation_list(self) -> None:
        try:
            self.store.remove_stale_temps()
            self.conversations.set_conversations(self.store.list())
        except OSError as e:
            self.show_error(f"Cannot read the saved conversations in {self.store.directory}: {e}")

    def _sync_conversation(self) -> None:
        self.conversation.messages = self.messages.messages()

    def _save_conversation(self) -> None:
        """Save a snapshot of the open conversation on the writer thread; empty ones are not kept."""
        if not self.conversation.messages:
            return
        self.conversation.touch()
        snapshot = Conversation.from_dict(self.conversation.to_dict())
        self.conversations.upsert(snapshot.summary())
        self.conversation_saved.emit(snapshot.id)
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
            self.flush_pending()
        self._sync_conversation()
        if self.conversation.messages:
            self._save_conversation()
        self._writer.close()
