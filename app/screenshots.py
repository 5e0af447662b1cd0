"""PNG screenshots of the main window, one per panel, rendered without a display.

    python -m app.screenshots OUT_DIR [MODEL.gguf] [--sim-gpus 24GiB,12GiB] [--run-model GGUF]

The designer and inspector show MODEL; with --run-model, the chat and perplexity panels show a
real conversation and a real perplexity run of that (runnable) model.

Everything runs in a temporary profile: the demo conversation, the remembered plans and the
settings go to a folder that is deleted afterwards, never to the user's own (their saved
conversations are neither listed in the pictures nor changed).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

WINDOW_SIZE = (1280, 800)          # a 1280x800 screen: the smallest the window must fit
LOAD_TIMEOUT_MS = 120_000
SETTLE_ROUNDS = 5


def _wait_for(handle, timeout_ms: int) -> None:
    """Run the event loop until a job finishes; raise with its message if it failed."""
    from PySide6.QtCore import QEventLoop, QTimer
    errors: list[str] = []
    handle.errored.connect(errors.append)
    if not handle.done:
        loop = QEventLoop()
        handle.finished.connect(loop.quit)
        QTimer.singleShot(timeout_ms, loop.quit)
        loop.exec()
    if errors:
        raise RuntimeError(errors[0])
    if not handle.done:
        raise TimeoutError(f"{handle.description} did not finish within {timeout_ms / 1000:.0f} s")


def _settle(application) -> None:
    """Let polish, layout and paint events run: a tab shown for the first time needs a few rounds."""
    for _ in range(SETTLE_ROUNDS):
        application.processEvents()


CHAT_PROMPT = "Write one sentence about the sea."
PPL_TEXT_FILE = Path("/usr/share/common-licenses/GPL-3")
PPL_FALLBACK_TEXT = " ".join(["Offload Studio places every layer and every expert of a model on a device."] * 400)
RUN_TIMEOUT_MS = 600_000


def _wait_signal(signal, timeout_ms: int) -> None:
    from PySide6.QtCore import QEventLoop, QTimer
    loop = QEventLoop()
    signal.connect(loop.quit)
    QTimer.singleShot(timeout_ms, loop.quit)
    loop.exec()


def _run_chat(window, model: str | Path) -> None:
    """A real chat turn, so the screenshot shows the engine at work."""
    _wait_for(window.open_model(model), LOAD_TIMEOUT_MS)
    window.chat.sampling.temperature.setValue(0.0)
    window.chat.sampling.max_tokens.setValue(48)
    # a base model (the built-in Gemma 3 270M) continues text: give it the start of one
    from app.widgets.chat import COMPLETION_PROMPT
    prompt = COMPLETION_PROMPT if window.chat.base_model_open else CHAT_PROMPT
    if window.chat.send(prompt):
        _wait_signal(window.chat.turn_finished, RUN_TIMEOUT_MS)


def _run_perplexity(window, model: str | Path) -> None:
    """A real perplexity run over a short text."""
    _wait_for(window.open_model(model), LOAD_TIMEOUT_MS)
    text = PPL_TEXT_FILE.read_text() if PPL_TEXT_FILE.exists() else PPL_FALLBACK_TEXT
    window.perplexity.set_text(text[:12000])
    window.perplexity.n_ctx_spin.setValue(256)
    window.perplexity.n_chunks_spin.setValue(6)
    if window.perplexity.run() is not None:
        _wait_signal(window.perplexity.run_finished, RUN_TIMEOUT_MS)


@contextmanager
def temporary_profile(root: Path):
    """Point the app's data and config folders (conversations, remembered plans) at `root`."""
    import app.conversations as conversations
    import app.designer_state as designer_state
    saved = conversations.default_conversations_dir, designer_state.default_state_dir
    conversations.default_conversations_dir = lambda: root / "conversations"
    designer_state.default_state_dir = lambda: root / "placements"
    try:
        yield root
    finally:
        conversations.default_conversations_dir, designer_state.default_state_dir = saved


def render_screenshots(out_dir: str | Path, model_path: str | Path | None,
                       sim_gpus: str | None = None, run_model: str | Path | None = None,
                       chat_model: str | Path | None = None) -> list[Path]:
    """Open the main window offscreen on a model (the built-in one when None) and save one PNG per panel.

    With `run_model`, the chat and perplexity panels run it for real before their PNGs are taken;
    `chat_model` (an instruction-tuned model) replaces it for the chat panel."""
    if not os.environ.get("QT_QPA_PLATFORM"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtWidgets import QApplication

    from app.app import make_application
    from app.bridge import Bridge
    from app.main_window import MainWindow
    from app.settings import Settings
    from engine.devices import available_devices

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_application()
    bridge = Bridge()
    bridge.start()
    saved: list[Path] = []
    with tempfile.TemporaryDirectory() as state_dir, temporary_profile(Path(state_dir)):
        settings = Settings(Path(state_dir) / "settings.json", Path(state_dir) / "state.json")
        window = MainWindow(bridge, settings)
        try:
            window.resize(*WINDOW_SIZE)
            window.show()
            window.set_devices(available_devices(sim_gpus))
            handle = window.open_model(model_path) if model_path else window.open_default_model()
            _wait_for(handle, LOAD_TIMEOUT_MS)
            names = window.panel_names()
            shown_first = names if run_model is None else [n for n in names if n not in ("Chat", "Perplexity")]
            for name in shown_first:
                saved.append(_grab(window, QApplication, out_dir, names.index(name), name))
            if run_model is not None:
                _run_chat(window, chat_model or run_model)
                saved.append(_grab(window, QApplication, out_dir, names.index("Chat"), "Chat"))
                _run_perplexity(window, run_model)
                saved.append(_grab(window, QApplication, out_dir, names.index("Perplexity"), "Perplexity"))
        finally:
            window.close()
            window.deleteLater()
            bridge.shutdown()
    return saved


def _grab(window, application, out_dir: Path, index: int, name: str) -> Path:
    window.show_panel(name)
    _settle(application)
    path = out_dir / f"{index + 1:02d}-{name.lower()}.png"
    if not window.grab().save(str(path)):
        raise OSError(f"could not write {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("model", nargs="?", help="GGUF file (default: the built-in model)")
    parser.add_argument("--sim-gpus", help="simulated GPUs, e.g. 24GiB,12GiB")
    parser.add_argument("--run-model", help="runnable GGUF for the chat and perplexity screenshots")
    args = parser.parse_args(argv)
    for path in render_screenshots(args.out_dir, args.model, args.sim_gpus, args.run_model):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
