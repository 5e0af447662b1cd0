"""File > New Synthetic Model: a model of a real shape (random weights, optionally sparse) to
plan for hardware the user does not have."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit,
                               QWidget)

from engine.synth.presets import PRESETS
from engine.synth.quant_recipe import FTYPE_BY_NAME

QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q3_K_M", "Q2_K", "IQ4_XS", "F16", "BF16")
BIG_PARAMS = 2_000_000_000      # presets above this are written sparse by default


@dataclass(frozen=True)
class SynthRequest:
    preset: str
    quant: str
    sparse: bool
    path: Path


class SynthDialog(QDialog):
    def __init__(self, out_dir: Path, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("New synthetic model")
        self.out_dir = out_dir
        self.preset = QComboBox()
        for name in sorted(PRESETS, key=lambda n: (n.startswith("tiny"), n)):
            self.preset.addItem(f"{name}  ({PRESETS[name]['general.architecture']})", name)
        self.quant = QComboBox()
        self.quant.addItems([q for q in QUANTS if q in FTYPE_BY_NAME])
        self.sparse = QCheckBox("Sparse: tensor data left as file holes (for planning only, not for running)")
        self.sparse.setChecked(True)
        self.path = QLineEdit()
        form = QFormLayout(self)
        form.addRow(QLabel("A file in a real model's exact layout and sizes, with random weights."))
        form.addRow("Shape", self.preset)
        form.addRow("Quantization", self.quant)
        form.addRow("", self.sparse)
        form.addRow("Save as", self.path)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.preset.currentIndexChanged.connect(self._suggest)
        self.quant.currentIndexChanged.connect(self._suggest)
        self._suggest()

    def _suggest(self) -> None:
        name = self.preset.currentData()
        self.sparse.setChecked(not name.startswith("tiny"))
        self.path.setText(str(self.out_dir / f"{name}-{self.quant.currentText()}.gguf"))

    def request(self) -> SynthRequest:
        return SynthRequest(self.preset.currentData(), self.quant.currentText(), self.sparse.isChecked(),
                            Path(self.path.text()).expanduser())
