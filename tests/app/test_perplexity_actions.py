"""The perplexity panel tells the truth and loses nothing: the "Open a model" hint goes once a
model is open, the log keeps the KV cache types and the placement, a saved base is not replaced
without asking, and a plan over capacity is not run without the user's say-so."""
import pytest

from app.engine_jobs import MODE_SAVE_BASE, LoadedModel
from app.widgets.perplexity import OPEN_A_MODEL, PerplexityPanel
from engine.run_config import RunConfig

RUN_TIMEOUT_MS = 240_000
TEXT = ("The quick brown fox jumps over the lazy dog while the engine counts every token it sees. "
        "Perplexity measures how surprised a model is by a text, chunk by chunk. ") * 4
REFUSAL = "Does not fit: CUDA0 over by 5.6 GiB. Loading it would run out of memory. Ways out: Auto-fit ..."


@pytest.fixture(scope="module")
def loaded(fixtures_dir) -> LoadedModel:
    from engine.gguf.model_file import ModelFile
    from engine.plan.inventory import Inventory
    path = fixtures_dir / "llama-moe" / "Q4_K_M.gguf"
    model_file = ModelFile(path)
    return LoadedModel(path, model_file, Inventory.from_model_file(model_file), 0.0)


class FakeDialogs:
    def __init__(self):
        self.overwrite = False
        self.run_anyway = False
        self.asked: list[tuple[str, str]] = []

    def confirm_overwrite(self, parent, path: str) -> bool:
        self.asked.append(("overwrite", path))
        return self.overwrite

    def confirm_over_capacity(self, parent, refusal: str) -> bool:
        self.asked.append(("capacity", refusal))
        return self.run_anyway


@pytest.fixture
def dialogs():
    return FakeDialogs()


@pytest.fixture
def panel(qtbot, bridge, dialogs):
    panel = PerplexityPanel(bridge, dialogs)
    qtbot.addWidget(panel)
    panel.resize(1200, 760)
    panel.n_ctx_spin.setValue(64)
    panel.set_text(TEXT)
    return panel


def run_to_end(qtbot, panel) -> str:
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert panel.run() is not None
    return blocker.args[0]


def test_the_open_a_model_hint_goes_when_a_model_is_open(panel, loaded):
    assert panel.progress_label.text() == OPEN_A_MODEL
    panel.set_model(loaded)
    assert panel.progress_label.text() != OPEN_A_MODEL and "Open a model" not in panel.progress_label.text()


def test_the_log_records_kv_cache_types_and_the_placement(qtbot, panel, loaded):
    from engine.devices import Device
    from engine.plan.llama_args import parse_llama_args
    panel.set_model(loaded)
    panel.set_run_config(RunConfig(type_k="q8_0", type_v="f16", flash_attn="off"))
    devices = [Device("CPU", "cpu", 64 << 30)]
    placement = parse_llama_args("", loaded.inventory, devices).placement
    panel.set_placement(placement)
    assert run_to_end(qtbot, panel) == "done"
    log = panel.log_text()
    assert "run settings: KV cache K q8_0, V f16, flash attention off" in log
    cpu_bytes = placement.weight_bytes()["CPU"]
    from engine.units import format_bytes
    assert f"placement: CPU {format_bytes(cpu_bytes)} of weights" in log


def test_save_as_base_asks_before_replacing_a_file(qtbot, panel, dialogs, loaded, tmp_path):
    panel.set_model(loaded)
    base = tmp_path / "base.kld"
    base.write_bytes(b"the user's earlier base")
    panel.set_mode(MODE_SAVE_BASE, base)
    assert panel.run() is None
    assert dialogs.asked == [("overwrite", str(base))] and base.read_bytes() == b"the user's earlier base"
    dialogs.overwrite = True
    assert run_to_end(qtbot, panel) == "done"
    assert base.read_bytes() != b"the user's earlier base"


def test_a_plan_over_capacity_is_not_run_without_asking(qtbot, panel, dialogs, loaded):
    panel.set_model(loaded)
    panel.set_fit_refusal(REFUSAL)
    assert panel.run() is None and not panel.is_running
    assert dialogs.asked == [("capacity", REFUSAL)]
    assert REFUSAL in panel.message_bar.label.text()
    dialogs.run_anyway = True
    assert run_to_end(qtbot, panel) == "done"
    assert run_to_end(qtbot, panel) == "done"            # once per plan
    assert len(dialogs.asked) == 2
