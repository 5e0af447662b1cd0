"""Pieces the subcommands share: opening a model and printing tables."""
from __future__ import annotations

import json
import sys
from typing import Sequence

from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory


def open_inventory(path: str) -> tuple[ModelFile, Inventory]:
    mf = ModelFile(path)
    return mf, Inventory.from_model_file(mf)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out=None) -> None:
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    print()
