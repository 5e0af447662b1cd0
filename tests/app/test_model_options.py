import shlex
import threading

import numpy as np
import pytest
from PySide6.QtCore import Qt

from app.bridge import JobContext
from app.engine_jobs import load_model
from app.main_window import Dialogs, MainWindow
from app.models.model_options import (OverrideRole, OverridesModel, override_key_candidates, override_kv_flags,
                                      override_type_of)
from app.widgets.model_options import ModelOptionsWidget
from engine.arch.overrides import MetadataOverride, OverrideError, parse_override_kv, parse_override_kv_list

TIMEOUT_MS = 10_000
USED = "llama.expert_used_count"


def job_context() -> JobContext:
    return JobContext(1, threading.Event(), lambda *args: None)


@pytest.fixture
def overrides_model(loaded):
    model = OverridesModel(loaded.model_file.metadata)
    model.set_overrides([parse_override_kv(f"{USED}=int:1"), parse_override_kv("general.name=str:a, b"),
                         parse_override_kv("llama.rope.scaling.type=str:linear")])
    return model


@pytest.fixture
def options(qtbot, loaded):
    widget = ModelOptionsWidget()
    qtbot.addWidget(widget)
    widget.set_model(loaded)
    return widget


@pytest.fixture
def window(qtbot, bridge, settings):
    window = MainWindow(bridge, settings, Dialogs(), model_locations=lambda folders: [])
    qtbot.addWidget(window)
    return window


def open_and_wait(qtbot, window, path):
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS) as blocker:
        window.open_model(path)
    return blocker.args[0]


# --- the Qt model -------------------------------------------------------------------------------

def test_overrides_model_passes_the_model_tester(qtmodeltester, overrides_model):
    qtmodeltester.check(overrides_model)


def test_rows_hold_key_type_value_and_the_files_value(overrides_model):
    m = overrides_model

    def cell(row, column, role=Qt.DisplayRole):
        return m.data(m.index(row, column), role)

    assert m.rowCount() == 3 and m.columnCount() == 4
    assert [cell(0, c) for c in range(4)] == [USED, "int", "1", "2"]
    assert [cell(1, c) for c in range(4)] == ["general.name", "str", "a, b", "fixture-llama-moe"]
    assert cell(2, OverridesModel.COL_FILE_VALUE) == "—"       # a known key the file does not hold
    assert cell(0, 0, OverrideRole) == MetadataOverride(USED, "int", 1)
    assert cell(0, 0, Qt.ToolTipRole) == f"{USED}=int:1"
    assert m.headerData(OverridesModel.COL_FILE_VALUE, Qt.Horizontal) == "In file"
    assert m.flags(m.index(0, OverridesModel.COL_VALUE)) & Qt.ItemIsEditable
    assert not m.flags(m.index(0, OverridesModel.COL_KEY)) & Qt.ItemIsEditable


def test_put_replaces_a_key_in_place_with_one_narrow_change(qtbot, overrides_model):
    m = overrides_model
    changes = []
    m.dataChanged.connect(lambda top, bottom, roles: changes.append((top.row(), top.column(), bottom.column())))
    with qtbot.assertNotEmitted(m.rowsInserted), qtbot.assertNotEmitted(m.modelReset):
        assert m.put(MetadataOverride(USED, "int", 3)) == 0
    assert changes == [(0, OverridesModel.COL_TYPE, OverridesModel.COL_VALUE)]
    assert m.index(0, OverridesModel.COL_VALUE).data() == "3"
    with qtbot.waitSignal(m.rowsInserted):
        assert m.put(parse_override_kv("tokenizer.ggml.add_bos_token=bool:false")) == 3
    assert m.index(3, OverridesModel.COL_VALUE).data() == "false"
    assert m.index(3, OverridesModel.COL_FILE_VALUE).data() == "True"


def test_editing_a_value_must_parse_as_the_rows_type(overrides_model):
    m = overrides_model
    index = m.index(0, OverridesModel.COL_VALUE)
    assert not m.setData(index, "two")
    assert not m.setData(m.index(0, OverridesModel.COL_KEY), "x")
    assert m.overrides()[0].value == 1
    assert m.setData(index, "3")
    assert m.overrides()[0] == MetadataOverride(USED, "int", 3)


def test_remove_rows_keeps_the_others_in_order(overrides_model):
    overrides_model.remove_rows([2, 0, 7])
    assert [o.key for o in overrides_model.overrides()] == ["general.name"]


def test_flags_are_llama_cpp_arguments_that_read_back_to_the_same_overrides(overrides_model):
    overrides = overrides_model.overrides()
    flags = override_kv_flags(overrides)
    assert flags.startswith(f"--override-kv {USED}=int:1 --override-kv ")
    words = shlex.split(flags)
    assert words[0::2] == ["--override-kv"] * 3
    # the comma inside "a, b" is quoted, as llama.cpp's parse_csv_row reads it
    assert [o for w in words[1::2] for o in parse_override_kv_list(w)] == list(overrides)
    assert override_kv_flags([]) == ""


def test_keys_and_their_types_come_from_the_file_and_the_architecture(loaded):
    md = loaded.model_file.metadata
    keys = override_key_candidates("llama", md)
    assert keys[:3] == ["general.architecture", "general.name", "llama.vocab_size"]      # file order first
    assert USED in keys and "llama.rope.scaling.type" in keys and "llama.expert_shared_count" in keys
    assert "tokenizer.ggml.tokens" not in keys                      # arrays cannot be overridden
    assert not any("{" in k for k in keys) and len(keys) == len(set(keys))
    assert override_type_of("llama", md, USED) == "int"
    assert override_type_of("llama", md, "llama.rope.freq_base") == "float"
    assert override_type_of("llama", md, "tokenizer.ggml.add_bos_token") == "bool"
    assert override_type_of("llama", md, "llama.rope.scaling.type") == "str"
    assert override_type_of("llama", md, "tokenizer.ggml.scores") == "array"
    assert override_type_of("llama", md, "llama.expert_usd_count") is None


# --- the bridge ---------------------------------------------------------------------------------

def test_load_model_applies_overrides_before_the_inventory(moe_path):
    plain = load_model(moe_path, job_context())
    assert plain.overrides == () and plain.inventory.hparams.n_expert_used == 2
    loaded = load_model(moe_path, job_context(), [f"{USED}=int:1"])
    assert loaded.overrides == (MetadataOverride(USED, "int", 1),)
    assert loaded.inventory.hparams.n_expert_used == 1
    assert loaded.model_file.metadata[USED] == 1 and loaded.metadata_in_file[USED] == 2
    assert "1 metadata override" in loaded.summary()
    with pytest.raises(OverrideError, match="must be 1..4"):
        load_model(moe_path, job_context(), [f"{USED}=int:9"])


def test_the_chat_and_perplexity_model_runs_with_the_overridden_expert_count(moe_path):
    from app.engine_jobs import default_model_factory
    from engine.run_config import RunConfig
    loaded = load_model(moe_path, job_context(), [f"{USED}=int:1"])
    model = default_model_factory(loaded.model_file, RunConfig(n_ctx=32), None)
    tokens = np.array([1, 5, 9, 13], dtype=np.int32)
    model.eval_logits(tokens, model.new_cache(32))
    # the router picked one expert per token in each layer, not the file's two
    assert model.expert_counts.sum(axis=1).tolist() == [len(tokens)] * model.hparams.n_layer


# --- the widget ---------------------------------------------------------------------------------

def test_the_type_follows_the_key_and_the_value_shows_the_files(qtbot, options):
    qtbot.keyClicks(options.key_edit, "llama.rope.freq_base")
    assert options.type_combo.currentText() == "float"
    assert options.value_edit.placeholderText() == "file: 10000.0"
    options.key_edit.setText("tokenizer.ggml.add_bos_token")
    assert options.type_combo.currentText() == "bool"
    options.value_edit.setText("false")
    qtbot.mouseClick(options.add_button, Qt.LeftButton)
    assert options.model.overrides() == (MetadataOverride("tokenizer.ggml.add_bos_token", "bool", False),)
    assert options.key_edit.text() == "" and options.error_text == ""
    assert options.flags_edit.text() == "--override-kv tokenizer.ggml.add_bos_token=bool:false"
    assert options.status_label.text() == "Not applied yet."


def test_the_key_field_completes_over_known_keys(qtbot, options):
    completer = options.key_edit.completer()
    completer.setCompletionPrefix("expert_used")
    assert completer.currentCompletion() == USED


def test_a_malformed_entry_is_refused_inline(qtbot, options):
    options.key_edit.setText(USED)
    options.value_edit.setText("two")
    assert not options.add_from_fields()
    assert "'two' is not an integer" in options.error_text
    assert options.model.rowCount() == 0


def test_the_experts_preset_writes_the_expert_used_count(qtbot, options):
    assert not options.presets.isHidden()
    assert (options.experts_spin.minimum(), options.experts_spin.maximum(), options.experts_spin.value()) == (1, 4, 2)
    options.experts_spin.setValue(3)
    qtbot.mouseClick(options.experts_button, Qt.LeftButton)
    assert options.model.overrides() == (MetadataOverride(USED, "int", 3),)


def test_a_dense_model_has_no_experts_preset(qtbot, fixtures_dir):
    widget = ModelOptionsWidget()
    qtbot.addWidget(widget)
    widget.set_model(load_model(fixtures_dir / "llama-dense" / "Q4_K_M.gguf", job_context()))
    assert widget.presets.isHidden()
    widget.set_model(None)
    assert not widget.isEnabled() and widget.model.rowCount() == 0


def test_apply_emits_only_a_valid_changed_set(qtbot, options):
    with qtbot.assertNotEmitted(options.apply_requested):
        assert options.apply()                      # nothing changed: nothing to reopen
    assert options.status_label.text() == "These overrides are already in effect."
    options.model.put(MetadataOverride(USED, "int", 9))
    assert "must be 1..4" in options.error_text     # shown as soon as the row is in
    with qtbot.assertNotEmitted(options.apply_requested):
        assert not options.apply()
    options.model.put(MetadataOverride(USED, "int", 1))
    assert options.error_text == ""
    with qtbot.waitSignal(options.apply_requested) as blocker:
        assert options.apply()
    assert blocker.args == [(MetadataOverride(USED, "int", 1),)]


# --- the window ---------------------------------------------------------------------------------

def apply_and_wait(qtbot, window, options):
    with qtbot.waitSignal(window.model_loaded, timeout=TIMEOUT_MS) as blocker:
        qtbot.mouseClick(options.apply_button, Qt.LeftButton)
    return blocker.args[0]


def test_overrides_reopen_the_model_and_removing_them_restores_it(qtbot, window, moe_path):
    original = open_and_wait(qtbot, window, moe_path)
    options = window.inspector.model_options
    assert options.model.rowCount() == 0 and options.status_label.text() == "As in the file."

    qtbot.keyClicks(options.key_edit, f"{USED}=int:1")
    qtbot.keyClick(options.key_edit, Qt.Key_Return)
    assert options.model.overrides() == (MetadataOverride(USED, "int", 1),)
    loaded = apply_and_wait(qtbot, window, options)
    assert window.loaded is loaded and loaded is not original
    assert loaded.inventory.hparams.n_expert_used == 1
    assert loaded.overrides == (MetadataOverride(USED, "int", 1),)
    metadata = window.inspector.metadata_model        # the inspector shows the values in effect
    assert [metadata.value_at(r) for r in range(metadata.rowCount()) if metadata.key_at(r) == USED] == [1]
    assert options.model.overrides() == loaded.overrides            # the table shows what is in effect
    assert options.status_label.text() == "1 override in effect."
    assert options.experts_spin.value() == 1

    for bad, expected in ((f"{USED}=int:9", "the model has 4 experts, so it must be 1..4"),
                          ("llama.expert_usd_count=int:1", f"did you mean {USED}")):
        options.model.set_overrides([parse_override_kv(bad)])
        with qtbot.assertNotEmitted(window.model_loaded, wait=50):
            qtbot.mouseClick(options.apply_button, Qt.LeftButton)
        assert expected in options.error_text
        assert window.loaded is loaded and window.bridge.is_busy() is False

    options.revert()
    options.table.selectRow(0)
    options.remove_selected()
    assert options.model.rowCount() == 0 and options.flags_edit.text() == ""
    restored = apply_and_wait(qtbot, window, options)
    assert restored.overrides == ()
    assert restored.inventory.hparams.n_expert_used == original.inventory.hparams.n_expert_used == 2
    assert restored.model_file.metadata[USED] == 2


def test_a_reopen_that_fails_keeps_the_model_and_shows_the_error(qtbot, window, moe_path):
    loaded = open_and_wait(qtbot, window, moe_path)
    handle = window.reopen_with_overrides([MetadataOverride(USED, "int", 0)])
    qtbot.waitUntil(lambda: handle.done, timeout=TIMEOUT_MS)
    assert window.loaded is loaded
    assert window.message_bar.level == "error"
    assert window.message_bar.text.startswith("Could not reopen the model with these overrides.")
    assert "must be 1..4" in window.message_bar.text


def test_reopening_with_no_model_open_is_an_error(window):
    assert window.reopen_with_overrides([]) is None
    assert window.message_bar.level == "error" and "Open a model first" in window.message_bar.text
