"""Compiling the `-ot` tensor patterns a user (or a pasted command line) gives.

Python's `re` backtracks: `(a+)+$` against a long tensor name takes exponential time, and
`-ot` patterns are matched against every tensor of a model. Patterns are compiled with RE2
(google-re2), which matches in time linear in the name whatever the pattern. The few patterns
RE2 does not accept (lookahead, backreferences: ECMAScript features llama.cpp's std::regex has)
fall back to `re`, with a bound on their size.
"""
from __future__ import annotations

import re

try:
    import re2
except ImportError:         # the dependency is declared; without it every pattern goes through `re`
    re2 = None

MAX_PATTERN_CHARS = 2000


class TensorPatternError(ValueError):
    pass


def _re2_options():
    options = re2.Options()
    options.log_errors = False      # a refused pattern falls back quietly instead of logging to stderr
    return options


def compile_pattern(pattern: str):
    """An object with `.search(name)` for one `-ot` pattern; a ValueError that names the pattern
    when it cannot be compiled."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise TensorPatternError(f"tensor pattern of {len(pattern)} characters is longer than the "
                                 f"{MAX_PATTERN_CHARS} allowed")
    if re2 is not None:
        try:
            return re2.compile(pattern, _re2_options())
        except re2.error:
            pass            # not RE2 syntax: let `re` accept it or say what is wrong
    try:
        return re.compile(pattern)
    except re.error as e:
        raise TensorPatternError(f"invalid tensor pattern {pattern[:200]!r}: {e}") from None
