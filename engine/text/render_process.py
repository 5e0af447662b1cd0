"""Rendering an untrusted chat template in a process of its own, so that a limit really stops it.

The sandbox (engine.text.template_sandbox) checks time, sizes and memory between template
operations, but one operation can run long inside C: `([[1]*10]*100000)|sum(start=[])` copies
lists quadratically in one call, holds the GIL all the while (the window freezes) and cannot be
interrupted from another thread. So GGUF templates render in a worker process: the caller waits
at most the time limit, then kills the worker (a fresh one starts on the next render) and gets a
"limit" error. The worker's address space is capped too, so a render cannot take the machine's
memory. The worker renders with the same sandbox and limits; its errors come back as
(reason, problem, line) and become the same ChatTemplateError as an in-process render.
"""
from __future__ import annotations

import multiprocessing
import sys
import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator

from engine.text.template_sandbox import RenderLimits

START_TIMEOUT_S = 30.0           # a cold start imports jinja2 (and the machine may be busy)
WORKER_MEMORY_BYTES = 4 << 30    # address space of the worker (RLIMIT_AS); far above any real prompt


class RenderTimeout(Exception):
    pass


class RenderFailed(Exception):
    """The worker's error: `reason`, `problem` and `line` as in ChatTemplateError."""

    def __init__(self, reason: str, problem: str, line: int | None):
        super().__init__(problem)
        self.reason, self.problem, self.line = reason, problem, line


def _worker_main(conn, memory_bytes: int) -> None:
    """The worker: render requests until the pipe closes."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):
        pass        # not on this platform: the sandbox's own memory checks remain
    from engine.text.chat_template import render_in_this_process
    conn.send(("ready",))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        conn.send(render_in_this_process(*request))


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Spawn re-runs the parent's main *script* in the child unless it sits behind an
    `if __name__ == "__main__"` guard; the worker needs nothing from it, so the script's path is
    hidden while the worker starts (a main module run with -m is imported by name, harmlessly)."""
    main = sys.modules.get("__main__")
    hide = main is not None and getattr(main, "__spec__", None) is None and hasattr(main, "__file__")
    saved = main.__dict__.pop("__file__") if hide else None
    try:
        yield
    finally:
        if hide:
            main.__file__ = saved


class RenderWorker:
    """One worker process, started on first use and again after it was killed."""

    def __init__(self, memory_bytes: int = WORKER_MEMORY_BYTES):
        self.memory_bytes = memory_bytes
        self._lock = threading.Lock()
        self._process = None
        self._conn = None

    def render(self, source: str, name: str, variables: dict[str, Any], limits: RenderLimits, now: datetime) -> str:
        with self._lock:        # one render at a time: the pipe carries one conversation
            conn = self._ensure_started()
            conn.send((source, name, variables, limits, now))
            # the sandbox's own limit fires first for a template that runs Python code; the
            # margin is for one that sits in a C call
            if not conn.poll(limits.max_render_s + 1.0):
                self._stop()
                raise RenderTimeout(f"rendering took longer than {limits.max_render_s:g} s")
            try:
                status, *payload = conn.recv()
            except (EOFError, OSError):
                self._stop()            # the worker died (out of memory, a signal)
                raise RenderFailed("limit", "render limit reached: the renderer ran out of memory", None) from None
        if status == "ok":
            return payload[0]
        raise RenderFailed(*payload)

    def _ensure_started(self):
        if self._process is not None and self._process.is_alive():
            return self._conn
        self._stop()
        context = multiprocessing.get_context("spawn")      # no fork of a process with threads (Qt, numba)
        parent_conn, child_conn = context.Pipe()
        process = context.Process(target=_worker_main, args=(child_conn, self.memory_bytes), daemon=True,
                                  name="chat-template-renderer")
        with _main_script_hidden():
            process.start()
        child_conn.close()
        if not parent_conn.poll(START_TIMEOUT_S):
            process.kill()
            raise RenderFailed("error", "the template renderer did not start", None)
        parent_conn.recv()
        self._process, self._conn = process, parent_conn
        return parent_conn

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None

    def close(self) -> None:
        with self._lock:
            self._stop()


WORKER = RenderWorker()
