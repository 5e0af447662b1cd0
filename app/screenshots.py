"""PNG screenshots of the main window, one per panel, rendered without a display.

    python -m app.screenshots OUT_DIR [MODEL.gguf] [--sim-gpus 24GiB,12GiB]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

WINDOW_SIZE = (1360, 860)
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


def render_screenshots(out_dir: str | Path, model_path: str | Path | None,
                       sim_gpus: str | None = None) -> list[Path]:
    """Open the main window offscreen on a model (the built-in one when None) and save one PNG per panel."""
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
    with tempfile.TemporaryDirectory() as state_dir:     # never touch the user's recent files
        settings = Settings(Path(state_dir) / "settings.json", Path(state_dir) / "state.json")
        window = MainWindow(bridge, settings)
        try:
            window.resize(*WINDOW_SIZE)
            window.show()
            window.set_devices(available_devices(sim_gpus))
            handle = window.open_model(model_path) if model_path else window.open_default_model()
            _wait_for(handle, LOAD_TIMEOUT_MS)
            for index, name in enumerate(window.panel_names()):
                window.show_panel(name)
                _settle(QApplication)
                path = out_dir / f"{index + 1:02d}-{name.lower()}.png"
                if not window.grab().save(str(path)):
                    raise OSError(f"could not write {path}")
                saved.append(path)
        finally:
            window.close()
            window.deleteLater()
            bridge.shutdown()
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("model", nargs="?", help="GGUF file (default: the built-in model)")
    parser.add_argument("--sim-gpus", help="simulated GPUs, e.g. 24GiB,12GiB")
    args = parser.parse_args(argv)
    for path in render_screenshots(args.out_dir, args.model, args.sim_gpus):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
