"""Compiling the `-ot` tensor patterns a user (or a pasted command line) gives.

Python's `re` backtracks: `(a+)+$` against a long tensor name takes exponential time, and
`-ot` patterns are matched against every tensor of a model. Patterns are compiled with RE2
(google-re2), which matches in time linear in the name whatever the pattern. The few patterns
RE2 does not accept (lookahead, backreferences: ECMAScript features llama.cpp's std::regex has)
fall back to `re`, with a bound on their size, and only when they hold no repeat nested in a
repeat and no alternation under a repeat: the shapes whose backtracking grows exponentially.
"""
from __future__ import annotations

import re

try:
    from re import _parser as sre_parse          # Python 3.11+
except ImportError:                               # pragma: no cover - Python 3.10
    import sre_parse

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
        compiled = re.compile(pattern)
    except re.error as e:
        raise TensorPatternError(f"invalid tensor pattern {pattern[:200]!r}: {e}") from None
    if _may_backtrack(sre_parse.parse(pattern)):
        raise TensorPatternError(f"tensor pattern {pattern[:200]!r} needs lookahead or a backreference and nests "
                                 "repeats, which could take exponential time to match: write it without one of them")
    return compiled


_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)} - {None}


def _may_backtrack(parsed, under_repeat: bool = False) -> bool:
    """Whether a parsed pattern has a repeat (or an alternation) inside a repeat."""
    for op, arg in parsed:
        if op in _REPEATS:
            low, high, sub = arg
            if under_repeat and high > 1:
                return True
            if _may_backtrack(sub, under_repeat or high > 1):
                return True
        elif op is sre_parse.BRANCH:
            if under_repeat:
                return True
            if any(_may_backtrack(branch, under_repeat) for branch in arg[1]):
                return True
        elif op is sre_parse.SUBPATTERN:
            if _may_backtrack(arg[-1], under_repeat):
                return True
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            if _may_backtrack(arg[1], under_repeat):
                return True
    return False
