"""Compiling the CPU kernels in the window: the status bar counts them while a job compiles, the
chat's warm-up runs on the engine thread, and a prompt sent meanwhile waits its turn and is answered.

Compiles are Numba's own "numba:compile" events, raised here around a held gate, so nothing
depends on how long a real compile takes."""
import threading
from types import SimpleNamespace

import pytest
from numba.core import event

from app.main_window import MainWindow
from chat_support import TURN_TIMEOUT_MS
from engine.run.sampling import SamplerSettings

TIMEOUT_MS = 10_000
GATE_TIMEOUT_S = 60     # a guard against a hung test, never reached when it passes
PREPARING = "Preparing CPU kernels for this machine (first run): "


def qmatmul_kernel():
    """Stands for the kernel being compiled: the compile events name it."""


FAKE_DISPATCHER = SimpleNamespace(py_func=qmatmul_kernel)


def compiles_then_waits(gates: list[threading.Event]):
    """A job that compiles one kernel per gate but the last, each until its gate opens, then
    waits (not compiling) for the last."""
    def job(ctx):
        for gate in gates[:-1]:
            with event.trigger_event("numba:compile", data={"dispatcher": FAKE_DISPATCHER}):
                assert gate.wait(GATE_TIMEOUT_S)
        assert gates[-1].wait(GATE_TIMEOUT_S)
    return job


@pytest.fixture
def window(qtbot, bridge, settings):
    window = MainWindow(bridge, settings)
    qtbot.addWidget(window)
    return window


def status_shows(window, text: str) -> bool:
    return window.job_label.isVisibleTo(window) and window.job_label.text() == text


def test_the_status_bar_counts_the_kernels_of_a_compiling_job_and_clears_after(qtbot, bridge, window):
    gates = [threading.Event() for _ in range(3)]
    handle = bridge.submit(compiles_then_waits(gates), "preparing the chat model")
    qtbot.waitUntil(lambda: status_shows(window, PREPARING + "0 compiled, now qmatmul_kernel"), timeout=TIMEOUT_MS)
    gates[0].set()
    qtbot.waitUntil(lambda: status_shows(window, PREPARING + "1 compiled, now qmatmul_kernel"), timeout=TIMEOUT_MS)
    gates[1].set()      # the compiles are over; the job goes on
    qtbot.waitUntil(lambda: not window.job_label.isVisibleTo(window), timeout=TIMEOUT_MS)
    assert not handle.done
    gates[2].set()
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert not window.job_label.isVisibleTo(window)


def test_a_tracked_job_gets_its_own_line_back_after_its_compiles(qtbot, bridge, window):
    gates = [threading.Event() for _ in range(2)]
    handle = bridge.submit(compiles_then_waits(gates), "perplexity")
    window.track_job(handle, "Measuring perplexity…")
    qtbot.waitUntil(lambda: status_shows(window, PREPARING + "0 compiled, now qmatmul_kernel"), timeout=TIMEOUT_MS)
    gates[0].set()
    qtbot.waitUntil(lambda: status_shows(window, "Measuring perplexity…"), timeout=TIMEOUT_MS)
    window.cancel_tracked_job()
    gates[1].set()
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert not window.job_label.isVisibleTo(window)


@pytest.fixture
def held_warm_up(monkeypatch):
    """The kernel cache counts as cold, and each warm-up compiles a kernel until `release` is set."""
    from engine.run import warmup
    real_warm_up = warmup.warm_up
    held = SimpleNamespace(started=threading.Event(), release=threading.Event(), threads=[])

    def warm_up(model, check_cancelled=None, report=lambda progress: None):
        from PySide6.QtCore import QThread
        held.threads.append(QThread.currentThread())
        with event.trigger_event("numba:compile", data={"dispatcher": FAKE_DISPATCHER}):   # as a cold cache would
            held.started.set()
            assert held.release.wait(GATE_TIMEOUT_S)
        return real_warm_up(model, check_cancelled, report)

    monkeypatch.setattr(warmup, "is_warm", lambda model_file, run_config: False)
    monkeypatch.setattr(warmup, "warm_up", warm_up)
    return held


def test_the_warm_up_runs_on_the_engine_thread_and_a_prompt_sent_meanwhile_is_answered(
        qtbot, bridge, controller, held_warm_up):
    statuses = []
    controller.status_changed.connect(statuses.append)
    prepare = controller.prepare()
    qtbot.waitUntil(held_warm_up.started.is_set, timeout=TIMEOUT_MS)
    assert controller.send("Hello", SamplerSettings(temperature=0.0), 4)    # queued behind the warm-up
    assert not prepare.done
    with qtbot.waitSignal(controller.turn_finished, timeout=TURN_TIMEOUT_MS) as finished:
        held_warm_up.release.set()
    assert finished.args == ["length"]
    assert prepare.done
    assert held_warm_up.threads == [bridge.thread]      # once: the turn used the prepared session
    assert controller.messages.message(1).content
    assert PREPARING + "0 compiled, now qmatmul_kernel" in statuses     # the held compile, the first


def test_a_cancelled_warm_up_leaves_the_chat_working(qtbot, bridge, controller, held_warm_up):
    prepare = controller.prepare()
    qtbot.waitUntil(held_warm_up.started.is_set, timeout=TIMEOUT_MS)
    with qtbot.waitSignal(prepare.cancelled, timeout=TIMEOUT_MS):
        prepare.cancel()
        held_warm_up.release.set()
    with qtbot.waitSignal(controller.turn_finished, timeout=TURN_TIMEOUT_MS) as finished:
        assert controller.send("Hello", SamplerSettings(temperature=0.0), 4)
    assert finished.args == ["length"]
    assert len(held_warm_up.threads) == 2       # the turn warmed up again: the cache is still cold
