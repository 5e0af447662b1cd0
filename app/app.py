"""Starting the desktop app: QApplication, style, logging, the engine thread and the main window."""
from __future__ import annotations

import ctypes.util
import logging
import os
import sys
import traceback
from importlib import resources
from pathlib import Path

from platformdirs import user_log_dir
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import QApplication

from app import theme
from engine.synth.default_model import APP_NAME

log = logging.getLogger(__name__)

# The dark palette behind resources/style.qss; widgets the style sheet does not reach use it too.
PALETTE = {
    QPalette.Window: theme.WINDOW, QPalette.WindowText: theme.TEXT, QPalette.Base: theme.BASE,
    QPalette.AlternateBase: theme.RAISED, QPalette.Text: theme.TEXT, QPalette.Button: theme.CONTROL,
    QPalette.ButtonText: theme.TEXT, QPalette.Highlight: theme.HIGHLIGHT, QPalette.HighlightedText: theme.ON_ACCENT,
    QPalette.ToolTipBase: theme.CONTROL, QPalette.ToolTipText: theme.TEXT, QPalette.PlaceholderText: theme.PLACEHOLDER,
    QPalette.Link: theme.LINK, QPalette.BrightText: theme.ERROR,
}


def style_sheet() -> str:
    return theme.style_sheet(resources.files("resources").joinpath("style.qss").read_text(encoding="utf-8"))


def apply_style(app: QApplication) -> None:
    app.setStyle("Fusion")
    palette = QPalette()
    for role, colour in PALETTE.items():
        palette.setColor(role, QColor(colour))
    palette.setColor(QPalette.Disabled, QPalette.Text, QColor(theme.DISABLED))
    palette.setColor(QPalette.Disabled, QPalette.WindowText, QColor(theme.DISABLED))
    palette.setColor(QPalette.Disabled, QPalette.ButtonText, QColor(theme.DISABLED))
    app.setPalette(palette)
    font = app.font()
    if font.pointSizeF() < 10:
        font.setPointSizeF(10)
    font.setHintingPreference(QFont.PreferNoHinting)
    app.setFont(font)
    app.setStyleSheet(style_sheet())


def make_application(argv: list[str] | None = None) -> QApplication:
    """The one QApplication, styled; reused if it already exists (tests, screenshots)."""
    app = QApplication.instance()
    if app is None:
        QApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName(APP_NAME)
    app.setApplicationDisplayName("Offload Studio")
    app.setOrganizationName(APP_NAME)
    app.setDesktopFileName(APP_NAME)
    apply_style(app)
    return app


def setup_logging() -> Path | None:
    """Warnings to stderr, everything from INFO to a log file (tracebacks of bugs end up there)."""
    root = logging.getLogger()
    if root.handlers:
        return None
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    try:
        log_path = Path(user_log_dir(APP_NAME)) / "offload-studio.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_path, encoding="utf-8")
    except OSError:
        return None
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    return log_path


def install_excepthook(show_error) -> None:
    """An exception escaping a slot on the GUI thread is logged and shown; the window stays up."""
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.error("unhandled exception:\n%s", "".join(traceback.format_exception(exc_type, exc, tb)))
        try:
            show_error(f"Internal error: {exc_type.__name__}: {exc}")
        except Exception:
            pass
    sys.excepthook = hook


# Qt 6's xcb platform plugin needs these beyond what a desktop usually has; without them Qt prints
# "could not load the Qt platform plugin" and aborts. (library soname stem, Debian/Ubuntu package)
XCB_LIBRARIES = (("xcb-cursor", "libxcb-cursor0"), ("xcb-icccm", "libxcb-icccm4"))


def uses_xcb(environ=os.environ, platform: str = sys.platform) -> bool:
    """Whether Qt will use its xcb (X11) plugin: Linux, no other platform asked for, no Wayland session."""
    if not platform.startswith("linux"):
        return False
    asked = environ.get("QT_QPA_PLATFORM", "")
    if asked:
        return asked.split(":")[0].split(";")[0] == "xcb"
    return not environ.get("WAYLAND_DISPLAY")


def missing_xcb_packages(find_library=ctypes.util.find_library) -> list[str]:
    return [package for library, package in XCB_LIBRARIES if find_library(library) is None]


def xcb_help(packages: list[str]) -> str:
    return (f"offload-studio: Qt needs {' and '.join(packages)} to open a window on X11, and "
            f"{'it is' if len(packages) == 1 else 'they are'} not installed.\n"
            f"  Debian/Ubuntu: sudo apt install {' '.join(packages)}\n"
            f"  Fedora: sudo dnf install xcb-util-cursor xcb-util-wm    Arch: sudo pacman -S xcb-util-cursor xcb-util-wm\n"
            f"The command line works without them (offload-studio plan / run / perplexity ...).")


def run_app(model_path: str | None, sim_gpus: str | None) -> int:
    """Open the main window on `model_path` (or the built-in model) and run until it closes."""
    if uses_xcb():
        packages = missing_xcb_packages()
        if packages:        # say how to fix it before Qt aborts with a less helpful message
            print(xcb_help(packages), file=sys.stderr)
            return 1
    from app.bridge import Bridge
    from app.main_window import MainWindow
    from app.settings import Settings
    from engine.devices import simulated_gpus
    if sim_gpus:
        try:
            simulated_gpus(sim_gpus)
        except ValueError as e:
            print(f"offload-studio: error: {e}", file=sys.stderr)
            return 2
    setup_logging()
    app = make_application()
    bridge = Bridge()
    bridge.start()
    try:        # the engine thread is stopped whatever happens, or Qt aborts the process on exit
        settings = Settings.load()
        window = MainWindow(bridge, settings)
        install_excepthook(window.show_error)
        window.show()
        show_startup_problems(window, settings)
        window.detect_devices(sim_gpus)
        if model_path:
            window.open_model(model_path)
        else:
            window.open_default_model()
        return app.exec()
    finally:
        if not bridge.shutdown():
            # the engine thread is inside a kernel compile (or a job that ignores Cancel): Qt would
            # abort over the running thread. Numba writes its cache by atomic rename: nothing is torn.
            logging.shutdown()
            os._exit(0)


def show_startup_problems(window, settings) -> None:
    """Saved files that could not be used were set aside while loading; say so once, in the window."""
    store = getattr(getattr(window.chat, "controller", None), "store", None)
    problems = settings.take_problems() + (store.take_problems() if store is not None else [])
    if problems:
        window.show_message(" ".join(problems), "warning")
