"""The app's one palette, named by what a colour means, and the style sheets written with it.

Every colour the app paints or styles comes from here. Python code uses the constants (or
`color(name)` for a QColor); style sheets write `@name` (e.g. `color: @muted;`) and go through
`style_sheet()`, which also understands `@name/alpha` for a translucent tint
(`background: @accent/0.10;`). Devices have their own hues: the CPU grey, each GPU its own.
"""
from __future__ import annotations

import re
from functools import lru_cache

from PySide6.QtGui import QColor

# --- surfaces, darkest first ---
SUNKEN = "#17181b"          # text inputs, logs, command lines
SIDEBAR = "#1a1b1f"         # side columns of the chat and perplexity panels
VIEW = "#1c1d21"            # large views: the message list, the layer grid
WINDOW = "#1e1f23"
BASE = "#202126"            # item views, the plot
RAISED = "#25272c"          # cards, alternate rows, section rows
CONTROL = "#2b2d33"         # buttons, combo boxes, tool tips
CONTROL_HOVER = "#34363d"
CONTROL_DISABLED = "#232428"
HOVER = "#24262b"           # a hovered list item, alternate table rows
SELECTION = "#2f4f8f"       # selected rows

# --- lines ---
BORDER = "#2f3137"
BORDER_STRONG = "#3a3d44"
BORDER_LIGHT = "#4a4e57"    # tool tips, dashed "add" buttons

# --- text ---
TEXT = "#dcdee3"
TEXT_STRONG = "#f2f3f5"     # titles, the big result
TEXT_SECONDARY = "#c8cbd2"  # section titles, check boxes, list items
MUTED = "#9a9ea8"           # labels, axis text, statistics
PLACEHOLDER = "#7c808a"
DISABLED = "#6b6f78"
ON_ACCENT = "#ffffff"       # text on an accent fill; selection outlines

# --- accents and states ---
ACCENT = "#5b8def"          # focus, progress, the running estimate
HIGHLIGHT = "#3d6fd9"       # selection, primary buttons
HIGHLIGHT_HOVER = "#4a7be3"
LINK = "#78a6ff"
LINK_HOVER = "#a9c6ff"
NOTE = "#9fbcff"
OK = "#7fd19b"
WARNING = "#f2c879"
WARNING_FILL = "#e6a23c"    # a context bar nearly full, warning banners' tint
OURS_ONLY = "#f5c451"       # what llama.cpp cannot express: split experts
ERROR = "#ff6b70"           # error text
ERROR_FILL = "#e5484d"      # over capacity: numbers, bars, banners' tint
ERROR_DARK = "#3b2023"      # the Stop button
ERROR_DARK_BORDER = "#7a2e34"
ERROR_ON_DARK = "#ffc9cb"
ERROR_DARK_HOVER = "#4a2529"
INFO_DARK = "#2a3550"       # the message bar, by level
INFO_DARK_BORDER = "#3d5590"
WARNING_DARK = "#3a2f1c"
WARNING_DARK_BORDER = "#7a5a22"

# --- chat bubbles ---
USER_BUBBLE = "#2c4f94"
USER_TEXT = "#f4f6fb"
ASSISTANT_BUBBLE = "#2a2c32"
SYSTEM_BUBBLE = HOVER

# --- devices ---
DEVICE_CPU = "#858a94"
DEVICE_GPUS = ("#4c8dff", "#2fbf8f", "#f0a33a", "#b07cf0", "#34c0d8", "#f06fa8", "#9ccc3c", "#ff8a4c")
DEVICE_OVERHEAD = "#5d616b"     # a device lane's fixed overhead
DEVICE_FREE = "#7fd3a8"         # a device lane's free space

_NAME = re.compile(r"@([a-z_]+)(?:/([0-9.]+))?")


def color(name: str, alpha: float = 1.0) -> QColor:
    """A QColor of the palette by its name (`"muted"`, `"error_fill"`), optionally translucent."""
    colour = QColor(globals()[name.upper()])
    if alpha < 1.0:
        colour.setAlphaF(alpha)
    return colour


@lru_cache(maxsize=None)
def device_color(name: str) -> QColor:
    """CPU grey; CUDA0, CUDA1, ... each its own hue. Shared instances: copy before changing one."""
    digits = "".join(ch for ch in name if ch.isdigit())
    if name == "CPU" or not digits:
        return QColor(DEVICE_CPU)
    return QColor(DEVICE_GPUS[int(digits) % len(DEVICE_GPUS)])


def _css(match: re.Match) -> str:
    name, alpha = match.group(1), match.group(2)
    value = globals().get(name.upper())
    if not isinstance(value, str):
        raise KeyError(f"no colour named {name!r} in app/theme.py")
    if alpha is None:
        return value
    c = QColor(value)
    return f"rgba({c.red()}, {c.green()}, {c.blue()}, {alpha})"


def style_sheet(template: str) -> str:
    """A Qt style sheet with each `@name` (or `@name/alpha`) replaced by the palette's colour."""
    return _NAME.sub(_css, template)
