"""The inspector panel: what a GGUF holds — a tensor table (searchable with `-ot`-style regexes,
with the bytes of whatever matches) beside the metadata table, and the model options (metadata
overrides) in a tab next to it."""
from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QSortFilterProxyModel, Qt, QTimer, Signal
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QLineEdit, QSplitter,
                               QStackedWidget, QTableView, QTabWidget, QVBoxLayout, QWidget)

from app.engine_jobs import LoadedModel
from app.models import BytesRole
from app.models.inspector import MetadataModel, SearchFilterProxy, TensorTableModel
from app.widgets.model_options import ModelOptionsWidget
from engine.gguf.quoting import printable
from engine.units import format_bytes

DEBOUNCE_ROWS = 5000        # above this many tensors, filter after a pause in typing, not per key
DEBOUNCE_MS = 150
KEY_COLUMN_MIN_PX, KEY_COLUMN_MAX_PX = 250, 380     # metadata keys run to ~45 characters


def _table(model: QSortFilterProxyModel, elide: Qt.TextElideMode) -> QTableView:
    view = QTableView()
    view.setModel(model)
    view.setSelectionBehavior(QAbstractItemView.SelectRows)
    view.setAlternatingRowColors(True)
    view.setShowGrid(False)
    view.setWordWrap(False)
    view.setTextElideMode(elide)
    view.verticalHeader().hide()
    view.verticalHeader().setDefaultSectionSize(24)
    view.horizontalHeader().setSortIndicator(-1, Qt.AscendingOrder)    # file order until a header is clicked
    view.setSortingEnabled(True)
    view.horizontalHeader().setHighlightSections(False)
    view.horizontalHeader().setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
    return view


def _search_box(placeholder: str) -> QLineEdit:
    box = QLineEdit(placeholderText=placeholder, clearButtonEnabled=True)
    box.setObjectName("searchBox")
    return box


class InspectorPanel(QWidget):
    """Binds a `MetadataModel` and a `TensorTableModel` to two searchable tables.

    `overrides_requested(tuple[MetadataOverride, ...])`: the model options ask for the model to be
    reopened with these overrides (the window does it)."""

    overrides_requested = Signal(object)

    def __init__(self, parent: QWidget | None = None, device_of: Callable[[str], str] | None = None):
        super().__init__(parent)
        self.setObjectName("inspectorPanel")
        self.loaded: LoadedModel | None = None
        self.metadata_model = MetadataModel(parent=self)
        self.metadata_proxy = SearchFilterProxy([MetadataModel.COL_KEY, MetadataModel.COL_VALUE], self)
        self.metadata_proxy.setSourceModel(self.metadata_model)
        self.tensor_model = TensorTableModel(device_of=device_of, parent=self)
        self.tensor_proxy = SearchFilterProxy([TensorTableModel.COL_NAME, TensorTableModel.COL_TYPE], self)
        self.tensor_proxy.setSourceModel(self.tensor_model)
        self._search_timer = QTimer(self, singleShot=True, interval=DEBOUNCE_MS)
        self._search_timer.timeout.connect(self.apply_tensor_search)

        self.stack = QStackedWidget()
        self.empty_label = QLabel("No model open.\nUse File › Open, pick one from Models on this machine, "
                                  "or drop a .gguf file on the window.", objectName="emptyLabel",
                                  alignment=Qt.AlignCenter)
        self.stack.addWidget(self.empty_label)
        self.stack.addWidget(self._build_content())
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.stack)
        for signal in (self.tensor_proxy.rowsInserted, self.tensor_proxy.rowsRemoved,
                       self.tensor_proxy.modelReset, self.tensor_proxy.layoutChanged):
            signal.connect(self._update_match_summary)

    def _build_content(self) -> QWidget:
        self.title = QLabel(objectName="panelTitle", textFormat=Qt.PlainText)
        self.subtitle = QLabel(objectName="mutedLabel", textFormat=Qt.PlainText,
                               textInteractionFlags=Qt.TextSelectableByMouse)
        self.notes = QLabel(objectName="noteLabel", wordWrap=True, textFormat=Qt.PlainText)
        self.notes.hide()

        self.tensor_search = _search_box(r"Filter tensors by name or type — text or regex, e.g. blk\.\d+\.ffn_.*_exps")
        self.tensor_search.textChanged.connect(self._on_tensor_search_changed)
        self.match_summary = QLabel(objectName="mutedLabel")
        self.tensor_view = _table(self.tensor_proxy, Qt.ElideMiddle)     # tensor names differ at both ends
        header = self.tensor_view.horizontalHeader()
        header.setSectionResizeMode(TensorTableModel.COL_NAME, QHeaderView.Stretch)
        for column, width in ((TensorTableModel.COL_TYPE, 80), (TensorTableModel.COL_SHAPE, 140),
                              (TensorTableModel.COL_BYTES, 96), (TensorTableModel.COL_DEVICE, 80)):
            header.setSectionResizeMode(column, QHeaderView.Interactive)
            header.resizeSection(column, width)

        self.metadata_search = _search_box("Filter metadata by key or value")
        self.metadata_search.textChanged.connect(self._on_metadata_search_changed)
        self.metadata_view = _table(self.metadata_proxy, Qt.ElideRight)
        header = self.metadata_view.horizontalHeader()
        header.resizeSection(MetadataModel.COL_KEY, KEY_COLUMN_MIN_PX)
        header.resizeSection(MetadataModel.COL_TYPE, 72)
        header.setStretchLastSection(True)

        self.model_options = ModelOptionsWidget()
        self.model_options.apply_requested.connect(self.overrides_requested)
        self.side_tabs = QTabWidget(documentMode=True, objectName="inspectorSideTabs")
        self.side_tabs.addTab(self._section(None, self.metadata_search, self.metadata_view), "Metadata")
        self.side_tabs.addTab(self.model_options, "Model options")

        splitter = QSplitter(Qt.Horizontal, childrenCollapsible=False)
        splitter.addWidget(self._section("Tensors", self.tensor_search, self.tensor_view, self.match_summary))
        splitter.addWidget(self.side_tabs)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([660, 640])

        content = QWidget()
        layout = QVBoxLayout(content)
        layout.setContentsMargins(16, 14, 16, 12)
        layout.setSpacing(6)
        layout.addWidget(self.title)
        layout.addWidget(self.subtitle)
        layout.addWidget(self.notes)
        layout.addSpacing(6)
        layout.addWidget(splitter, 1)
        return content

    @staticmethod
    def _section(title: str | None, search: QLineEdit, view: QTableView, footer: QLabel | None = None) -> QWidget:
        """A search box over a table, under a heading unless `title` is None (a tab names it)."""
        section = QWidget()
        layout = QVBoxLayout(section)
        layout.setContentsMargins(0, 0, 6, 0)
        layout.setSpacing(6)
        if title is not None:
            heading_row = QHBoxLayout()
            heading_row.addWidget(QLabel(title, objectName="sectionTitle"))
            heading_row.addStretch(1)
            if footer is not None:
                heading_row.addWidget(footer)
            layout.addLayout(heading_row)
        layout.addWidget(search)
        layout.addWidget(view, 1)
        return section

    # --- binding ------------------------------------------------------------------------------

    def _fit_key_column(self) -> None:
        """Keys are read whole: the key column takes the longest key (within reason), never less."""
        view = self.metadata_view
        view.resizeColumnToContents(MetadataModel.COL_KEY)
        width = view.horizontalHeader().sectionSize(MetadataModel.COL_KEY)
        view.horizontalHeader().resizeSection(MetadataModel.COL_KEY,
                                              min(max(width + 12, KEY_COLUMN_MIN_PX), KEY_COLUMN_MAX_PX))

    def set_model(self, loaded: LoadedModel | None) -> None:
        self.loaded = loaded
        self.metadata_model.set_metadata(loaded.model_file.metadata if loaded else None)
        self._fit_key_column()
        self.tensor_model.set_inventory(loaded.inventory if loaded else None)
        self.model_options.set_model(loaded)
        self.stack.setCurrentIndex(1 if loaded else 0)
        if loaded is None:
            return
        inventory = loaded.inventory
        parts = len(loaded.model_file.paths)
        # the name, architecture and notes quote the file: escaped, and never read as markup
        self.title.setText(printable(inventory.name, 120))
        self.subtitle.setText(
            f"{printable(inventory.arch, 40)}  ·  {inventory.n_layer} layers  ·  "
            + (f"{inventory.n_expert} experts  ·  " if inventory.n_expert else "")
            + f"{len(inventory.tensors):,} tensors  ·  {format_bytes(inventory.total_bytes)} of weights  ·  "
            + (f"{parts} files  ·  " if parts > 1 else "") + str(loaded.path))
        self.notes.setText(printable("\n".join(inventory.notes), 4000, keep_lines=True))
        self.notes.setVisible(bool(inventory.notes))
        self._update_match_summary()

    def set_device_of(self, device_of: Callable[[str], str] | None) -> None:
        self.tensor_model.set_device_of(device_of)

    # --- search -------------------------------------------------------------------------------

    def _on_tensor_search_changed(self, _text: str) -> None:
        if self.tensor_model.rowCount() > DEBOUNCE_ROWS:
            self._search_timer.start()
        else:
            self.apply_tensor_search()

    def apply_tensor_search(self) -> None:
        valid = self.tensor_proxy.set_search(self.tensor_search.text())
        _mark_invalid(self.tensor_search, not valid, "not a valid regex: matching the text literally")

    def _on_metadata_search_changed(self, text: str) -> None:
        valid = self.metadata_proxy.set_search(text)
        _mark_invalid(self.metadata_search, not valid, "not a valid regex: matching the text literally")

    def _update_match_summary(self, *_args) -> None:
        shown, total = self.tensor_proxy.rowCount(), self.tensor_model.rowCount()
        shown_bytes = sum(self.tensor_proxy.index(row, 0).data(BytesRole) for row in range(shown))
        noun = "tensor" if total == 1 else "tensors"
        prefix = f"{shown:,} of {total:,} {noun}" if shown != total else f"{total:,} {noun}"
        self.match_summary.setText(f"{prefix}  ·  {format_bytes(shown_bytes)}")


def _mark_invalid(box: QLineEdit, invalid: bool, reason: str) -> None:
    if bool(box.property("invalid")) != invalid:
        box.setProperty("invalid", invalid)
        box.style().unpolish(box)
        box.style().polish(box)
    box.setToolTip(reason if invalid else "")
