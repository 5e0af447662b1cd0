"""CUDA graphs on both runtimes: a capture records launches and device copies without running
them, a replay runs them on whatever the captured buffers hold by then, and work that needs the
host inside a capture is refused with CaptureError (the caller's cue to launch directly)."""
from __future__ import annotations

import numpy as np
import pytest

from kernels.cuda import ops
from kernels.cuda.runtime import CaptureError


def test_capture_records_and_replay_reads_the_buffers_of_the_moment(rt, rng):
    a_host, b_host = (rng.standard_normal(300).astype(np.float32) for _ in range(2))
    a, b = rt.upload(a_host), rt.upload(b_host)
    staged = rt.alloc(300, np.float32)
    rt.begin_capture()
    rt.copy_into(staged, a)                             # device-to-device copies are part of the graph
    out = ops.add(rt, staged, b)                        # allocated during the capture: the graph's memory
    graph = rt.end_capture()
    for step in range(3):
        new_a = a_host * (step + 2)
        rt.copy_into(a, new_a)                          # the input of this step, from the host, outside the graph
        rt.replay(graph)
        np.testing.assert_array_equal(rt.download(out), new_a + b_host)


def test_capture_runs_nothing_until_replayed(emu_rt, rng):
    x = emu_rt.upload(np.ones(64, np.float32))
    emu_rt.begin_capture()
    out = ops.add(emu_rt, x, x)
    launches = emu_rt.launches
    graph = emu_rt.end_capture()
    assert launches == emu_rt.launches and not np.array_equal(out.host, np.full(64, 2, np.float32))
    emu_rt.replay(graph)
    np.testing.assert_array_equal(out.host, np.full(64, 2, np.float32))


@pytest.mark.parametrize("work", ["upload", "download", "synchronize", "copy from host", "zeros"])
def test_host_work_inside_a_capture_is_refused(rt, work):
    x = rt.upload(np.ones(8, np.float32))
    rt.begin_capture()
    with pytest.raises(CaptureError, match="cannot be part of a CUDA graph"):
        {"upload": lambda: rt.upload(np.ones(8, np.float32)), "download": lambda: rt.download(x),
         "synchronize": rt.synchronize, "copy from host": lambda: rt.copy_into(x, np.zeros(8, np.float32)),
         "zeros": lambda: rt.zeros(8, np.float32)}[work]()
    rt.abort_capture()
    assert not rt.capturing
    np.testing.assert_array_equal(rt.download(ops.add(rt, x, x)), np.full(8, 2, np.float32))   # usable again


def test_capture_does_not_nest(emu_rt):
    emu_rt.begin_capture()
    with pytest.raises(CaptureError):
        emu_rt.begin_capture()
    emu_rt.end_capture()
    with pytest.raises(CaptureError):
        emu_rt.end_capture()
