"""Which kernels Numba is compiling now: the progress source behind "Preparing CPU kernels".

Every CPU kernel is `@njit(cache=True)`. On a machine whose cache is cold (a fresh install,
another OFFLOAD_STUDIO_CPU_ISA, a new version) the first model run compiles them: about a minute
before a first Gemma token, with nothing else to show for it. Numba broadcasts a
"numba:compile" event around each compilation (`numba.core.event`) and none around a load from
its cache (`Dispatcher.compile` returns a cache hit before it triggers the event), so the events
count real compiles only. A kernel's callees compile inside its own event (nested events): the
outermost one is the kernel the engine called; every event counts. Numba's own helpers (the
array constructor behind `carray`, say) compile in every process, cache or not: they are not
this machine's first run, so they neither count nor show.

Numba's listeners are process-wide; a `CompileCounter` counts only the thread that made it
(the app's engine thread, a command's main thread), so a compile elsewhere is not reported as
this job's. This module sits outside `kernels.cpu` so that importing it costs Numba alone, not
every kernel module (the app's bridge imports it on the engine thread's first job).

    counting_compiles(report) -> context manager yielding a CompileCounter
        report(CompileProgress) on each compile's start and at the outermost one's end.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from numba.core import event

COMPILE_EVENT = "numba:compile"


@dataclass(frozen=True)
class CompileProgress:
    compiled: int       # functions compiled so far (callees included), the open ones not yet
    current: str        # the outermost kernel being compiled now; "" between kernels

    @property
    def active(self) -> bool:
        return bool(self.current)

    def describe(self) -> str:
        now = f", now {self.current}" if self.current else ""
        return f"{self.compiled} compiled{now}"


def kernel_name(compile_event: event.Event) -> str | None:
    """The compiled function's name; None for Numba's own helpers."""
    function = compile_event.data["dispatcher"].py_func
    return None if function.__module__.startswith("numba.") else function.__name__


class CompileCounter(event.Listener):
    """Counts the compiles on the thread that made it and reports each step to `report`."""

    def __init__(self, report: Callable[[CompileProgress], None] = lambda progress: None):
        self._thread = threading.get_ident()
        self._report = report
        self._open: list[str] = []      # the functions whose compiles are open, outermost first
        self.compiled = 0

    @property
    def progress(self) -> CompileProgress:
        return CompileProgress(self.compiled, self._open[0] if self._open else "")

    def _counts(self, compile_event: event.Event) -> bool:
        return threading.get_ident() == self._thread and kernel_name(compile_event) is not None

    def on_start(self, compile_event: event.Event) -> None:
        if self._counts(compile_event):
            self._open.append(kernel_name(compile_event))
            self._report(self.progress)

    def on_end(self, compile_event: event.Event) -> None:
        if not self._counts(compile_event) or not self._open:
            return
        self._open.pop()
        self.compiled += 1
        if not self._open:
            self._report(self.progress)


@contextmanager
def counting_compiles(report: Callable[[CompileProgress], None] = lambda progress: None) -> Iterator[CompileCounter]:
    """Count (and report) the kernels compiled on this thread inside the block."""
    counter = CompileCounter(report)
    with event.install_listener(COMPILE_EVENT, counter):
        yield counter
