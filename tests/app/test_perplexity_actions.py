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


class LayerGate:
    """A test hook around a model's family: counts the layers run, and holds one chosen layer
    until the test has pressed Cancel, so the cancel lands mid-chunk at a known layer."""

    HOLD_TIMEOUT_S = 60

    def __init__(self, hold_at_layer_run: int):
        import threading
        self.hold_at = hold_at_layer_run      # the n-th layer run (1-based, over the whole job)
        self.layers_run = 0
        self.reached = threading.Event()
        self.release = threading.Event()

    def wrap(self, family):
        gate = self

        class GatedFamily:
            def __getattr__(self, name):
                return getattr(family, name)

            def forward_layer(self, model, il, x, batch):
                gate.layers_run += 1
                x = family.forward_layer(model, il, x, batch)
                if gate.layers_run == gate.hold_at:
                    gate.reached.set()
                    gate.release.wait(gate.HOLD_TIMEOUT_S)
                return x
        return GatedFamily()

    def factory(self, model_file, run_config, placement):
        from app.engine_jobs import default_model_factory
        model = default_model_factory(model_file, run_config, placement)
        model.family = self.wrap(model.family)
        return model


def test_cancel_stops_within_a_layer_and_keeps_the_chunks_scored(qtbot, bridge, dialogs, fixtures_dir):
    from engine.gguf.model_file import ModelFile
    from engine.plan.inventory import Inventory
    path = fixtures_dir / "gemma3" / "Q8_0.gguf"
    model_file = ModelFile(path)
    gemma = LoadedModel(path, model_file, Inventory.from_model_file(model_file), 0.0)
    n_layer = int(model_file.metadata["gemma3.block_count"])
    gate = LayerGate(hold_at_layer_run=n_layer + 2)      # the second layer of the second chunk
    panel = PerplexityPanel(bridge, dialogs, model_factory=gate.factory)
    qtbot.addWidget(panel)
    panel.n_ctx_spin.setValue(64)       # one ubatch per chunk: before, a cancel waited for the whole chunk
    panel.set_text(TEXT * 4)
    panel.set_model(gemma)
    results = []
    panel.controller.perplexity_result.connect(results.append)
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert panel.run() is not None
        qtbot.waitUntil(gate.reached.is_set, timeout=RUN_TIMEOUT_MS)
        panel.cancel()
        layers_at_cancel = gate.layers_run
        gate.release.set()
    assert blocker.args == ["cancelled"]
    # the layer in flight finishes; no other starts (before: the chunk's other layers, its output and more)
    assert gate.layers_run - layers_at_cancel == 0
    assert panel.controller.headline.startswith("PPL = ") and panel.controller.headline != "PPL = —"
    assert "after 1 of" in panel.controller.detail and results == []
