"""The perplexity panel's controller: one llama-perplexity run at a time on the engine thread.

No widgets here. The panel builds a `PerplexityRequest` from its controls, asks `why_not(request)`
and `run(request)`, binds `kld_model` and follows these signals:

    busy_changed(bool)                  a run started or ended
    cleared()                           the last run's results are gone (a new run begins)
    log_line(str) / log_inline(str)     llama-perplexity's log; the [i]ppl values share one line
    status_changed(str)                 the line under the progress bar
    progress_changed(done, total)       chunks scored (total 0: not known yet)
    plot_reset(n_chunks)                a new run (0: size not known yet)
    chunk_scored(running, chunk)        the running estimate and this chunk's own perplexity
    result_changed(headline, detail)    `PPL = x +/- y` and the line under it
    perplexity_result(result)           the final `PerplexityResult` (the plot takes its values)
    kld_result(stats, note)             the final `KLDivergenceStats` and a caution ("" for none)
    run_finished(outcome)               "done", "cancelled" or "error"
    error_occurred(str)                 one line for the message bar
    job_started(handle, text)           the window may track the job in its status bar

A run is one job (`app.engine_jobs.run_perplexity`): it builds the model, reads and tokenizes the
text there, then yields a `PerplexityStarted`, one event per chunk and the final result, exactly
as `engine.eval.perplexity` produces them.
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.bridge import Bridge, JobHandle
from app.engine_jobs import (MODE_COMPARE, MODE_PERPLEXITY, MODE_SAVE_BASE, LoadedModel, ModelFactory,
                             PerplexityRequest, PerplexityStarted, default_model_factory, run_perplexity)
from app.models.perplexity import KldStatsModel
from engine.eval.perplexity import (KLD_CHUNK_HEADER, MIN_TOKENS_FOR_STATISTICS, KLDivergenceEvent, KLDivergenceStats,
                                    PerplexityEvent, PerplexityResult, format_eta, format_final_estimate,
                                    format_kld_chunk_line, format_kld_report, format_perplexity_line)
from engine.run_config import RunConfig
from engine.units import format_bytes

NO_RESULT = "PPL = —"


def run_settings_lines(request: PerplexityRequest) -> list[str]:
    """What the log keeps about how the run was made: KV cache types, flash attention, the placement."""
    rc = request.run_config
    lines = [f"run settings: KV cache K {rc.type_k}, V {rc.type_v}, flash attention {rc.flash_attn}, "
             f"ubatch {rc.n_ubatch}, threads {rc.n_threads or 'all'}"]
    placement = request.placement
    if placement is None:
        lines.append("placement: everything on the CPU")
    else:
        weights = placement.weight_bytes()
        lines.append("placement: " + ", ".join(f"{device} {format_bytes(n)}" for device, n in weights.items() if n)
                     + " of weights" + (f"; {len(placement.split_tensors())} tensors split by expert"
                                        if placement.split_tensors() else ""))
    return lines


def format_big_result(ppl: float, ppl_error: float) -> str:
    error = f"{ppl_error:.4f}" if math.isfinite(ppl_error) else "?"
    return f"PPL = {ppl:.4f} +/- {error}"


def chunk_perplexity(event: PerplexityEvent | KLDivergenceEvent,
                     previous: PerplexityEvent | KLDivergenceEvent | None) -> float:
    """This chunk's own perplexity, from two running estimates: exp of the mean NLL the new
    tokens added (running = exp(total NLL / tokens scored))."""
    n_before, log_before = (previous.n_scored, math.log(previous.ppl)) if previous is not None else (0, 0.0)
    n_new = event.n_scored - n_before
    if n_new <= 0 or not event.ppl > 0:
        return float("nan")
    return math.exp((event.n_scored * math.log(event.ppl) - n_before * log_before) / n_new)


def perplexity_detail(result: PerplexityResult) -> str:
    return f"{result.n_chunks} chunks  ·  {result.n_scored:,} tokens scored  ·  n_ctx {result.n_ctx}"


def kld_detail(stats: KLDivergenceStats) -> str:
    return (f"Mean KLD {stats.kld:.6f}  ·  same top token {100 * stats.same_top:.2f} %  ·  "
            f"PPL(Q)/PPL(base) {stats.ppl_ratio:.4f}  ·  {stats.n_scored:,} tokens scored")


def kld_note(stats: KLDivergenceStats) -> str:
    if stats.n_scored >= MIN_TOKENS_FOR_STATISTICS:
        return ""
    return (f"Only {stats.n_scored} tokens were scored: llama-perplexity prints no "
            f"statistics below {MIN_TOKENS_FOR_STATISTICS}; take these with care.")


class PerplexityController(QObject):
    """Measure perplexity (and KL-divergence against a saved base) of the open model on a text."""

    busy_changed = Signal(bool)
    cleared = Signal()
    log_line = Signal(str)
    log_inline = Signal(str)
    status_changed = Signal(str)
    progress_changed = Signal(int, int)
    plot_reset = Signal(int)
    chunk_scored = Signal(float, float)
    result_changed = Signal(str, str)
    perplexity_result = Signal(object)
    kld_result = Signal(object, str)
    run_finished = Signal(str)
    error_occurred = Signal(str)
    job_started = Signal(object, str)

    def __init__(self, bridge: Bridge, model_factory: ModelFactory = default_model_factory,
                 parent: QObject | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.model_factory = model_factory
        self.loaded: LoadedModel | None = None
        self.run_config = RunConfig()
        self.placement: Any = None
        self.kld_model = KldStatsModel(self)
        self.result: PerplexityResult | KLDivergenceStats | None = None
        self.started: PerplexityStarted | None = None     # the current (or last) run's size
        self.job: JobHandle | None = None
        self._request: PerplexityRequest | None = None
        self._run_started_s = 0.0
        self._last_chunk_event: PerplexityEvent | KLDivergenceEvent | None = None
        self.headline = NO_RESULT       # `PPL = x +/- y`, shown large
        self.detail = ""                # the line under it

    # --- inputs -----------------------------------------------------------------------------------

    def set_model(self, loaded: LoadedModel | None) -> bool:
        """False when it is the model already open."""
        if loaded is self.loaded:
            return False
        self.cancel()
        self.loaded = loaded
        return True

    def set_run_config(self, run_config: RunConfig) -> None:
        """Run settings other than the context (KV cache types, threads...); the context is the request's."""
        self.run_config = run_config

    def set_placement(self, placement: Any) -> None:
        """A new `engine.plan.placement.Placement` (None: all on the CPU), used from the next run on."""
        self.placement = placement.copy() if placement is not None else None     # later edits must not leak in

    def request(self, text: str | None, text_path: str | None, n_ctx: int, n_chunks: int | None,
                mode: str = MODE_PERPLEXITY, base_path: str | None = None) -> PerplexityRequest:
        """A run over the open model with the current run settings and placement."""
        return PerplexityRequest(self.loaded, self.run_config, self.placement, text, text_path, n_ctx, n_chunks,
                                 mode, base_path)

    # --- running ----------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self.job is not None

    def why_not(self, request: PerplexityRequest) -> str:
        """"" when `request` can run now, otherwise why not."""
        if request.loaded is None:
            return "Open a model first."
        if self.is_running:
            return "A run is in progress."
        if request.mode != MODE_PERPLEXITY and not (request.base_path or "").strip():
            return "Choose the base file."
        has_text = bool((request.text or "").strip() or (request.text_path or "").strip())
        if not has_text and request.mode != MODE_COMPARE:
            return "Choose a text file or paste some text."
        return ""

    def run(self, request: PerplexityRequest) -> JobHandle | None:
        reason = self.why_not(request)
        if reason:
            self.error_occurred.emit(reason)
            return None
        self.reset_results()
        self._request = request
        program = "kl_divergence" if request.mode == MODE_COMPARE else "perplexity"
        self.log_line.emit(f"{program}: {request.loaded.path.name}, n_ctx={request.n_ctx}"
                           + (f", chunks={request.n_chunks}" if request.n_chunks else ""))
        for line in run_settings_lines(request):
            self.log_line.emit(line)
        handle = self.bridge.submit(partial(run_perplexity, request, model_factory=self.model_factory), "perplexity")
        self.job = handle
        self._run_started_s = time.perf_counter()
        # bound methods, not lambdas: Qt drops these connections if the controller goes first
        handle.progress.connect(self._on_progress)
        handle.yielded.connect(self._on_yielded)
        handle.returned.connect(self._on_returned)
        handle.cancelled.connect(self._on_cancelled)
        handle.errored.connect(self._on_errored)
        self.progress_changed.emit(0, 0)
        self.status_changed.emit("Starting…")
        self.busy_changed.emit(True)
        self.job_started.emit(handle, "Measuring perplexity…")
        return handle

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status_changed.emit("Cancelling…")

    def reset_results(self) -> None:
        self.result = None
        self.started = None
        self._last_chunk_event = None
        self.kld_model.set_stats(None)
        self.cleared.emit()
        self.plot_reset.emit(0)
        self._show("PPL = …", "")

    def _on_returned(self, _result) -> None:
        self._end_run(self.sender(), "done")

    def _on_cancelled(self) -> None:
        self._end_run(self.sender(), "cancelled")

    def _on_errored(self, message: str) -> None:
        self._end_run(self.sender(), "error", message)

    def _on_progress(self, done: int, total: int, text: str) -> None:
        if text and self.started is None:
            self.status_changed.emit(text[0].upper() + text[1:] + "…")

    def _on_yielded(self, item: object) -> None:
        if isinstance(item, PerplexityStarted):
            self._on_started(item)
        elif isinstance(item, (PerplexityEvent, KLDivergenceEvent)):
            self._on_chunk(item)
        elif isinstance(item, PerplexityResult):
            self.show_perplexity_result(item)
        elif isinstance(item, KLDivergenceStats):
            self.show_kld_stats(item)

    def _on_started(self, started: PerplexityStarted) -> None:
        self.started = started
        self.log_line.emit(f"perplexity: tokenization took {1000 * started.tokenize_s:.3f} ms")
        verb = "calculating perplexity" if started.mode != MODE_COMPARE else "computing KL divergence"
        self.log_line.emit(f"perplexity: {verb} over {started.n_chunks} chunks, n_ctx={started.n_ctx}")
        self.plot_reset.emit(started.n_chunks)
        self.progress_changed.emit(0, started.n_chunks)
        self.status_changed.emit(f"Chunk 0 / {started.n_chunks}")
        if started.mode == MODE_COMPARE:
            self.log_line.emit("")
            self.log_line.emit(KLD_CHUNK_HEADER)

    def _on_chunk(self, event: PerplexityEvent | KLDivergenceEvent) -> None:
        compare = isinstance(event, KLDivergenceEvent)
        if event.chunk == 1:
            self.log_line.emit(format_eta(event, "kl_divergence" if compare else "perplexity"))
        if compare:
            self.log_line.emit(format_kld_chunk_line(event))
        else:
            self.log_inline.emit(format_perplexity_line(event))
        self.chunk_scored.emit(event.ppl, chunk_perplexity(event, self._last_chunk_event))
        self._last_chunk_event = event
        self.progress_changed.emit(event.chunk, event.n_chunks)
        remaining_s = event.chunk_s * (event.n_chunks - event.chunk)
        self.status_changed.emit(f"Chunk {event.chunk} / {event.n_chunks}  ·  about {remaining_s:.0f} s left")
        self._show(format_big_result(event.ppl, event.ppl_error),
                   f"running estimate after {event.chunk} of {event.n_chunks} chunks "
                   f"({event.n_scored:,} tokens scored)")

    def show_perplexity_result(self, result: PerplexityResult, elapsed: bool = True) -> None:
        """The final perplexity (also for screenshots, without a run: `elapsed=False`)."""
        self.result = result
        self.perplexity_result.emit(result)
        self.log_line.emit("")
        self.log_line.emit(format_final_estimate(result))
        detail = perplexity_detail(result)
        if elapsed:
            detail += f"  ·  {time.perf_counter() - self._run_started_s:.1f} s"
        self._show(format_big_result(result.ppl, result.ppl_error), detail)

    def show_kld_stats(self, stats: KLDivergenceStats) -> None:
        self.result = stats
        self.log_line.emit("")
        for line in format_kld_report(stats).splitlines():
            self.log_line.emit(line)
        self.kld_model.set_stats(stats)
        self.kld_result.emit(stats, kld_note(stats))
        self._show(format_big_result(stats.ppl, stats.ppl_error), kld_detail(stats))

    def _show(self, headline: str, detail: str | None = None) -> None:
        """A new headline, and a new detail line unless it is None (the last one stays)."""
        self.headline = headline
        if detail is not None:
            self.detail = detail
        self.result_changed.emit(self.headline, self.detail)

    def _end_run(self, handle: JobHandle, outcome: str, error: str = "") -> None:
        if handle is not self.job:
            return
        self.job = None
        if self.started is None:        # it ended before its first chunk: no bar to keep
            self.progress_changed.emit(0, 1)
        if outcome == "done":
            self.status_changed.emit(f"Done in {time.perf_counter() - self._run_started_s:.1f} s")
            if self._request.mode == MODE_SAVE_BASE:
                self.log_line.emit(f"saved the base log-probabilities to {self._request.base_path}")
        elif outcome == "cancelled":
            self.status_changed.emit("Cancelled")
            self.log_line.emit("cancelled")
            if self.result is None and self._last_chunk_event is None:
                self._show(NO_RESULT)
        else:
            self.status_changed.emit("Failed")
            self.log_line.emit(f"error: {error}")
            self.error_occurred.emit(error)
            if self.result is None:
                self._show(NO_RESULT)
        self.busy_changed.emit(False)
        self.run_finished.emit(outcome)
