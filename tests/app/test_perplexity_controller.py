"""The perplexity controller without any widget: a run, its log, a cancel and what it refuses."""
import math

import pytest

from app.engine_jobs import MODE_COMPARE, MODE_SAVE_BASE, PerplexityRequest
from app.perplexity_controller import NO_RESULT, PerplexityController, chunk_perplexity, format_big_result
from engine.eval.perplexity import PerplexityEvent, PerplexityResult

RUN_TIMEOUT_MS = 120_000
N_CTX = 64
TEXT = ("A controller holds the run and the panel only shows it; the engine scores every token. "
        "Perplexity is the exponential of the mean negative log-likelihood. ") * 4


@pytest.fixture
def controller(qtbot, bridge, loaded):
    controller = PerplexityController(bridge)
    controller.set_model(loaded)
    return controller


def collect(controller) -> dict[str, list]:
    seen = {name: [] for name in ("log_line", "log_inline", "progress_changed", "chunk_scored", "result_changed",
                                  "busy_changed", "plot_reset")}
    for name, values in seen.items():
        getattr(controller, name).connect(lambda *args, values=values: values.append(args))
    return seen


def test_a_run_logs_plots_and_ends_with_the_engine_result(qtbot, controller):
    seen = collect(controller)
    request = controller.request(TEXT, None, N_CTX, None)
    with qtbot.waitSignal(controller.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        with qtbot.waitSignal(controller.job_started):
            assert controller.run(request) is not None
    assert finished.args == ["done"] and not controller.is_running
    result = controller.result
    assert isinstance(result, PerplexityResult) and math.isfinite(result.ppl)
    n_chunks = controller.started.n_chunks
    assert n_chunks == result.n_chunks >= 2
    assert seen["busy_changed"] == [(True,), (False,)]
    assert seen["plot_reset"] == [(0,), (n_chunks,)]
    assert [args[0] for args in seen["chunk_scored"]] == pytest.approx(list(result.running_ppl))
    assert [args[1] for args in seen["chunk_scored"]] == pytest.approx(list(result.chunk_ppl), rel=1e-6)
    assert seen["progress_changed"][-1] == (n_chunks, n_chunks)
    assert len(seen["log_inline"]) == n_chunks and seen["log_inline"][0][0].startswith("[1]")
    assert seen["log_line"][0][0].startswith(f"perplexity: {controller.loaded.path.name}, n_ctx={N_CTX}")
    assert any(line[0].startswith("Final estimate: PPL = ") for line in seen["log_line"])
    assert controller.headline == format_big_result(result.ppl, result.ppl_error)
    assert seen["result_changed"][-1] == (controller.headline, controller.detail)


def test_cancel_between_chunks_keeps_no_result(qtbot, bridge, loaded):
    from slow_model import factory
    controller = PerplexityController(bridge, factory(delay_s=0.05, endless=False))
    controller.set_model(loaded)
    assert controller.run(controller.request(TEXT * 8, None, 32, None)) is not None
    qtbot.waitUntil(lambda: controller.started is not None, timeout=RUN_TIMEOUT_MS)
    with qtbot.waitSignal(controller.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        controller.cancel()
    assert finished.args == ["cancelled"] and controller.result is None and not controller.is_running


@pytest.mark.parametrize("change, reason", [
    (dict(loaded=None), "Open a model first."),
    (dict(text=None), "Choose a text file or paste some text."),
    (dict(text="   "), "Choose a text file or paste some text."),
    (dict(mode=MODE_SAVE_BASE), "Choose the base file."),
    (dict(mode=MODE_COMPARE, text=None), "Choose the base file."),
    (dict(mode=MODE_COMPARE, text=None, base_path="base.kld"), ""),
    (dict(text=None, text_path="wiki.test.raw"), ""),
])
def test_why_not_says_what_is_missing(controller, change, reason):
    request = PerplexityRequest(**{**controller.request(TEXT, None, N_CTX, None).__dict__, **change})
    assert controller.why_not(request) == reason


def test_a_refused_run_is_an_error_not_a_job(qtbot, controller):
    with qtbot.waitSignal(controller.error_occurred) as error:
        assert controller.run(controller.request(None, None, N_CTX, None)) is None
    assert error.args == ["Choose a text file or paste some text."] and controller.headline == NO_RESULT


def test_an_engine_error_ends_the_run_with_the_message(qtbot, controller):
    with qtbot.waitSignal(controller.error_occurred, timeout=RUN_TIMEOUT_MS) as error:
        with qtbot.waitSignal(controller.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
            controller.run(controller.request("too short", None, N_CTX, None))
    assert finished.args == ["error"] and error.args[0] and controller.headline == NO_RESULT


def test_chunk_perplexity_undoes_the_running_mean():
    def event(chunk, n_scored, ppl):
        return PerplexityEvent(chunk, 3, ppl, 0.0, n_scored, 0.1)
    first, second = event(1, 10, 8.0), event(2, 20, 10.0)
    assert chunk_perplexity(first, None) == pytest.approx(8.0)
    # the second chunk alone: exp((20 ln 10 - 10 ln 8) / 10)
    assert chunk_perplexity(second, first) == pytest.approx(math.exp((20 * math.log(10) - 10 * math.log(8)) / 10))
