"""Chat conversations on disk: one JSON file per conversation under the user's data folder.

Every save is atomic: the new text goes to a temporary file in the same folder, is flushed and
fsync'ed, and only then replaces the old file with `os.replace` (one rename, which the file system
performs whole or not at all). A crash at any point leaves either the old conversation or the new
one, never a torn file. Temporary files a crash left behind are ignored and cleaned up later.

No Qt here. The chat panel saves through a `BackgroundWriter`, so that the fsyncs never stall
the GUI thread; tests call the store directly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir

from engine.files import SavedFileError, read_json, set_aside
from engine.synth.default_model import APP_NAME

log = logging.getLogger(__name__)

FORMAT = "offload-studio-conversation"
FORMAT_VERSION = 1
SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"            # a crash may leave these; `list` skips them, `remove_stale_temps` deletes them
STALE_TEMP_AGE_S = 3600
TITLE_CHARS = 48
ROLES = ("system", "user", "assistant")
ID_RE = re.compile(r"^[0-9a-f]{32}$")


class ConversationError(ValueError):
    """A conversation file that cannot be read, or an id that names none."""


def default_conversations_dir() -> Path:
    return Path(user_data_dir(APP_NAME)) / "conversations"


def title_from_text(text: str, max_chars: int = TITLE_CHARS) -> str:
    """A conversation's default title: the first line of its first message, shortened."""
    line = " ".join(text.strip().split("\n", 1)[0].split())
    if not line:
        return "New chat"
    if len(line) <= max_chars:
        return line
    cut = line[:max_chars - 1]
    space = cut.rfind(" ")
    if space > max_chars // 2:      # end on a whole word when one ends near the limit
        cut = cut[:space]
    return cut.rstrip() + "…"


@dataclass
class Message:
    role: str                                   # system | user | assistant
    content: str
    stats: dict[str, Any] = field(default_factory=dict)    # assistant turns: tokens, tokens/s, finish reason
    error: str = ""                             # why a turn ended early, shown with the message
    # earlier (or later) replies to the same turn, oldest first, kept when a reply is regenerated;
    # `version` is where the shown one sits among all of them ("< 2/3 >" shows version 1 of 3)
    alternatives: list[Message] = field(default_factory=list)
    version: int = 0

    def versions(self) -> list[Message]:
        """Every reply to this turn, oldest first, the shown one included."""
        shown = Message(self.role, self.content, dict(self.stats), self.error)
        return self.alternatives[:self.version] + [shown] + self.alternatives[self.version:]

    def showing(self, index: int, versions: list[Message] | None = None) -> Message:
        """This turn with reply `index` of `versions` (default: its own) shown and the others kept."""
        versions = self.versions() if versions is None else versions
        chosen = versions[index]
        return Message(chosen.role, chosen.content, dict(chosen.stats), chosen.error,
                       [Message(m.role, m.content, dict(m.stats), m.error) for i, m in enumerate(versions) if i != index],
                       index)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.stats:
            data["stats"] = dict(self.stats)
        if self.error:
            data["error"] = self.error
        if self.alternatives:
            data["alternatives"] = [m.to_dict() for m in self.alternatives]
            data["version"] = self.version
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        _require(isinstance(data, dict), f"a message must be an object, found {type(data).__name__}")
        role, content = data.get("role"), data.get("content")
        _require(role in ROLES and isinstance(content, str),
                 f"a message needs a role ({', '.join(ROLES)}) and text content")
        stats, error = data.get("stats", {}), data.get("error", "")
        _require(isinstance(stats, dict) and isinstance(error, str), "a message's stats must be an object and "
                                                                     "its error a string")
        alternatives, version = data.get("alternatives", []), data.get("version", 0)
        _require(isinstance(alternatives, list) and type(version) is int and 0 <= version <= len(alternatives),
                 "a message's alternatives must be a list and its version a whole number within it")
        return cls(role, content, dict(stats), error, [cls.from_dict(m) for m in alternatives], version)


@dataclass
class Conversation:
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    title: str = "New chat"
    system_prompt: str = ""
    messages: list[Message] = field(default_factory=list)
    created_s: float = field(default_factory=time.time)      # Unix time
    updated_s: float = field(default_factory=time.time)
    titled_by_user: bool = False                              # False: the title follows the first message

    def touch(self) -> None:
        self.updated_s = time.time()

    def chat_messages(self) -> list[dict[str, str]]:
        """role/content dicts for a chat template: the system prompt (when set), then the turns."""
        turns = [{"role": m.role, "content": m.content} for m in self.messages]
        return ([{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []) + turns

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "id": self.id, "title": self.title,
                "titled_by_user": self.titled_by_user, "created_s": self.created_s, "updated_s": self.updated_s,
                "system_prompt": self.system_prompt, "messages": [m.to_dict() for m in self.messages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        """A conversation from its saved form; ConversationError names the first field that does
        not match the schema (no other exception escapes, whatever the file holds)."""
        _require(isinstance(data, dict) and data.get("format") == FORMAT, "not an Offload Studio conversation")
        version = data.get("version", 0)
        _require(type(version) is int, f"version should be a whole number, found {type(version).__name__}")
        _require(version <= FORMAT_VERSION, f"written by a newer version (format {version})")
        conversation_id = data.get("id", "")
        _require(isinstance(conversation_id, str) and ID_RE.match(conversation_id) is not None,
                 f"bad conversation id {str(conversation_id)[:40]!r}")
        for key, kind in _FIELD_TYPES.items():
            _require(key not in data or isinstance(data[key], kind) and not (kind is _NUMBER and
                                                                            isinstance(data[key], bool)),
                     f"{key} should be {_KIND_NAMES[kind]}, found {type(data.get(key)).__name__}")
        for key in ("created_s", "updated_s"):
            _require(math.isfinite(data.get(key, 0.0)), f"{key} is not a finite time")
        return cls(conversation_id, data.get("title") or "New chat", data.get("system_prompt", ""),
                   [Message.from_dict(m) for m in data.get("messages", [])], float(data.get("created_s", 0.0)),
                   float(data.get("updated_s", 0.0)), data.get("titled_by_user", False))

    def summary(self) -> ConversationSummary:
        return ConversationSummary(self.id, self.title, self.updated_s, len(self.messages))


_NUMBER = (int, float)
_FIELD_TYPES = {"title": str, "system_prompt": str, "messages": list, "created_s": _NUMBER, "updated_s": _NUMBER,
                "titled_by_user": bool}
_KIND_NAMES = {str: "a string", list: "a list", _NUMBER: "a number", bool: "true or false"}


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise ConversationError(problem)


@dataclass(frozen=True)
class ConversationSummary:
    """What the conversation list shows, without the messages."""
    id: str
    title: str
    updated_s: float
    n_messages: int


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())       # the bytes are on disk before the rename makes them the file
        os.replace(temp_name, path)
    except BaseException:
        _remove_quietly(Path(temp_name))
        raise
    _fsync_dir(path.parent)            # and the rename itself survives a power cut


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:     # Windows cannot open a folder; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class ConversationStore:
    """List, load, save, rename and delete conversations in one folder."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_conversations_dir()
        self.problems: list[str] = []       # files `list` set aside, for the user, once

    def take_problems(self) -> list[str]:
        problems, self.problems = self.problems, []
        return problems

    def path_of(self, conversation_id: str) -> Path:
        if not ID_RE.match(conversation_id):
            raise ConversationError(f"bad conversation id {conversation_id!r}")
        return self.directory / f"{conversation_id}{SUFFIX}"

    def save(self, conversation: Conversation) -> Path:
        path = self.path_of(conversation.id)
        text = json.dumps(conversation.to_dict(), ensure_ascii=False, indent=1)
        write_atomic(path, text.encode("utf-8"))
        return path

    def load(self, conversation_id: str) -> Conversation:
        path = self.path_of(conversation_id)
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise ConversationError(f"no conversation {conversation_id} in {self.directory}") from None
        except SavedFileError as e:
            raise ConversationError(str(e)) from None
        try:
            conversation = Conversation.from_dict(data)
        except ConversationError as e:
            raise ConversationError(f"{path}: {e}") from None
        if conversation.id != conversation_id:
            raise ConversationError(f"{path} holds conversation {conversation.id}, not {conversation_id}")
        return conversation

    def list(self) -> list[ConversationSummary]:
        """Every readable conversation, the most recently updated first. A file that cannot be read
        is set aside as NAME.json.bad (an earlier .bad is kept) and noted in `problems`."""
        summaries = []
        for path in self._files():
            try:
                summaries.append(self.load(path.stem).summary())
            except ConversationError as e:
                self._set_aside(path, str(e))
        return sorted(summaries, key=lambda s: s.updated_s, reverse=True)

    def _set_aside(self, path: Path, problem: str) -> None:
        try:
            kept = set_aside(path)
            note = f"A saved conversation could not be read and was kept as {kept.name}: {problem}"
        except OSError as e:
            note = f"A saved conversation could not be read ({problem}) nor set aside ({e.strerror})"
        log.warning("%s", note)
        self.problems.append(note)

    def rename(self, conversation_id: str, title: str) -> Conversation:
        conversation = self.load(conversation_id)
        conversation.title = title.strip() or conversation.title
        conversation.titled_by_user = True
        self.save(conversation)
        return conversation

    def delete(self, conversation_id: str) -> bool:
        """Remove a conversation; False when there was none."""
        try:
            self.path_of(conversation_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def remove_stale_temps(self, max_age_s: float = STALE_TEMP_AGE_S) -> int:
        """Delete temporary files that a crash left behind (older than `max_age_s`, so never one being written)."""
        if not self.directory.is_dir():
            return 0
        removed = 0
        cutoff_s = time.time() - max_age_s
        for path in self.directory.glob(f"{TEMP_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff_s:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.glob(f"*{SUFFIX}") if ID_RE.match(p.stem)]


class BackgroundWriter:
    """Runs store operations one at a time, in the order submitted, on a thread of its own.
    `on_error` is called on that thread with any exception an operation raises."""

    def __init__(self, on_error: Callable[[BaseException], None] | None = None):
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1,
                                                                       thread_name_prefix="conversations")
        self._pending: list[Future] = []
        self._on_error = on_error

    def submit(self, action: Callable[[], Any]) -> Future:
        """Queue `action`; after `close`, run it at once on the calling thread."""
        if self._executor is None:
            future: Future = Future()
            try:
                future.set_result(action())
            except Exception as e:
                future.set_exception(e)
                self._report(future)
            return future
        future = self._executor.submit(action)
        future.add_done_callback(self._report)
        self._pending = [f for f in self._pending if not f.done()] + [future]
        return future

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is done; False on a timeout."""
        if self._executor is None or all(f.done() for f in self._pending):
            return True
        marker = self._executor.submit(lambda: True)     # runs after everything before it
        try:
            return marker.result(timeout=timeout_s)
        except TimeoutError:
            return False

    def close(self) -> None:
        """Finish what is queued and stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _report(self, future: Future) -> None:
        error = future.exception()
        if error is not None and self._on_error is not None:
            self._on_error(error)
