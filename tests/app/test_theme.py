"""One palette: style sheets and painters take their colours from app/theme.py and nowhere else."""
import re
from pathlib import Path

import pytest
from PySide6.QtGui import QColor

from app import theme

ROOT = Path(__file__).resolve().parents[2]
HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}\b|rgba?\(\s*\d+\s*,|QColor\(\s*\d+\s*,\s*\d+\s*,\s*\d+\s*[,)]")
SHADOWS = {"QColor(0, 0, 0,"}      # black shadows are not part of the palette


def test_style_sheets_name_colours_and_tints():
    sheet = theme.style_sheet("QLabel { color: @muted; background: @accent/0.10; border: 1px solid @border; }")
    assert sheet == f"QLabel {{ color: {theme.MUTED}; background: rgba(91, 141, 239, 0.10); border: 1px solid {theme.BORDER}; }}"


def test_an_unknown_colour_name_is_an_error_not_a_silent_default():
    with pytest.raises(KeyError, match="nope"):
        theme.style_sheet("QLabel { color: @nope; }")


def test_color_and_device_colours():
    assert theme.color("error_fill") == QColor("#e5484d")
    assert theme.color("accent", 0.5).alphaF() == pytest.approx(0.5, abs=1 / 255)
    assert theme.device_color("CPU") == QColor(theme.DEVICE_CPU)
    assert theme.device_color("CUDA1") == QColor(theme.DEVICE_GPUS[1])
    assert theme.device_color("CUDA9") == QColor(theme.DEVICE_GPUS[9 % len(theme.DEVICE_GPUS)])
    assert len({theme.device_color(f"CUDA{i}").name() for i in range(len(theme.DEVICE_GPUS))} | {theme.DEVICE_CPU}) \
        == len(theme.DEVICE_GPUS) + 1


def hard_coded_colours(path: Path) -> list[str]:
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for match in HEX_COLOUR.finditer(line):
            if not any(line[match.start():].startswith(s) for s in SHADOWS):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_no_colour_is_written_outside_the_theme():
    files = [p for p in (ROOT / "app").rglob("*.py") if p.name != "theme.py"] + [ROOT / "resources" / "style.qss"]
    found = [hit for path in files for hit in hard_coded_colours(path)]
    assert found == []


def test_the_app_style_sheet_resolves_every_name():
    from app.app import style_sheet
    sheet = style_sheet()
    assert "@" not in sheet and theme.WINDOW in sheet
