"""The window with hostile files and saved state (offscreen): it starts, survives, shows each
problem once, escaped and capped, and its thread is free while the engine works."""
import json
import time
from pathlib import Path

import pytest
from PySide6.QtWidgets import QApplication

import app.conversations as conversations
from app.app import show_startup_problems
from app.main_window import MainWindow
from app.settings import Settings
from app.widgets import MAX_MESSAGE_CHARS, MessageBar
from gguf_bytes import rewrite_gguf

TIMEOUT_MS = 20_000


@pytest.fixture(autouse=True)
def conversations_dir(monkeypatch, tmp_path):
    folder = tmp_path / "conversations"
    monkeypatch.setattr(conversations, "default_conversations_dir", lambda: folder)
    return folder


def bad_conversation(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("a" * 32 + ".json")
    path.write_text(json.dumps({"format": "offload-studio-conversation", "version": 1, "id": "a" * 32,
                                "created_s": "yesterday", "messages": [5]}))
    return path


def test_a_bad_conversation_and_bad_state_do_not_stop_the_window(qtbot, bridge, tmp_path, conversations_dir):
    bad = bad_conversation(conversations_dir)
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"recent_files": ["/m/" + "x" * 300 + ".gguf"], "current_panel": {"a": [[[]]]}}))
    settings = Settings(tmp_path / "config" / "settings.json", state)
    window = MainWindow(bridge, settings)
    qtbot.addWidget(window)
    window.show()
    show_startup_problems(window, settings)
    text = window.message_bar.text
    assert window.message_bar.isVisible() and window.message_bar.level == MessageBar.WARNING
    assert "state.json.bad" in text and f"{bad.name}.bad" in text
    window.message_bar.dismiss()
    show_startup_problems(window, settings)         # told once
    assert not window.message_bar.isVisible()
    assert settings.recent_files == [] and bad.with_name(bad.name + ".bad").exists()


def test_startup_failure_stops_the_engine_thread(monkeypatch):
    import app.app as app_module
    import app.bridge as bridge_module
    import app.main_window as main_window_module
    started = []

    class RecordingBridge(bridge_module.Bridge):
        def start(self):
            started.append(self)
            super().start()

    def failing_window(*args, **kwargs):
        raise RuntimeError("the window could not be built")
    monkeypatch.setattr(bridge_module, "Bridge", RecordingBridge)
    monkeypatch.setattr(main_window_module, "MainWindow", failing_window)
    monkeypatch.setattr(app_module, "setup_logging", lambda: None)
    with pytest.raises(RuntimeError):
        app_module.run_app(None, None)
    assert started and not started[0].thread.isRunning()


def test_a_huge_block_count_is_shown_not_allocated(qtbot, bridge, settings, tmp_path, fixtures_dir):
    path = rewrite_gguf(fixtures_dir / "llama-dense/F32.gguf", tmp_path / "huge.gguf", {"llama.block_count": 10**9})
    window = MainWindow(bridge, settings)
    qtbot.addWidget(window)
    window.show()
    handle = window.open_model(path)
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert window.isVisible()
    notes = " ".join(window.loaded.inventory.notes) if window.loaded else window.message_bar.text
    assert "10" in notes and "layers" in notes


def test_a_huge_layer_index_is_an_error_in_the_window(qtbot, bridge, settings, tmp_path, fixtures_dir):
    path = rewrite_gguf(fixtures_dir / "llama-dense/F32.gguf", tmp_path / "idx.gguf",
                        rename_tensors={"blk.1.attn_norm.weight": "blk.1000000000.attn_norm.weight"})
    window = MainWindow(bridge, settings)
    qtbot.addWidget(window)
    window.show()
    handle = window.open_model(path)
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert window.isVisible() and window.message_bar.level == MessageBar.ERROR
    assert "blk.1000000000" in window.message_bar.text and window.loaded is None


def test_escape_sequences_in_the_name_stay_out_of_the_title(qtbot, bridge, settings, tmp_path, fixtures_dir):
    path = rewrite_gguf(fixtures_dir / "llama-dense/F32.gguf", tmp_path / "esc.gguf",
                        {"general.name": "\x1b]0;owned\x07<b>bold</b>"})
    window = MainWindow(bridge, settings)
    qtbot.addWidget(window)
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS):
        window.open_model(path)
    assert "\x1b" not in window.windowTitle() and "\\x1b]0;owned\\x07" in window.windowTitle()
    assert "\x1b" not in window.model_label.text()


def test_a_megabyte_message_is_capped(qtbot):
    bar = MessageBar()
    qtbot.addWidget(bar)
    bar.show_message("x" * 2_300_000 + "\x1b[2J")
    assert len(bar.text) < MAX_MESSAGE_CHARS + 100 and "more characters" in bar.text


def test_the_gui_thread_is_free_while_a_template_renders(qtbot):
    # the stuck render runs on another thread (as on the engine thread) and in the worker process:
    # the GUI thread's event loop keeps turning
    import threading
    from engine.text.chat_template import ChatTemplate, ChatTemplateError
    from engine.text.template_sandbox import RenderLimits
    source = "{% set a = [1] * 10000 %}{% set b = [a] * 100 %}{% set c = [b] * 100 %}{{ c|string|length }}"
    template = ChatTemplate(source, "gguf", limits=RenderLimits(max_render_s=1.0, max_value_chars=10**9))
    errors = []

    def render():
        try:
            template.render([])
        except ChatTemplateError as e:
            errors.append(e)
    worker = threading.Thread(target=render)
    worker.start()
    gaps, last = [], time.monotonic()
    while worker.is_alive():
        QApplication.processEvents()
        time.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    assert errors and errors[0].reason == "limit"
    assert max(gaps) < 1.0      # a hang guard: a blocked GUI thread would wait out the whole render
