"""Writing files so that a crash, a full disk or Ctrl-C never leaves a half-written one behind.

Everything the engine or the app writes for the user (plans, logits, synthetic models, settings,
conversations) goes to a temporary file beside the target and replaces it in one rename.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


class OutputPathError(ValueError):
    """An output path that cannot take a file (a device, a folder, a pipe)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()      # what open() would give a new file; mkstemp gives 0600


def check_output_path(path: Path) -> None:
    """Refuse a target that is not a regular file before anything is computed or written: a
    rename over /dev/full or a folder would fail late, or worse, succeed."""
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{path}: not a regular file; outputs are written beside it and renamed over it")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that opens files itself; on a clean exit the
    file is synced and renamed over `path`, on any exception it is removed and `path` is left as
    it was. An OSError without a file name (a full disk) is given the target's name."""
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.chmod(tmp_name, path.stat().st_mode & 0o7777 if path.exists() else _NEW_FILE_MODE)
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as e:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.strerror:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it is synced and renamed over `path`,
    on any exception it is removed and `path` is left as it was."""
    with atomic_path(path) as tmp_path:
        with open(tmp_path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)


MAX_SAVED_JSON_BYTES = 64 << 20     # conversations and settings are far smaller; more is not ours


class SavedFileError(ValueError):
    """A saved file (settings, a conversation, a plan) that cannot be used; the message says why."""


def read_json(path: str | os.PathLike, max_bytes: int = MAX_SAVED_JSON_BYTES) -> Any:
    """The JSON value in `path`. A missing file raises FileNotFoundError; anything else that keeps
    it from being read (too large, not UTF-8, not JSON, nested too deeply) raises SavedFileError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SavedFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise SavedFileError(f"{path}: larger than {max_bytes >> 20} MiB")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SavedFileError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    except RecursionError:
        raise SavedFileError(f"{path}: nested too deeply") from None


def set_aside(path: str | os.PathLike) -> Path:
    """Rename an unusable file to `NAME.bad` (or `NAME.bad.1`, `.bad.2`, ... so an earlier bad file
    is never overwritten) and return the new name; the user can still recover it."""
    path = Path(path)
    candidate = path.with_name(path.name + ".bad")
    n = 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.bad.{n}")
    os.replace(path, candidate)
    return candidate
