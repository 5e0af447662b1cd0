"""What the app remembers between runs, as two small JSON files under the platform's usual places.

`settings.json` (user config dir) holds choices the user made: folders to search for models.
`state.json` (user state dir) holds what the app noticed: recent files, window geometry, the
last panel. Both are written atomically (temporary file, then rename), so a crash mid-write
leaves the previous file intact; an unreadable file is set aside and defaults are used.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


from platformdirs import user_config_dir, user_state_dir

from engine.files import write_json_atomic
from engine.synth.default_model import APP_NAME

log = logging.getLogger(__name__)

MAX_RECENT_FILES = 10


@dataclass
class UserSettings:
    model_folders: list[str] = field(default_factory=list)


@dataclass
class AppState:
    recent_files: list[str] = field(default_factory=list)
    window_geometry: str = ""       # base64 of QWidget.saveGeometry()
    window_state: str = ""          # base64 of QMainWindow.saveState()
    current_panel: str = ""


def config_dir() -> Path:
    return Path(user_config_dir(APP_NAME))


def state_dir() -> Path:
    return Path(user_state_dir(APP_NAME))


def _read_dataclass(cls, path: Path):
    """An instance of `cls` from a JSON file; defaults when missing, and for unknown or mistyped keys."""
    defaults = cls()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return defaults
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s); it is kept as %s.bad", path, e, path.name)
        path.replace(path.with_name(path.name + ".bad"))
        return defaults
    if not isinstance(data, dict):
        return defaults
    values = {}
    for f in fields(cls):
        value = data.get(f.name, getattr(defaults, f.name))
        if isinstance(value, type(getattr(defaults, f.name))):
            values[f.name] = value
    return cls(**values)


class Settings:
    """The app's settings and state; `save()` writes both files."""

    def __init__(self, settings_path: Path, state_path: Path):
        self.settings_path = settings_path
        self.state_path = state_path
        self.user = _read_dataclass(UserSettings, settings_path)
        self.state = _read_dataclass(AppState, state_path)
        self.state.recent_files = [p for p in self.state.recent_files if isinstance(p, str)]
        self.user.model_folders = [f for f in self.user.model_folders if isinstance(f, str)]

    @classmethod
    def load(cls) -> Settings:
        return cls(config_dir() / "settings.json", state_dir() / "state.json")

    def save(self) -> None:
        write_json_atomic(self.settings_path, asdict(self.user))
        write_json_atomic(self.state_path, asdict(self.state))

    # --- recent files ------------------------------------------------------------------------

    @property
    def recent_files(self) -> list[str]:
        return list(self.state.recent_files)

    def add_recent_file(self, path: str | Path) -> None:
        path = str(Path(path).expanduser().resolve())
        recent = [p for p in self.state.recent_files if p != path]
        self.state.recent_files = [path, *recent][:MAX_RECENT_FILES]

    def remove_recent_file(self, path: str | Path) -> None:
        self.state.recent_files = [p for p in self.state.recent_files if p != str(path)]

    def clear_recent_files(self) -> None:
        self.state.recent_files = []

    # --- model folders -----------------------------------------------------------------------

    @property
    def model_folders(self) -> list[str]:
        return list(self.user.model_folders)

    def add_model_folder(self, folder: str | Path) -> bool:
        """True if the folder was new."""
        folder = str(Path(folder).expanduser().resolve())
        if folder in self.user.model_folders:
            return False
        self.user.model_folders.append(folder)
        return True

    def remove_model_folder(self, folder: str | Path) -> None:
        self.user.model_folders = [f for f in self.user.model_folders if f != str(folder)]
