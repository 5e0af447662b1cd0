"""Quoting text that comes from a file (a GGUF's names and metadata, a saved file's fields).

Such text is untrusted: an ESC sequence in `general.name` could retitle or clear a terminal, a
bidirectional override could make a line read differently from what it is, and a name a megabyte
long would make a megabyte-long message. `printable` escapes the first two and caps the third.
"""
from __future__ import annotations

import re

# C0 and C1 control characters, DEL, and the bidirectional overrides and isolates (U+202A-U+202E,
# U+2066-U+2069): everything a terminal or a text layout engine would act on rather than show.
_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_LINES_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, max_chars: int | None = None, keep_lines: bool = False) -> str:
    """`text` with control characters shown as `\\xNN` escapes, cut to `max_chars` (with a note of
    how much was cut). `keep_lines` leaves newlines and tabs alone (multi-line output)."""
    text = str(text)
    if max_chars is not None and len(text) > max_chars:
        # cut before escaping (escaping at most quadruples the length) so a huge text costs little
        text = text[:max_chars] + f"... ({len(text) - max_chars} more characters)"
    return (_UNSAFE_KEEP_LINES_RE if keep_lines else _UNSAFE_RE).sub(_escape, text)
