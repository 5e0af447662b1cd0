"""The main window's keys and size: every shortcut sequence means one thing (Qt ignores an
ambiguous one, so Redo did nothing), Ctrl+digit belongs to the designer's moves and Alt+digit to
the tabs, and the window fits a 1280x800 screen with banners that do not move the designer."""
from collections import defaultdict

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence, QShortcut

from app.main_window import Dialogs, MainWindow


@pytest.fixture
def window(qtbot, bridge, settings):
    window = MainWindow(bridge, settings, Dialogs(), model_locations=lambda folders: [])
    qtbot.addWidget(window)
    return window


def shortcut_owners(window) -> dict[str, list[str]]:
    """Each key sequence -> the actions and shortcuts bound to it that can fire at the same time.

    A WidgetShortcut fires only while its own widget has the focus, so it is keyed by that widget."""
    owners = defaultdict(list)
    bindings = [(a, a.shortcuts(), a.shortcutContext(), a.text()) for a in window.findChildren(QAction)]
    bindings += [(s, [s.key()], s.context(), s.objectName() or "QShortcut") for s in window.findChildren(QShortcut)]
    for obj, sequences, context, text in bindings:
        scope = id(obj.parent()) if context == Qt.WidgetShortcut else "window"
        for sequence in sequences:
            if not sequence.isEmpty():
                owners[(sequence.toString(QKeySequence.PortableText), scope)].append(text)
    return {key: texts for key, texts in owners.items()}


def test_no_key_sequence_is_bound_twice(window):
    owners = shortcut_owners(window)
    assert owners, "the window has shortcuts"
    duplicates = {key[0]: texts for key, texts in owners.items() if len(texts) > 1}
    assert duplicates == {}
    redo = window.designer.redo_action.shortcuts()
    assert QKeySequence("Ctrl+Shift+Z") in redo and len({s.toString() for s in redo}) == len(redo)


def test_ctrl_digits_move_the_selection_and_alt_digits_switch_tabs(window):
    keys = {key[0] for key in shortcut_owners(window)}
    assert not {f"Ctrl+{n}" for n in range(10)} & keys, "Ctrl+digit is the designer's move to a device"
    tabs = [a for a in window.view_menu.actions() if a.text() in window.panel_names()]
    assert [a.shortcut().toString() for a in tabs] == [f"Alt+{i + 1}" for i in range(len(tabs))]
    tabs[1].trigger()
    assert window.current_panel_name() == window.panel_names()[1]


def test_the_window_fits_a_1280_by_800_screen(qtbot, window):
    hint = window.minimumSizeHint().expandedTo(window.minimumSize())
    assert hint.width() <= 1280 and hint.height() <= 800, hint
    window.resize(1280, 800)
    window.show()
    qtbot.waitExposed(window)
    assert window.width() <= 1280 and window.height() <= 800


def test_a_long_status_line_does_not_widen_the_window(qtbot, window):
    """A job's status text (a compile's "Preparing CPU kernels ... now <kernel>") is cut to the bar,
    not a minimum width: it widened the window past the screen, and it stayed wide."""
    window.resize(1280, 800)
    window.show()
    qtbot.waitExposed(window)
    text = "Preparing CPU kernels for this machine (first run): 123 compiled, now " + "k" * 300
    window.track_job(window.bridge.submit(lambda ctx: None), text)        # the status bar
    window.chat.controller.status_changed.emit(text)                      # the chat's state line
    qtbot.wait(50)
    for widget in (window.statusBar(), window.chat.stats, window):
        assert widget.minimumSizeHint().width() <= 1280, widget
    assert window.width() <= 1280
