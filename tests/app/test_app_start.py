"""On a fresh Linux machine without libxcb-cursor0 / libxcb-icccm4, the app says how to install
them instead of letting Qt abort with a missing-plugin message."""
import app.app as app_module
from app.app import missing_xcb_packages, uses_xcb, xcb_help


def test_xcb_is_what_qt_uses_on_linux_without_wayland_or_another_platform():
    assert uses_xcb({}, "linux")
    assert uses_xcb({"QT_QPA_PLATFORM": "xcb"}, "linux")
    assert not uses_xcb({"WAYLAND_DISPLAY": "wayland-0"}, "linux")
    assert not uses_xcb({"QT_QPA_PLATFORM": "offscreen"}, "linux")
    assert not uses_xcb({"QT_QPA_PLATFORM": "wayland;xcb"}, "linux")
    assert not uses_xcb({}, "darwin") and not uses_xcb({}, "win32")


def test_missing_libraries_are_named_with_the_packages_to_install():
    found = {"xcb-icccm": "libxcb-icccm.so.4"}
    assert missing_xcb_packages(found.get) == ["libxcb-cursor0"]
    assert missing_xcb_packages(lambda name: None) == ["libxcb-cursor0", "libxcb-icccm4"]
    assert missing_xcb_packages(lambda name: f"lib{name}.so") == []
    text = xcb_help(["libxcb-cursor0", "libxcb-icccm4"])
    assert "sudo apt install libxcb-cursor0 libxcb-icccm4" in text and "xcb-util-cursor" in text


def test_the_app_stops_with_the_help_before_qt_starts(monkeypatch, capsys):
    def qt_must_not_start():
        raise AssertionError("Qt started")
    monkeypatch.setattr(app_module, "uses_xcb", lambda: True)
    monkeypatch.setattr(app_module, "missing_xcb_packages", lambda: ["libxcb-cursor0"])
    monkeypatch.setattr(app_module, "make_application", qt_must_not_start)
    assert app_module.run_app(None, None) == 1
    assert "sudo apt install libxcb-cursor0" in capsys.readouterr().err
