"""The only road between the GUI thread and the engine: one long-lived worker on its own thread.

Requests go in as queued signals; results come out as signals carrying immutable payloads. Every
job emits, in order:

    started(job_id)
    progress(job_id, done, total, text)* and yielded(job_id, event)*   (total 0: size unknown)
    returned(job_id, result) | errored(job_id, message) | cancelled(job_id)
    finished(job_id)

and, whenever the job makes Numba compile kernels (a cold cache: a fresh install, the first run),
compiling(job_id, CompileProgress) as each compile starts and as the outermost one ends.

A job is a callable taking a `JobContext`. It may return a value (-> `returned`) or an iterator,
whose items become `yielded` and whose return value becomes `returned`. Cancelling sets the job's
`threading.Event`: the worker checks it between items, and long engine calls take
`ctx.cancel_event` and check it between their own steps. A queued "cancel" slot could not work
here: it would wait behind the very job it is meant to stop.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

from engine.errors import user_error_message

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.05      # at most ~20 progress signals a second per job: the GUI repaints, not floods
SHUTDOWN_WAIT_MS = 5000         # a job that checks its cancel flag stops well within this
SHUTDOWN_GRACE_MS = 30_000      # one that does not (a bug) gets this much more before we give up on it


class JobCancelled(Exception):
    """Raised inside a job (by `JobContext.check_cancelled`) to stop it where it stands."""


class JobContext:
    """What a running job sees: its cancel flag and a throttled progress reporter."""

    def __init__(self, job_id: int, cancel_event: threading.Event, report: Callable[[int, int, int, str], None]):
        self.job_id = job_id
        self.cancel_event = cancel_event
        self._report = report
        self._last_report_s = 0.0

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise JobCancelled()

    def progress(self, done: int, total: int, text: str = "") -> None:
        """Report progress; calls closer together than PROGRESS_INTERVAL_S are dropped, except the last step."""
        now = time.monotonic()
        if now - self._last_report_s < PROGRESS_INTERVAL_S and not (total and done >= total):
            return
        self._last_report_s = now
        self._report(self.job_id, int(done), int(total), text)

    def note(self, text: str) -> None:
        """A step of unknown length: a busy indicator with this text."""
        self._last_report_s = 0.0
        self.progress(0, 0, text)


Job = Callable[[JobContext], Any]


def error_message(error: BaseException) -> str:
    """One line for the window: the user-facing message, or `TypeName: message` for a bug."""
    message = user_error_message(error)
    if message is None:
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return message.splitlines()[0] if message else type(error).__name__


class EngineWorker(QObject):
    """Runs jobs one after another on the engine thread. Lives on that thread for its whole life."""

    started = Signal(int)
    progress = Signal(int, "qint64", "qint64", str)     # job_id, done, total, text; 64-bit: byte counts
    yielded = Signal(int, object)
    returned = Signal(int, object)
    errored = Signal(int, str)
    cancelled = Signal(int)
    finished = Signal(int)
    compiling = Signal(int, object)     # job_id, kernels.compile_progress.CompileProgress

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._cancel_events: dict[int, threading.Event] = {}
        self.compiling_now = False      # a Numba compile is open on the engine thread (it cannot be interrupted)

    def cancel_event(self, job_id: int) -> threading.Event:
        """The job's flag, created on first ask: a job cancelled while still queued never runs."""
        with self._lock:
            return self._cancel_events.setdefault(job_id, threading.Event())

    def request_cancel(self, job_id: int) -> None:
        """Thread-safe, called directly (not queued) from the GUI thread; a finished job is ignored."""
        with self._lock:
            event = self._cancel_events.get(job_id)
        if event is not None:
            event.set()

    def cancel_all(self) -> None:
        with self._lock:
            for event in self._cancel_events.values():
                event.set()

    @Slot(int, object)
    def run_job(self, job_id: int, job: Job) -> None:
        from kernels.compile_progress import counting_compiles     # Numba: here, not at the window's start
        event = self.cancel_event(job_id)
        self.started.emit(job_id)
        try:
            if event.is_set():
                raise JobCancelled()
            ctx = JobContext(job_id, event, self.progress.emit)
            with counting_compiles(partial(self._report_compile, job_id)):
                result = job(ctx)
                if isinstance(result, Iterator):
                    result = self._drain(job_id, result, event)
            if event.is_set():
                raise JobCancelled()
            self.returned.emit(job_id, result)
        except JobCancelled:
            self.cancelled.emit(job_id)
        except Exception as error:     # the engine thread survives any job; the GUI shows one line
            message = error_message(error)
            if user_error_message(error) is None:
                log.error("job %d failed:\n%s", job_id, traceback.format_exc())
            else:
                log.info("job %d: %s", job_id, message)
            self.errored.emit(job_id, message)
        finally:
            with self._lock:
                self._cancel_events.pop(job_id, None)
            self.finished.emit(job_id)

    def _report_compile(self, job_id: int, progress) -> None:
        self.compiling_now = progress.active
        self.compiling.emit(job_id, progress)

    def _drain(self, job_id: int, items: Iterator, event: threading.Event) -> Any:
        """Emit each item of an engine iterator; stop between items once cancelled."""
        try:
            while True:
                if event.is_set():
                    raise JobCancelled()
                try:
                    item = next(items)
                except StopIteration as stop:
                    return stop.value
                self.yielded.emit(job_id, item)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()     # runs the generator's own cleanup (finally blocks) on this thread


class JobHandle(QObject):
    """The GUI-side view of one job: the worker's signals for this job only, without the id."""

    started = Signal()
    progress = Signal("qint64", "qint64", str)
    yielded = Signal(object)
    returned = Signal(object)
    errored = Signal(str)
    cancelled = Signal()
    finished = Signal()
    compiling = Signal(object)

    def __init__(self, job_id: int, bridge: Bridge, description: str = ""):
        super().__init__()
        self.id = job_id
        self.description = description
        self._bridge = bridge
        self.done = False

    def cancel(self) -> None:
        self._bridge.cancel(self.id)


class Bridge(QObject):
    """Owns the engine thread and its worker; what the window and the panels talk to.

    `submit(job)` returns a `JobHandle`; the worker's own signals (with job ids) are on `worker`.
    """

    _run_requested = Signal(int, object)
    compiling = Signal(object, object)      # JobHandle, CompileProgress: any job's compiles, for the status bar

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._handles: dict[int, JobHandle] = {}
        self.thread = QThread()
        self.thread.setObjectName("engine")
        self.worker = EngineWorker()
        self.worker.moveToThread(self.thread)
        self._run_requested.connect(self.worker.run_job)
        # Bound slots of this GUI-thread object, not lambdas: a lambda has no thread of its own
        # and would run on the engine thread.
        self.worker.started.connect(self._on_started)
        self.worker.progress.connect(self._on_progress)
        self.worker.yielded.connect(self._on_yielded)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.cancelled.connect(self._on_cancelled)
        self.worker.finished.connect(self._on_finished)
        self.worker.compiling.connect(self._on_compiling)

    def start(self) -> None:
        if not self.thread.isRunning():
            self.thread.start()

    def shutdown(self) -> bool:
        """Cancel everything, stop the thread; False if a job did not stop in time."""
        if not self.thread.isRunning():
            return True
        self.worker.cancel_all()
        self.thread.quit()
        if self.thread.wait(SHUTDOWN_WAIT_MS):
            return True
        if self.worker.compiling_now:
            log.warning("closing while Numba compiles a kernel, which cannot be interrupted; the compile is dropped")
            return False
        log.warning("a job ignores cancellation; waiting up to %d s more for the engine thread",
                    SHUTDOWN_GRACE_MS // 1000)
        return self.thread.wait(SHUTDOWN_GRACE_MS)

    def submit(self, job: Job, description: str = "") -> JobHandle:
        job_id = next(self._ids)
        handle = JobHandle(job_id, self, description)
        self._handles[job_id] = handle
        self.worker.cancel_event(job_id)       # exists before the job is queued, so cancel works at once
        self._run_requested.emit(job_id, job)
        return handle

    def cancel(self, job_id: int) -> None:
        self.worker.request_cancel(job_id)

    def is_busy(self) -> bool:
        return bool(self._handles)

    @Slot(int)
    def _on_started(self, job_id: int) -> None:
        if handle := self._handles.get(job_id):
            handle.started.emit()

    @Slot(int, "qint64", "qint64", str)
    def _on_progress(self, job_id: int, done: int, total: int, text: str) -> None:
        if handle := self._handles.get(job_id):
            handle.progress.emit(done, total, text)

    @Slot(int, object)
    def _on_yielded(self, job_id: int, item: object) -> None:
        if handle := self._handles.get(job_id):
            handle.yielded.emit(item)

    @Slot(int, object)
    def _on_returned(self, job_id: int, result: object) -> None:
        if handle := self._handles.get(job_id):
            handle.returned.emit(result)

    @Slot(int, str)
    def _on_errored(self, job_id: int, message: str) -> None:
        if handle := self._handles.get(job_id):
            handle.errored.emit(message)

    @Slot(int)
    def _on_cancelled(self, job_id: int) -> None:
        if handle := self._handles.get(job_id):
            handle.cancelled.emit()

    @Slot(int, object)
    def _on_compiling(self, job_id: int, progress: object) -> None:
        if handle := self._handles.get(job_id):
            handle.compiling.emit(progress)
            self.compiling.emit(handle, progress)

    @Slot(int)
    def _on_finished(self, job_id: int) -> None:
        handle = self._handles.pop(job_id, None)
        if handle is not None:
            handle.done = True
            handle.finished.emit()
