"""The perplexity panel's table of llama-perplexity's final KL-divergence statistics."""
from __future__ import annotations

import math
from dataclasses import dataclass

from PySide6.QtCore import QObject, Qt
from PySide6.QtGui import QFont, QFontDatabase

from app import theme
from app.models import Index, RowTableModel
from engine.eval.perplexity import KLDivergenceStats

SECTION_BACKGROUND = theme.color("raised")


@dataclass(frozen=True)
class KldRow:
    name: str
    value: str = ""
    error: str = ""
    is_section: bool = False


def _quantile_name(fraction: float) -> str:
    return {1.0: "Maximum", 0.5: "Median", 0.0: "Minimum"}.get(fraction, f"{100 * fraction:.1f}%")


def _pm(value: float, digits: int, scale: float = 1.0, unit: str = "") -> str:
    return "—" if not math.isfinite(value) else f"{scale * value:.{digits}f}{unit}"


def kld_rows(stats: KLDivergenceStats) -> list[KldRow]:
    """llama-perplexity's three statistics blocks as table rows: name, value, uncertainty."""
    s = stats
    rows = [KldRow("Perplexity", is_section=True),
            KldRow("Mean PPL(Q)", _pm(s.ppl, 6), _pm(s.ppl_error, 6)),
            KldRow("Mean PPL(base)", _pm(s.base_ppl, 6), _pm(s.base_ppl_error, 6)),
            KldRow("Cor(ln(PPL(Q)), ln(PPL(base)))", _pm(s.log_ppl_correlation, 2, 100, " %")),
            KldRow("Mean ln(PPL(Q)/PPL(base))", _pm(s.log_ppl_ratio, 6), _pm(s.log_ppl_ratio_error, 6)),
            KldRow("Mean PPL(Q)/PPL(base)", _pm(s.ppl_ratio, 6), _pm(s.ppl_ratio_error, 6)),
            KldRow("Mean PPL(Q)-PPL(base)", _pm(s.ppl_diff, 6), _pm(s.ppl_diff_error, 6)),
            KldRow("KL divergence", is_section=True),
            KldRow("Mean KLD", _pm(s.kld, 6), _pm(s.kld_error, 6))]
    rows += [KldRow(f"{_quantile_name(f)} KLD", _pm(v, 6)) for f, v in s.kld_quantiles]
    rows += [KldRow("Token probability", is_section=True),
             KldRow("Mean Δp", _pm(s.p_diff, 3, 100, " %"), _pm(s.p_diff_error, 3, 100, " %"))]
    rows += [KldRow(f"{_quantile_name(f)} Δp", _pm(v, 3, 100, " %")) for f, v in s.p_diff_quantiles]
    rows += [KldRow("RMS Δp", _pm(s.rms_p_diff, 3, 100, " %"), _pm(s.rms_p_diff_error, 3, 100, " %")),
             KldRow("Same top p", _pm(s.same_top, 3, 100, " %"), _pm(s.same_top_error, 3, 100, " %"))]
    return rows


class KldStatsModel(RowTableModel):
    """The final KL-divergence statistics: section rows (bold) and statistic rows."""

    COL_NAME, COL_VALUE, COL_ERROR = range(3)
    HEADERS = ("Statistic", "Value", "±")

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._rows: list[KldRow] = []

    def set_stats(self, stats: KLDivergenceStats | None) -> None:
        self.beginResetModel()
        self._rows = kld_rows(stats) if stats is not None else []
        self.endResetModel()

    def row(self, row: int) -> KldRow:
        return self._rows[row]

    def data(self, index: Index, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        row = self._rows[index.row()]
        column = index.column()
        if role == Qt.DisplayRole:
            return (row.name, row.value, row.error)[column]
        if role == Qt.FontRole:
            if row.is_section:
                font = QFont()
                font.setBold(True)
                return font
            if column != self.COL_NAME:
                return QFontDatabase.systemFont(QFontDatabase.FixedFont)
        if role == Qt.BackgroundRole and row.is_section:
            return SECTION_BACKGROUND
        if role == Qt.TextAlignmentRole and column != self.COL_NAME:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def flags(self, index: Index) -> Qt.ItemFlags:
        if not index.isValid():
            return Qt.NoItemFlags
        row = self._rows[index.row()]
        return Qt.ItemIsEnabled if row.is_section else Qt.ItemIsEnabled | Qt.ItemIsSelectable
