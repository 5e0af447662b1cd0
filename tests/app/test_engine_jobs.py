"""Opening models on the engine thread: what `load_model` hands the window, and how it fails."""
from functools import partial

from app.engine_jobs import LoadedModel, load_model
from job_recorder import Recorder

TIMEOUT_MS = 10_000


def test_open_model_returns_the_model_with_progress(qtbot, bridge, moe_path):
    with qtbot.waitSignal(bridge.worker.returned, timeout=TIMEOUT_MS) as blocker:
        handle = bridge.submit(partial(load_model, moe_path), "opening")
        recorder = Recorder(handle)
    job_id, loaded = blocker.args
    assert job_id == handle.id
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == moe_path
    assert loaded.name == "fixture-llama-moe"
    assert loaded.inventory.arch == "llama"
    assert len(loaded.inventory.tensors) == 23
    assert loaded.total_bytes == sum(t.n_bytes for t in loaded.model_file.tensors.values())
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert recorder.kinds()[0] == "started"
    assert recorder.kinds()[-2:] == ["returned", "finished"]
    last_progress = recorder.of("progress")[-1]
    assert last_progress[1:3] == (2, 2)


def test_a_missing_file_is_a_one_line_error(qtbot, bridge, tmp_path):
    handle = bridge.submit(partial(load_model, tmp_path / "absent.gguf"))
    with qtbot.waitSignal(handle.errored, timeout=TIMEOUT_MS) as blocker:
        pass
    message = blocker.args[0]
    assert "absent.gguf" in message and "no such file" in message
    assert "\n" not in message
