import math
import re
import time

import numpy as np
import pytest

from app.engine_jobs import LoadedModel
from app.engine_jobs import MODE_COMPARE, MODE_SAVE_BASE, default_model_factory
from app.models.perplexity import KldStatsModel, kld_rows
from app.perplexity_controller import format_big_result
from app.widgets.perplexity import PerplexityPanel
from app.widgets.ppl_plot import PerplexityPlot, nice_step, x_ticks, y_range
from engine.eval.perplexity import KLD_FRACTIONS, P_DIFF_FRACTIONS, KLDivergenceStats, PerplexityEvent, perplexity
from engine.run_config import RunConfig
from engine.text.tokenizer import Tokenizer

RUN_TIMEOUT_MS = 120_000
N_CTX = 64
TEXT = ("The quick brown fox jumps over the lazy dog while the engine counts every token it sees. "
        "Perplexity measures how surprised a model is by a text, chunk by chunk. ") * 4


class FakeDialogs:
    def __init__(self, path: str | None):
        self.path = path
        self.calls: list[str] = []

    def open_text_file(self, parent, start_dir):
        self.calls.append("text")
        return self.path

    def save_base_file(self, parent, start_dir):
        self.calls.append("save base")
        return self.path

    def open_base_file(self, parent, start_dir):
        self.calls.append("open base")
        return self.path


class SlowModel:
    def __init__(self, model, delay_s: float):
        self._model, self._delay_s = model, delay_s

    def __getattr__(self, name):
        return getattr(self._model, name)

    def eval_logits(self, *args, **kwargs):
        time.sleep(self._delay_s)
        return self._model.eval_logits(*args, **kwargs)


@pytest.fixture
def panel(qtbot, bridge, loaded):
    panel = PerplexityPanel(bridge, FakeDialogs(None))
    qtbot.addWidget(panel)
    panel.resize(1200, 760)
    panel.set_model(loaded)
    panel.n_ctx_spin.setValue(N_CTX)
    return panel


def run_to_end(qtbot, panel) -> str:
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert panel.run() is not None
    return blocker.args[0]


def reference_perplexity(loaded: LoadedModel, text: str, n_ctx: int):
    """The engine's own numbers for the same text, without the GUI."""
    model = default_model_factory(loaded.model_file, RunConfig(n_ctx=n_ctx), None)
    tokenizer = Tokenizer.from_metadata(model.metadata)
    tokens = np.asarray(tokenizer.encode(text, add_special=True), dtype=np.int32)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    *events, result = perplexity(tokens, n_ctx, lambda chunk: model.eval_logits(chunk, model.new_cache(n_ctx)),
                                 bos_id)
    return result


def fake_stats(n_scored: int = 500) -> KLDivergenceStats:
    return KLDivergenceStats(
        n_scored, 10.5, 0.25, 10.0, 0.24, 0.987, 0.0488, 0.002, 1.05, 0.0021, 0.5, 0.03,
        0.012345, 0.0004, tuple((f, 0.1 * f) for f in KLD_FRACTIONS), -0.0012, 0.0003,
        tuple((f, 0.02 * (f - 0.5)) for f in P_DIFF_FRACTIONS), 0.034, 0.001, 0.975, 0.007)


# ---- pure pieces -------------------------------------------------------------------------------

def test_kld_table_model(qtmodeltester):
    model = KldStatsModel()
    qtmodeltester.check(model)
    model.set_stats(fake_stats())
    qtmodeltester.check(model)
    rows = [model.row(r) for r in range(model.rowCount())]
    assert [r.name for r in rows if r.is_section] == ["Perplexity", "KL divergence", "Token probability"]
    assert model.rowCount() == 3 + 6 + 1 + len(KLD_FRACTIONS) + 1 + len(P_DIFF_FRACTIONS) + 2
    by_name = {r.name: r for r in rows}
    assert (by_name["Mean PPL(Q)"].value, by_name["Mean PPL(Q)"].error) == ("10.500000", "0.250000")
    assert by_name["Cor(ln(PPL(Q)), ln(PPL(base)))"].value == "98.70 %"
    assert (by_name["Mean KLD"].value, by_name["Mean KLD"].error) == ("0.012345", "0.000400")
    assert by_name["99.0% KLD"].value == "0.099000"
    assert by_name["Median KLD"].value == "0.050000"
    assert by_name["Mean Δp"].value == "-0.120 %"
    assert by_name["Same top p"].value == "97.500 %" and by_name["Same top p"].error == "0.700 %"
    assert model.index(1, KldStatsModel.COL_VALUE).data() == "10.500000"


def test_kld_rows_show_a_dash_for_what_could_not_be_estimated():
    stats = fake_stats()
    stats = KLDivergenceStats(**{**stats.__dict__, "ppl_error": float("nan")})
    assert next(r for r in kld_rows(stats) if r.name == "Mean PPL(Q)").error == "—"


def test_big_result_text():
    assert format_big_result(12.345678, 0.123456) == "PPL = 12.3457 +/- 0.1235"
    assert format_big_result(5.0, float("nan")) == "PPL = 5.0000 +/- ?"


@pytest.mark.parametrize("span, step", [(1.0, 0.2), (7.3, 2.0), (0.03, 0.01), (420.0, 100.0), (0.0, 1.0)])
def test_nice_step(span, step):
    assert nice_step(span) == pytest.approx(step)


def test_y_range_holds_the_values_on_tick_boundaries():
    low, high, step = y_range([12.31, 12.87, 13.4, float("nan")])
    assert (low, high) == pytest.approx((12.0, 13.5)) and step == pytest.approx(0.5)
    assert y_range([5.0, 5.0])[0] < 5.0 < y_range([5.0, 5.0])[1]


def test_x_ticks():
    assert x_ticks(0) == []
    assert x_ticks(4) == [1, 2, 3, 4]
    assert x_ticks(70) == [1, 10, 20, 30, 40, 50, 60, 70]
    assert x_ticks(101)[0] == 1 and x_ticks(101)[-1] == 101


def test_the_plot_paints_with_and_without_data(qtbot):
    plot = PerplexityPlot()
    qtbot.addWidget(plot)
    plot.resize(500, 260)
    plot.grab()
    plot.clear(5)
    for running, chunk in ((20.0, 20.0), (18.0, 16.1), (17.5, 16.5)):
        plot.append(running, chunk)
    assert plot.running_values() == [20.0, 18.0, 17.5] and plot.chunk_values() == [20.0, 16.1, 16.5]
    image = plot.grab().toImage()
    assert image.width() == 500


# ---- runs on a real model -------------------------------------------------------------------------

def test_a_run_on_pasted_text_matches_the_engine_and_shows_a_finite_ppl(qtbot, panel, loaded):
    panel.set_text(TEXT)
    live_chunk_ppl = []
    with qtbot.waitSignal(panel.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        handle = panel.run()
        handle.yielded.connect(lambda item: live_chunk_ppl.extend(
            panel.plot.chunk_values()[-1:] if isinstance(item, PerplexityEvent) else []))
    assert blocker.args == ["done"]
    result = panel.result
    reference = reference_perplexity(loaded, TEXT, N_CTX)
    assert math.isfinite(result.ppl) and result.ppl > 1
    assert result.ppl == pytest.approx(reference.ppl, rel=1e-9)
    assert result.running_ppl == pytest.approx(reference.running_ppl, rel=1e-9)
    assert panel.result_label.text() == f"PPL = {result.ppl:.4f} +/- {result.ppl_error:.4f}"
    assert re.fullmatch(r"PPL = \d+\.\d{4} \+/- \d+\.\d{4}", panel.result_label.text())
    log = panel.log_text()
    assert f"calculating perplexity over {result.n_chunks} chunks, n_ctx={N_CTX}" in log
    assert "".join(f"[{i + 1}]{v:.4f}," for i, v in enumerate(result.running_ppl)) in log
    assert f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}" in log
    assert panel.plot.running_values() == pytest.approx(list(result.running_ppl))
    assert live_chunk_ppl == pytest.approx(list(result.chunk_ppl), rel=1e-9)     # drawn as the chunks came
    assert panel.plot.chunk_values() == pytest.approx(list(result.chunk_ppl))
    assert panel.progress_bar.value() == panel.progress_bar.maximum()
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()


def test_cancel_stops_a_run_between_chunks(qtbot, bridge, loaded):
    panel = PerplexityPanel(bridge, model_factory=lambda *args: SlowModel(default_model_factory(*args), 0.05))
    qtbot.addWidget(panel)
    panel.set_model(loaded)
    panel.n_ctx_spin.setValue(N_CTX)
    panel.set_text(TEXT * 6)
    handle = panel.run()
    assert panel.cancel_button.isEnabled() and not panel.run_button.isEnabled()
    qtbot.waitUntil(lambda: len(panel.plot.running_values()) >= 1, timeout=RUN_TIMEOUT_MS)
    with qtbot.waitSignals([handle.cancelled, panel.run_finished], timeout=10_000):
        panel.cancel()
    n_done = len(panel.plot.running_values())
    assert 1 <= n_done < panel.started.n_chunks
    assert panel.progress_bar.value() == n_done and panel.progress_bar.maximum() == panel.started.n_chunks
    assert panel.result is None
    assert panel.log_text().endswith("cancelled")
    assert panel.progress_label.text() == "Cancelled"
    assert panel.run_button.isEnabled() and not panel.is_running
    panel.model_factory = default_model_factory         # and it runs again
    panel.set_text(TEXT)
    assert run_to_end(qtbot, panel) == "done"
    assert math.isfinite(panel.result.ppl)


def test_save_a_base_then_compare_with_it(qtbot, panel, tmp_path):
    base_path = tmp_path / "base.kld"
    text_path = tmp_path / "text.txt"
    text_path.write_text(TEXT, encoding="utf-8")
    panel.dialogs = FakeDialogs(str(text_path))
    panel.choose_text_file()
    assert panel.file_edit.text() == str(text_path) and panel.file_radio.isChecked()
    panel.set_mode(MODE_SAVE_BASE)
    panel.dialogs.path = str(base_path)
    panel.choose_base_file()
    assert panel.dialogs.calls == ["text", "save base"]
    assert run_to_end(qtbot, panel) == "done"
    base_ppl = panel.result.ppl
    assert base_path.stat().st_size > 0
    assert f"saved the base log-probabilities to {base_path}" in panel.log_text()

    panel.set_mode(MODE_COMPARE, base_path)
    assert run_to_end(qtbot, panel) == "done"
    stats = panel.result
    assert isinstance(stats, KLDivergenceStats)
    assert stats.ppl == pytest.approx(base_ppl, rel=1e-9)
    assert stats.base_ppl == pytest.approx(base_ppl, rel=1e-3)        # the base stores 16-bit log-probs
    assert abs(stats.kld) < 1e-3 and stats.same_top > 0.99
    assert panel.kld_model.rowCount() > 20
    assert panel.detail_tabs.currentIndex() == 1
    assert "====== KL divergence statistics ======" in panel.log_text()
    assert panel.kld_note.isVisibleTo(panel) == (stats.n_scored < 100)


def test_too_short_a_text_is_an_error_in_the_window(qtbot, panel):
    errors = []
    panel.error_occurred.connect(errors.append)
    panel.set_text("Too short.")
    assert run_to_end(qtbot, panel) == "error"
    assert len(errors) == 1 and f"at least {2 * N_CTX} tokens" in errors[0]
    assert panel.message_bar.isVisibleTo(panel) and panel.result_label.text() == "PPL = —"
    assert panel.run_button.isEnabled()


def test_what_is_missing_is_said_before_running(qtbot, bridge, loaded):
    panel = PerplexityPanel(bridge, FakeDialogs(None))
    qtbot.addWidget(panel)
    assert panel.can_run() == "Open a model first." and not panel.run_button.isEnabled()
    panel.set_model(loaded)
    assert panel.can_run() == "Choose a text file or paste some text."
    panel.set_text("some text")
    assert panel.can_run() == ""
    panel.set_mode(MODE_COMPARE)
    assert panel.can_run() == "Choose the base file."
    panel.choose_base_file()            # the dialog was cancelled: nothing changes
    assert panel.base_edit.text() == "" and panel.run() is None


def test_demo_fill_shows_a_finished_run(qtbot, bridge):
    from engine.eval.perplexity import PerplexityResult
    panel = PerplexityPanel(bridge)
    qtbot.addWidget(panel)
    result = PerplexityResult(8.1234, 0.0567, 1000, 512, (9.0, 8.5, 8.1234), (9.0, 8.0, 7.4))
    panel.demo_fill(result, stats=fake_stats())
    assert panel.result_label.text() == "PPL = 10.5000 +/- 0.2500"
    assert panel.plot.running_values() == [9.0, 8.5, 8.1234]
    assert panel.kld_model.rowCount() > 20


def test_a_placement_on_a_simulated_gpu_gives_the_same_perplexity(qtbot, panel, loaded):
    from engine.devices import available_devices
    from engine.plan.placement import Placement
    panel.set_text(TEXT)
    assert run_to_end(qtbot, panel) == "done"
    on_cpu = panel.result
    n_layer = loaded.model_file.metadata["llama.block_count"]
    panel.set_placement(Placement(loaded.inventory, available_devices("1GiB"), ["CUDA0"] * (n_layer + 1)))
    assert run_to_end(qtbot, panel) == "done"
    assert panel.result.running_ppl == on_cpu.running_ppl       # bit-identical, as DESIGN.md promises
