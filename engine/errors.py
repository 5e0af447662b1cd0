"""The errors a user can cause with bad input, and their one-line messages.

A message may quote a GGUF or a saved file, which are untrusted: it is made printable (control
characters escaped, so an ESC sequence in a model name cannot drive the terminal) and capped, so a
hostile name cannot become a megabyte-long line.
"""
from __future__ import annotations

import re

from engine.arch import UnsupportedArchitectureError
from engine.arch.base import HyperParamError
from engine.gguf.model_file import ModelFileError, printable

MAX_MESSAGE_CHARS = 500

# ValueError covers most of our own classes (HyperParamError, OverrideError, PlanFileError,
# ContextOverflowError, ConversationError, SavedFileError, ...); ModelFileError covers
# ModelFileChangedError; FloatingPointError, NonFiniteError. The rest are known by name, so that
# this module imports neither jinja2 (templates) nor the backends just to sort an exception.
USER_ERRORS = (ModelFileError, UnsupportedArchitectureError, HyperParamError, ValueError, OSError, MemoryError,
               FloatingPointError)
_USER_ERROR_NAMES = {"ChatTemplateError", "NoCudaBackendError", "DeviceMismatchError"}


def is_user_error(error: BaseException) -> bool:
    """True for errors bad input or the machine's state can cause; False for bugs."""
    return isinstance(error, USER_ERRORS) or any(c.__name__ in _USER_ERROR_NAMES for c in type(error).__mro__)


def user_error_message(error: BaseException) -> str | None:
    """A one-line, printable, bounded message for an error caused by input or by the machine
    (a full disk, a read-only folder, too little memory); None for a bug, which keeps its traceback."""
    if not is_user_error(error):
        return None
    return one_line(_describe(error))


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    if isinstance(error, MemoryError):
        return f"not enough memory{': ' + str(error) if str(error) else ''}"
    return str(error) or type(error).__name__


def one_line(text: str, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """`text` on one printable line of at most about `max_chars` characters."""
    return printable(re.sub(r"\s*\n\s*", " ", text), max_chars)
