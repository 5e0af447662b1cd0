"""The errors a user can cause with bad input, and their one-line messages."""
from __future__ import annotations

from engine.arch import UnsupportedArchitectureError
from engine.arch.base import HyperParamError
from engine.gguf.model_file import ModelFileError

USER_ERRORS = (ModelFileError, UnsupportedArchitectureError, HyperParamError, ValueError, FileNotFoundError,
               PermissionError, IsADirectoryError)


def user_error_message(error: BaseException) -> str | None:
    """A one-line message for an error caused by input; None for a bug (which keeps its traceback)."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, USER_ERRORS):
        return str(error)
    return None
