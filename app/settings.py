"""What the app remembers between runs, as two small JSON files under the platform's usual places.

`settings.json` (user config dir) holds choices the user made: folders to search for models.
`state.json` (user state dir) holds what the app noticed: recent files, window geometry, the
last panel. Both are written atomically (temporary file, then rename), so a crash mid-write
leaves the previous file intact. A file that cannot be read or does not match the schema is set
aside as NAME.bad (an earlier .bad is kept), defaults are used and the user is told once
(`take_problems`): the app always starts.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


from platformdirs import user_config_dir, user_state_dir

from engine.files import SavedFileError, read_json, set_aside, write_json_atomic
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


MAX_PATH_CHARS = 4096
MAX_PATH_PART_BYTES = 255        # longer parts make every file-system call on the path fail


def usable_path(value: object) -> bool:
    """A path string the file system can be asked about without an error."""
    return isinstance(value, str) and 0 < len(value) <= MAX_PATH_CHARS and "\0" not in value and \
        all(len(part.encode("utf-8", "surrogateescape")) <= MAX_PATH_PART_BYTES for part in Path(value).parts)


def _field_problem(name: str, value: object, expected: type) -> str | None:
    if not isinstance(value, expected):
        return f"{name} should be a {expected.__name__}, found {type(value).__name__}"
    if isinstance(value, list) and not all(usable_path(item) for item in value):
        return f"{name} holds an entry that is not a usable path"
    return None


def _read_dataclass(cls, path: Path, problems: list[str]):
    """An instance of `cls` from a JSON file; defaults when it is missing. Fields that do not
    match the schema get their defaults (the others are kept); a file that is unreadable or had
    such a field is set aside as NAME.bad (never overwriting an earlier one) and `problems` gets
    one line for the user. Unknown keys are allowed: a newer version may have written them."""
    defaults = cls()
    try:
        data = read_json(path)
    except FileNotFoundError:
        return defaults
    except SavedFileError as e:
        data, problem = {}, str(e)
    else:
        problem = None if isinstance(data, dict) else f"expected a JSON object, found {type(data).__name__}"
        data = data if isinstance(data, dict) else {}
    values = {}
    for f in fields(cls):
        if f.name in data:
            field_problem = _field_problem(f.name, data[f.name], type(getattr(defaults, f.name)))
            if field_problem is None:
                values[f.name] = data[f.name]
            problem = problem or field_problem
    if problem is not None:
        _set_aside(path, problem, problems)
    return cls(**values)


def _set_aside(path: Path, problem: str, problems: list[str]) -> None:
    try:
        kept = set_aside(path)
        problems.append(f"{path.name} could not be used as it was ({problem}); it was kept as {kept.name} "
                        "and defaults are used where needed")
    except OSError as e:
        problems.append(f"{path.name} could not be used as it was ({problem}) nor set aside ({e.strerror}); "
                        "defaults are used where needed")
    log.warning("%s", problems[-1])


class Settings:
    """The app's settings and state; `save()` writes both files."""

    def __init__(self, settings_path: Path, state_path: Path):
        self.settings_path = settings_path
        self.state_path = state_path
        self.problems: list[str] = []     # what went wrong reading the files, for the user, once
        self.user = _read_dataclass(UserSettings, settings_path, self.problems)
        self.state = _read_dataclass(AppState, state_path, self.problems)

    @classmethod
    def load(cls) -> Settings:
        return cls(config_dir() / "settings.json", state_dir() / "state.json")

    def take_problems(self) -> list[str]:
        """The problems found while loading, each returned once."""
        problems, self.problems = self.problems, []
        return problems

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
