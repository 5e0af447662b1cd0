"""Pieces the subcommands share: opening a model and printing tables."""
from __future__ import annotations

import io
import json
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

from engine.gguf.model_file import ModelFile
from engine.gguf.quoting import printable
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


class EscapingWriter(io.TextIOBase):
    """A text stream that shows control characters as escapes: what the commands print comes
    from model files (names, metadata, generated text), and an ESC sequence there must not reach
    the terminal. Newlines and tabs pass."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(printable(text, keep_lines=True))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


@contextmanager
def escaped_stdout() -> Iterator[None]:
    original = sys.stdout
    sys.stdout = EscapingWriter(original)
    try:
        yield
    finally:
        sys.stdout = original
