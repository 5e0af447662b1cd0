import threading
import time

import pytest
from PySide6.QtCore import QThread

from app.bridge import Bridge, JobCancelled, error_message
from job_recorder import Recorder

TIMEOUT_MS = 10_000


def run(qtbot, bridge: Bridge, job, description: str = "") -> Recorder:
    handle = bridge.submit(job, description)
    recorder = Recorder(handle)
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    return recorder


def test_an_erroring_job_is_reported_and_the_worker_keeps_working(qtbot, bridge):
    def broken(ctx):
        raise RuntimeError("boom\nsecond line")

    recorder = run(qtbot, bridge, broken)
    assert recorder.kinds() == ["started", "errored", "finished"]
    assert recorder.of("errored")[0][1] == "RuntimeError: boom"

    recorder = run(qtbot, bridge, lambda ctx: 6 * 7)
    assert recorder.kinds() == ["started", "returned", "finished"]
    assert recorder.of("returned")[0][1] == 42


def test_jobs_run_on_the_engine_thread_not_the_gui_thread(qtbot, bridge):
    gui_thread = QThread.currentThread()
    recorder = run(qtbot, bridge, lambda ctx: QThread.currentThread())
    engine_thread = recorder.of("returned")[0][1]
    assert engine_thread is not gui_thread
    assert engine_thread.objectName() == "engine"


def test_iterator_items_are_yielded_and_its_return_value_returned(qtbot, bridge):
    def counting(ctx):
        for i in range(5):
            yield i * i
        return "done"

    recorder = run(qtbot, bridge, counting)
    assert [e[1] for e in recorder.of("yielded")] == [0, 1, 4, 9, 16]
    assert recorder.kinds()[-2:] == ["returned", "finished"]
    assert recorder.of("returned")[0][1] == "done"


def test_a_long_job_cancelled_midway_emits_cancelled(qtbot, bridge):
    cleaned_up = threading.Event()

    def slow(ctx):
        try:
            for i in range(1000):
                time.sleep(0.005)
                yield i
        finally:
            cleaned_up.set()

    handle = bridge.submit(slow)
    recorder = Recorder(handle)
    qtbot.waitUntil(lambda: len(recorder.of("yielded")) >= 3, timeout=TIMEOUT_MS)
    with qtbot.waitSignal(handle.cancelled, timeout=TIMEOUT_MS):
        bridge.cancel(handle.id)
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert 3 <= len(recorder.of("yielded")) < 1000
    assert "returned" not in recorder.kinds()
    assert recorder.kinds()[-2:] == ["cancelled", "finished"]
    assert cleaned_up.is_set()      # the generator was closed, its finally ran


def test_a_job_checking_its_context_stops_when_cancelled(qtbot, bridge):
    steps = []

    def polling(ctx):
        for i in range(10_000):
            ctx.check_cancelled()
            steps.append(i)
            time.sleep(0.002)
        return "finished every step"

    handle = bridge.submit(polling)
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=TIMEOUT_MS)
    with qtbot.waitSignal(handle.cancelled, timeout=TIMEOUT_MS):
        handle.cancel()
    assert len(steps) < 10_000


def test_a_job_cancelled_while_queued_never_runs(qtbot, bridge):
    release = threading.Event()
    ran = []
    blocker_handle = bridge.submit(lambda ctx: release.wait(TIMEOUT_MS / 1000))
    queued = bridge.submit(lambda ctx: ran.append(True))
    recorder = Recorder(queued)
    queued.cancel()
    release.set()
    qtbot.waitUntil(lambda: queued.done and blocker_handle.done, timeout=TIMEOUT_MS)
    assert ran == []
    assert recorder.kinds() == ["started", "cancelled", "finished"]


def test_progress_is_throttled_but_keeps_the_last_step_and_64_bit_counts(qtbot, bridge):
    total_bytes = 20_000 << 30      # ~20 TiB: past a 32-bit int

    def chatty(ctx):
        for done in range(0, 20_001, 1):
            ctx.progress(done * (total_bytes // 20_000), total_bytes, "copying")

    recorder = run(qtbot, bridge, chatty)
    progress = recorder.of("progress")
    assert 1 <= len(progress) < 200
    assert progress[-1][1:3] == (total_bytes, total_bytes)


def test_a_user_error_raised_by_the_engine_keeps_its_own_message():
    from engine.gguf.model_file import ModelFileError
    assert error_message(ModelFileError("/m.gguf", "truncated header")) == "/m.gguf: truncated header"
    assert error_message(KeyError("x")) == "KeyError: 'x'"
    assert error_message(JobCancelled()) == "JobCancelled"


def test_shutdown_stops_a_running_job(qtbot):
    bridge = Bridge()
    bridge.start()

    def endless(ctx):
        while True:
            time.sleep(0.005)
            yield None

    handle = bridge.submit(endless)
    recorder = Recorder(handle)
    qtbot.waitUntil(lambda: bool(recorder.of("yielded")), timeout=TIMEOUT_MS)
    start_s = time.monotonic()
    assert bridge.shutdown()
    assert time.monotonic() - start_s < 2
    assert not bridge.thread.isRunning()
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert recorder.kinds()[-2:] == ["cancelled", "finished"]


@pytest.mark.slow      # compiles the CPU kernels when Numba's cache is cold (about a minute, once)
def test_cancel_in_mid_generation_on_a_tiny_model(qtbot, bridge, moe_path, fixtures_dir):
    import numpy as np

    from engine.run.model import Model
    prompt = np.load(fixtures_dir / "llama-moe" / "tokens.npy")[:8]
    max_tokens = 40

    def greedy(ctx):
        model = Model.load(moe_path)
        cache = model.new_cache(64)
        logits = model.eval_logits(prompt, cache, last_only=True)
        for _ in range(max_tokens):
            token = int(logits[-1].argmax())
            yield token
            logits = model.eval_logits(np.array([token]), cache, last_only=True)

    handle = bridge.submit(greedy)
    recorder = Recorder(handle)
    qtbot.waitUntil(lambda: len(recorder.of("yielded")) >= 2, timeout=180_000)
    with qtbot.waitSignal(handle.cancelled, timeout=TIMEOUT_MS):
        handle.cancel()
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    tokens = [e[1] for e in recorder.of("yielded")]
    assert 2 <= len(tokens) < max_tokens
    assert recorder.kinds()[-2:] == ["cancelled", "finished"]

    reference = Model.load(moe_path)        # the same steps on this thread give the same tokens
    cache = reference.new_cache(64)
    first = int(reference.eval_logits(prompt, cache, last_only=True)[-1].argmax())
    second = int(reference.eval_logits(np.array([first]), cache, last_only=True)[-1].argmax())
    assert tokens[:2] == [first, second]
