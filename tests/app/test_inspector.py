import numpy as np
import pytest
from PySide6.QtCore import QPersistentModelIndex, Qt

from app.models import BytesRole, DeviceRole, SortRole, TensorRole
from app.models.inspector import (MetadataModel, SearchFilterProxy, TensorTableModel, format_value, natural_key,
                                  value_type_name)
from app.widgets.inspector import InspectorPanel
from tooltips import shown

EXPERT_TENSOR = "blk.0.ffn_up_exps.weight"


@pytest.fixture
def metadata_model(loaded):
    return MetadataModel(loaded.model_file.metadata)


@pytest.fixture
def tensor_model(loaded):
    return TensorTableModel(loaded.inventory)


def cell(model, key_or_row, column, role=Qt.DisplayRole):
    row = key_or_row if isinstance(key_or_row, int) else find_row(model, key_or_row)
    return model.data(model.index(row, column), role)


def find_row(model, key: str) -> int:
    for row in range(model.rowCount()):
        if model.index(row, 0).data() == key:
            return row
    raise KeyError(key)


# --- metadata ---------------------------------------------------------------------------------

def test_metadata_model_passes_the_model_tester(qtmodeltester, metadata_model):
    qtmodeltester.check(metadata_model)


def test_metadata_rows_hold_key_type_and_value(metadata_model, loaded):
    m = MetadataModel
    assert metadata_model.rowCount() == len(loaded.model_file.metadata) == 27
    assert metadata_model.columnCount() == 3
    assert cell(metadata_model, 0, m.COL_KEY) == "general.architecture"
    assert cell(metadata_model, "general.architecture", m.COL_TYPE) == "string"
    assert cell(metadata_model, "general.architecture", m.COL_VALUE) == "llama"
    assert cell(metadata_model, "llama.expert_count", m.COL_TYPE) == "int"
    assert cell(metadata_model, "llama.expert_count", m.COL_VALUE) == "4"
    assert cell(metadata_model, "llama.expert_count", m.COL_VALUE, SortRole) == 4
    assert cell(metadata_model, "llama.attention.layer_norm_rms_epsilon", m.COL_VALUE) == "1e-05"
    assert cell(metadata_model, "llama.rope.freq_base", m.COL_VALUE) == "10000.0"
    assert cell(metadata_model, "tokenizer.ggml.add_bos_token", m.COL_TYPE) == "bool"
    assert cell(metadata_model, "tokenizer.ggml.add_bos_token", m.COL_VALUE) == "True"


def test_long_arrays_are_summarised(metadata_model):
    m = MetadataModel
    assert cell(metadata_model, "tokenizer.ggml.tokens", m.COL_TYPE) == "array[string]"
    assert cell(metadata_model, "tokenizer.ggml.tokens", m.COL_VALUE) == "[512 items: '<unk>', '<s>', '</s>', …]"
    assert cell(metadata_model, "tokenizer.ggml.token_type", m.COL_TYPE) == "array[int]"
    tooltip = shown(cell(metadata_model, "tokenizer.ggml.tokens", m.COL_VALUE, Qt.ToolTipRole))
    assert tooltip.startswith("'<unk>', '<s>', '</s>', '<0x00>'") and tooltip.endswith(", …")


def test_markup_in_file_strings_is_shown_as_typed():
    """A tensor name or metadata string of the file's choosing is text, never HTML: '<s>' must
    not strike through the rest, an <img> must not load, spacing stays."""
    from app.models import plain_tooltip
    for text in ("'<s>', '</s>'", '<img src="/etc/passwd">', "<table><tr><td>x</td></tr></table>",
                 "a  &amp;  b\nsecond line", "5 < 6 > 4"):
        assert shown(plain_tooltip(text)) == text


def test_value_formatting():
    assert format_value([1, 2, 3]) == "[1, 2, 3]"
    assert format_value("line one\nline two") == "line one⏎line two"
    assert len(format_value("x" * 1000)) == 160 and format_value("x" * 1000).endswith("…")
    assert format_value(0.1) == "0.1"                       # float64 that is not an f32: full repr
    assert format_value(float(np.float32(0.1))) == "0.1"    # f32 noise hidden
    assert value_type_name([]) == "array[?]"


def test_metadata_can_be_replaced_and_cleared(qtbot, metadata_model):
    with qtbot.waitSignal(metadata_model.modelReset):
        metadata_model.set_metadata({"a": 1})
    assert metadata_model.rowCount() == 1
    metadata_model.set_metadata(None)
    assert metadata_model.rowCount() == 0


# --- tensors ----------------------------------------------------------------------------------

def test_tensor_model_passes_the_model_tester(qtmodeltester, tensor_model):
    qtmodeltester.check(tensor_model)


def test_tensor_rows(tensor_model, loaded):
    t = TensorTableModel
    assert tensor_model.rowCount() == 23
    assert [tensor_model.headerData(c, Qt.Horizontal) for c in range(5)] == ["Name", "Type", "Shape (ne)", "Bytes", "Device"]
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_TYPE) == "Q4_K"
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_SHAPE) == "256 × 256 × 4"      # ne order, as gguf-dump
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_BYTES) == "144.0 KiB"
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_BYTES, BytesRole) == 147456
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_BYTES, SortRole) == 147456
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_SHAPE, SortRole) == 4 * 256 * 256
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_DEVICE) == "CPU"
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_DEVICE, DeviceRole) == "CPU"
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_NAME, TensorRole) is loaded.inventory.by_name[EXPERT_TENSOR]
    assert "4 experts × 36,864 bytes" in shown(cell(tensor_model, EXPERT_TENSOR, t.COL_BYTES, Qt.ToolTipRole))
    assert "ne = [256, 256, 4]" in shown(cell(tensor_model, EXPERT_TENSOR, t.COL_SHAPE, Qt.ToolTipRole))
    assert "numpy order (rows first): 4 × 256 × 256" in shown(
        cell(tensor_model, EXPERT_TENSOR, t.COL_SHAPE, Qt.ToolTipRole))
    assert cell(tensor_model, "output_norm.weight", t.COL_SHAPE) == "256"
    total = sum(cell(tensor_model, row, t.COL_BYTES, BytesRole) for row in range(23))
    assert total == loaded.total_bytes


def test_device_column_follows_device_of_with_one_narrow_change(qtbot, tensor_model):
    t = TensorTableModel
    with qtbot.waitSignal(tensor_model.dataChanged) as blocker:
        tensor_model.set_device_of(lambda name: "CUDA0" if "_exps" in name else "CPU")
    top_left, bottom_right, roles = blocker.args
    assert (top_left.column(), bottom_right.column()) == (t.COL_DEVICE, t.COL_DEVICE)
    assert (top_left.row(), bottom_right.row()) == (0, 22)
    assert DeviceRole in roles
    assert cell(tensor_model, EXPERT_TENSOR, t.COL_DEVICE) == "CUDA0"
    assert cell(tensor_model, "blk.0.attn_q.weight", t.COL_DEVICE, DeviceRole) == "CPU"


def test_refresh_devices_emits_one_change_per_run_of_rows(tensor_model):
    t = TensorTableModel
    changes = []
    tensor_model.dataChanged.connect(lambda tl, br, roles: changes.append((tl.row(), br.row(), tl.column())))
    names = [tensor_model.tensor_at(row).name for row in (3, 4, 5, 9)]
    tensor_model.refresh_devices(names + ["not.a.tensor"])
    assert changes == [(3, 5, t.COL_DEVICE), (9, 9, t.COL_DEVICE)]


def test_natural_sort_key_puts_layer_2_before_layer_10():
    names = ["blk.10.attn_q.weight", "blk.2.attn_q.weight", "blk.1.attn_q.weight"]
    assert sorted(names, key=natural_key) == ["blk.1.attn_q.weight", "blk.2.attn_q.weight", "blk.10.attn_q.weight"]


# --- search and sort --------------------------------------------------------------------------

@pytest.fixture
def tensor_proxy(tensor_model):
    proxy = SearchFilterProxy([TensorTableModel.COL_NAME, TensorTableModel.COL_TYPE])
    proxy.setSourceModel(tensor_model)
    return proxy


def shown_names(proxy) -> list[str]:
    return [proxy.index(row, TensorTableModel.COL_NAME).data() for row in range(proxy.rowCount())]


def test_proxy_passes_the_model_tester(qtmodeltester, tensor_proxy):
    tensor_proxy.set_search("exps")
    qtmodeltester.check(tensor_proxy)


def test_search_is_a_regex_over_name_and_type(tensor_proxy):
    assert tensor_proxy.set_search(r"blk\.1\.ffn_.*_exps")
    assert sorted(shown_names(tensor_proxy)) == ["blk.1.ffn_down_exps.weight", "blk.1.ffn_gate_exps.weight",
                                                 "blk.1.ffn_up_exps.weight"]
    assert tensor_proxy.set_search("q6_k")      # a type, any case
    assert tensor_proxy.rowCount() == 3
    assert tensor_proxy.set_search("")
    assert tensor_proxy.rowCount() == 23


def test_an_invalid_regex_matches_literally(tensor_proxy):
    assert tensor_proxy.set_search("exps[") is False
    assert tensor_proxy.rowCount() == 0
    assert tensor_proxy.set_search("(") is False
    assert tensor_proxy.rowCount() == 0


def test_bytes_sort_numerically(tensor_proxy, loaded):
    tensor_proxy.sort(TensorTableModel.COL_BYTES, Qt.DescendingOrder)
    shown = [tensor_proxy.index(row, 0).data(BytesRole) for row in range(tensor_proxy.rowCount())]
    assert shown == sorted((t.n_bytes for t in loaded.inventory.tensors), reverse=True)
    assert shown[0] == 215040       # blk.1.ffn_down_exps (Q6_K)
    assert tensor_proxy.index(0, 0).data() == "blk.1.ffn_down_exps.weight"


def test_sorting_the_view_sorts_the_source_once_and_keeps_selections(qtbot, loaded):
    panel = InspectorPanel()
    qtbot.addWidget(panel)
    panel.set_model(loaded)
    source = panel.tensor_model
    selected = QPersistentModelIndex(source.index(source.row_of(EXPERT_TENSOR), TensorTableModel.COL_NAME))
    with qtbot.waitSignal(source.layoutChanged):
        panel.tensor_view.sortByColumn(TensorTableModel.COL_BYTES, Qt.DescendingOrder)
    assert panel.tensor_proxy.index(0, TensorTableModel.COL_NAME).data() == "blk.1.ffn_down_exps.weight"
    assert selected.data() == EXPERT_TENSOR and selected.row() == source.row_of(EXPERT_TENSOR)
    panel.tensor_view.sortByColumn(TensorTableModel.COL_NAME, Qt.AscendingOrder)
    names = [panel.tensor_proxy.index(r, 0).data() for r in range(panel.tensor_proxy.rowCount())]
    assert names[:3] == ["blk.0.attn_k.weight", "blk.0.attn_norm.weight", "blk.0.attn_output.weight"]
    assert names[-1] == "token_embd.weight"
    panel.set_model(loaded)         # a new model keeps the chosen order
    assert panel.tensor_proxy.index(0, 0).data() == "blk.0.attn_k.weight"
    source.sort(-1)
    assert source.index(0, 0).data() == loaded.inventory.tensors[0].name


# --- the panel --------------------------------------------------------------------------------

def test_panel_shows_the_model_and_sums_what_the_search_matches(qtbot, loaded):
    panel = InspectorPanel()
    qtbot.addWidget(panel)
    assert panel.stack.currentWidget() is panel.empty_label
    panel.set_model(loaded)
    assert panel.stack.currentIndex() == 1
    assert panel.title.text() == "fixture-llama-moe"
    assert "llama" in panel.subtitle.text() and "4 experts" in panel.subtitle.text()
    assert panel.tensor_view.model().rowCount() == 23
    assert panel.metadata_view.model().rowCount() == 27
    assert panel.match_summary.text() == "23 tensors  ·  1.3 MiB"
    qtbot.keyClicks(panel.tensor_search, "ffn_up_exps")
    expert_bytes = 147456 + 147456
    assert panel.tensor_proxy.rowCount() == 2
    assert panel.match_summary.text() == f"2 of 23 tensors  ·  {expert_bytes / 1024:.1f} KiB"
    panel.tensor_search.setText("exps[")
    assert panel.tensor_search.property("invalid") is True
    panel.metadata_search.setText("expert")
    assert panel.metadata_proxy.rowCount() == 2
    panel.set_model(None)
    assert panel.stack.currentWidget() is panel.empty_label
    assert panel.tensor_model.rowCount() == 0


def test_panel_takes_a_device_function(qtbot, loaded):
    panel = InspectorPanel(device_of=lambda name: "CUDA1")
    qtbot.addWidget(panel)
    panel.set_model(loaded)
    assert panel.tensor_proxy.index(0, TensorTableModel.COL_DEVICE).data() == "CUDA1"
    panel.set_device_of(None)
    assert panel.tensor_proxy.index(0, TensorTableModel.COL_DEVICE).data() == "CPU"


def test_metadata_keys_are_not_cut_off(qtbot, loaded):
    from app.models.inspector import MetadataModel
    panel = InspectorPanel()
    qtbot.addWidget(panel)
    panel.resize(1280, 760)
    panel.set_model(loaded)
    view = panel.metadata_view
    metrics = view.fontMetrics()
    model = view.model()
    longest = max(metrics.horizontalAdvance(model.index(r, MetadataModel.COL_KEY).data())
                  for r in range(model.rowCount()))
    assert view.horizontalHeader().sectionSize(MetadataModel.COL_KEY) >= longest
