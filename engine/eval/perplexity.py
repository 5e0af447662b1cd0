"""Perplexity and KL divergence over a token sequence, computed and printed as llama-perplexity does.

The method is llama.cpp's perplexity() (tools/perplexity/perplexity.cpp). The text is tokenized with
the model's add_bos; the tokens are cut into n_chunk = n_tokens // n_ctx chunks (at least two chunks'
worth of tokens are required); each chunk is evaluated from an empty cache with its first token
replaced by BOS when the model adds one; only the second half is scored: with first = n_ctx // 2 the
logits at positions first .. n_ctx-2 predict the tokens at first+1 .. n_ctx-1, through a float64
log-softmax. PPL = exp(mean NLL) and its error is PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (N-1)).

KL-divergence mode (llama.cpp's kl_divergence()) compares the model with log-probabilities of a base
model saved by an earlier run (`save_kl_base`), in llama.cpp's own --kl-divergence-base file layout:
see engine.eval.kl_base, whose public names are importable from here too.

Everything is an iterator that knows nothing of the model: `eval_chunk(tokens (n_ctx,))` returns the
logits of the chunk, either all n_ctx rows or only the last n_ctx - n_ctx//2 (the rows that are read).
The iterators yield one event per chunk and the final result last; a caller cancels by not iterating
further. The caller prints with the format_* functions.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from engine.eval.kl_base import KLBase, _BaseWriter, _log_normalizers, _row_blocks, decode_base_rows, read_kl_base

EvalChunk = Callable[[np.ndarray], np.ndarray]

KLD_MIN_LOG_PROB = -16.0       # base probabilities below e^-16 are left out of the KL sum (as llama.cpp)


@dataclass(frozen=True)
class PerplexityEvent:
    chunk: int              # 1-based, as llama-perplexity prints it
    n_chunks: int
    ppl: float              # running estimate over the chunks so far
    ppl_error: float
    n_scored: int           # tokens scored so far
    chunk_s: float


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_error: float        # NaN when the spread of the NLLs could not be estimated
    n_scored: int
    n_ctx: int
    running_ppl: tuple[float, ...]      # the [i] values printed after each chunk
    chunk_ppl: tuple[float, ...]        # each chunk on its own

    @property
    def n_chunks(self) -> int:
        return len(self.running_ppl)


# ---- chunking ------------------------------------------------------------------------------------

def count_chunks(n_tokens: int, n_ctx: int, n_chunks: int | None = None) -> int:
    if n_ctx < 3:
        raise ValueError(f"perplexity needs a context of at least 3 tokens to score one; got {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of "
                         f"{n_ctx}; the text tokenizes to only {n_tokens} tokens")
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"the number of chunks must be at least 1, not {n_chunks}")
    n_chunk_max = n_tokens // n_ctx
    return n_chunk_max if n_chunks is None else min(n_chunks, n_chunk_max)


def chunk_tokens(tokens: np.ndarray, index: int, n_ctx: int, bos_id: int | None) -> np.ndarray:
    """The tokens of chunk `index` (0-based), its first token replaced by BOS when the model adds one."""
    chunk = np.array(tokens[index * n_ctx:(index + 1) * n_ctx], dtype=np.int32)
    if bos_id is not None:
        chunk[0] = bos_id
    return chunk


def _scored_rows(logits: np.ndarray, n_ctx: int) -> np.ndarray:
    """The rows at positions n_ctx//2 .. n_ctx-2 of a chunk's logits (all rows or only the tail)."""
    first = n_ctx // 2
    if logits.ndim != 2 or logits.shape[0] not in (n_ctx, n_ctx - first):
        raise ValueError(f"eval_chunk returned logits of shape {logits.shape}; expected ({n_ctx}, n_vocab) "
                         f"or the last ({n_ctx - first}, n_vocab) rows")
    start = first if logits.shape[0] == n_ctx else 0
    return logits[start:start + n_ctx - 1 - first]


def _chunk_targets(tokens: np.ndarray, index: int, n_ctx: int, n_vocab: int) -> np.ndarray:
    """The tokens the scored rows of chunk `index` predict, checked against the vocabulary."""
    chunk = np.asarray(tokens[index * n_ctx:(index + 1) * n_ctx])
    if chunk.min() < 0 or chunk.max() >= n_vocab:
        bad = int(chunk.min() if chunk.min() < 0 else chunk.max())
        raise ValueError(f"token id {bad} in chunk {index + 1} is outside the model's vocabulary of {n_vocab}")
    return chunk[n_ctx // 2 + 1:]


def _as_tokens(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        tokens = tokens.astype(np.int32)        # an empty list reads as float64
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, not {tokens.dtype} of shape {tokens.shape}")
    return tokens.astype(np.int32, copy=False)


def _error(total: float, total_sq: float, count: int) -> float:
    """Standard error of the mean NLL, as perplexity() prints it; NaN when not estimable."""
    if count < 2:
        return float("nan")
    mean = total / count
    variance = total_sq / count - mean * mean
    return float(np.sqrt(variance / (count - 1))) if variance > 0 else float("nan")


# ---- perplexity ----------------------------------------------------------------------------------

def perplexity(tokens: np.ndarray, n_ctx: int, eval_chunk: EvalChunk, bos_id: int | None,
               n_chunks: int | None = None, kl_base_path: str | os.PathLike | None = None
               ) -> Iterator[PerplexityEvent | PerplexityResult]:
    """llama-perplexity over `tokens` (already tokenized with the model's add_bos). With
    `kl_base_path`, also writes the base log-probabilities for a later `kl_divergence` run (the file
    appears only when every chunk is done)."""
    tokens = _as_tokens(tokens)
    n_chunk = count_chunks(len(tokens), n_ctx, n_chunks)
    writer = None if kl_base_path is None else _BaseWriter(Path(kl_base_path), tokens[:n_chunk * n_ctx], n_ctx,
                                                          n_chunk)
    return _perplexity_events(tokens, n_ctx, n_chunk, eval_chunk, bos_id, writer)


def save_kl_base(tokens: np.ndarray, n_ctx: int, eval_chunk: EvalChunk, base_path: str | os.PathLike,
                 bos_id: int | None, n_chunks: int | None = None) -> Iterator[PerplexityEvent | PerplexityResult]:
    """The base run of a KL-divergence comparison: perplexity, saving the log-probabilities."""
    return perplexity(tokens, n_ctx, eval_chunk, bos_id, n_chunks, kl_base_path=base_path)


def _perplexity_events(tokens, n_ctx, n_chunk, eval_chunk, bos_id, writer):
    nll_sum = nll_sq_sum = 0.0
    count = 0
    running, per_chunk = [], []
    try:
        for index in range(n_chunk):
            started_s = time.perf_counter()
            rows = _scored_rows(eval_chunk(chunk_tokens(tokens, index, n_ctx, bos_id)), n_ctx)
            targets = _chunk_targets(tokens, index, n_ctx, rows.shape[1])
            nll = _chunk_nll(rows, targets, f"perplexity chunk {index + 1}")
            if writer is not None:
                writer.write_chunk(rows)
            nll_sum += float(nll.sum())
            nll_sq_sum += float(np.dot(nll, nll))
            count += len(nll)
            running.append(float(np.exp(nll_sum / count)))
            per_chunk.append(float(np.exp(nll.mean())))
            yield PerplexityEvent(index + 1, n_chunk, running[-1], running[-1] * _error(nll_sum, nll_sq_sum, count),
                                  count, time.perf_counter() - started_s)
        if writer is not None:
            writer.finish()
    finally:
        if writer is not None:
            writer.abandon()
    yield PerplexityResult(running[-1], running[-1] * _error(nll_sum, nll_sq_sum, count), count, n_ctx,
                           tuple(running), tuple(per_chunk))


def _chunk_nll(rows: np.ndarray, targets: np.ndarray, context: str) -> np.ndarray:
    nll = np.empty(len(rows))
    for block in _row_blocks(len(rows), rows.shape[1]):
        block_rows = rows[block]
        nll[block] = _log_normalizers(block_rows, context) - block_rows[np.arange(len(block_rows)), targets[block]]
    return nll


# ---- formatting ----------------------------------------------------------------------------------

def format_perplexity_line(event: PerplexityEvent) -> str:
    """`[3]6.1234,` -- llama-perplexity prints these one after another on one line."""
    return f"[{event.chunk}]{event.ppl:.4f},"


def format_final_estimate(result: PerplexityResult) -> str:
    if not np.isfinite(result.ppl_error):
        return "Unexpected negative standard deviation of log(prob)"
    return f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}"


def format_eta(event: PerplexityEvent | KLDivergenceEvent, mode: str = "perplexity") -> str:
    """llama-perplexity's line after the first chunk: `perplexity: 1.23 seconds per pass - ETA 0.41 minutes`."""
    total_s = int(event.chunk_s * event.n_chunks)
    hours = f"{total_s // 3600} hours " if total_s >= 3600 else ""
    return f"{mode}: {event.chunk_s:.2f} seconds per pass - ETA {hours}{total_s % 3600 / 60.0:.2f} minutes"


# ---- KL divergence -------------------------------------------------------------------------------

@dataclass(frozen=True)
class KLDivergenceEvent:
    """One chunk's line of llama-perplexity --kl-divergence: running values with their errors."""
    chunk: int
    n_chunks: int
    n_scored: int
    chunk_s: float
    ppl: float
    ppl_error: float
    log_ppl_ratio: float
    log_ppl_ratio_error: float
    kld: float
    kld_error: float
    rms_p_diff: float           # fraction, printed as %
    rms_p_diff_error: float
    same_top: float             # fraction, printed as %
    same_top_error: float


KLD_FRACTIONS = (1.0, 0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001, 0.0)
P_DIFF_FRACTIONS = (1.0, 0.999, 0.99, 0.95, 0.90, 0.75, 0.5, 0.25, 0.10, 0.05, 0.01, 0.001, 0.0)
MIN_TOKENS_FOR_STATISTICS = 100     # llama.cpp prints no final statistics below this


@dataclass(frozen=True)
class KLDivergenceStats:
    """The final statistics of a KL-divergence run. Quantiles are (fraction, value) pairs:
    1 = maximum, 0.5 = median, 0 = minimum. Δp values are fractions (printed as %)."""
    n_scored: int
    ppl: float
    ppl_error: float
    base_ppl: float
    base_ppl_error: float
    log_ppl_correlation: float
    log_ppl_ratio: float
    log_ppl_ratio_error: float
    ppl_ratio: float
    ppl_ratio_error: float
    ppl_diff: float
    ppl_diff_error: float
    kld: float
    kld_error: float
    kld_quantiles: tuple[tuple[float, float], ...]
    p_diff: float
    p_diff_error: float
    p_diff_quantiles: tuple[tuple[float, float], ...]
    rms_p_diff: float
    rms_p_diff_error: float
    same_top: float
    same_top_error: float


def kl_divergence(tokens: np.ndarray | None, n_ctx: int | None, eval_chunk: EvalChunk,
                  base_path: str | os.PathLike, bos_id: int | None, n_chunks: int | None = None
                  ) -> Iterator[KLDivergenceEvent | KLDivergenceStats]:
    """Compare the model with a saved base over the base's own tokens and n_ctx (as llama.cpp does);
    `tokens` and `n_ctx`, when given, must agree with the base."""
    base = read_kl_base(base_path)
    _check_base_matches(base, tokens, n_ctx)
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"the number of chunks must be at least 1, not {n_chunks}")
    n_chunk = base.n_chunk if n_chunks is None else min(n_chunks, base.n_chunk)
    return _kld_events(base, n_chunk, eval_chunk, bos_id)


def _check_base_matches(base: KLBase, tokens: np.ndarray | None, n_ctx: int | None) -> None:
    if n_ctx is not None and n_ctx != base.n_ctx:
        raise ValueError(f"{base.path} was computed with a context of {base.n_ctx} tokens, not {n_ctx}; "
                         f"use -c {base.n_ctx}")
    if tokens is None:
        return
    tokens = _as_tokens(tokens)
    if len(tokens) < len(base.tokens):
        raise ValueError(f"{base.path} was computed on {len(base.tokens)} tokens; this text has only "
                         f"{len(tokens)}; use the same text and tokenizer as for the base")
    differ = np.flatnonzero(tokens[:len(base.tokens)] != base.tokens)
    if len(differ):
        raise ValueError(f"{base.path} was computed on a different token sequence (first difference at "
                         f"token {int(differ[0])}); use the same text and tokenizer as for the base")


@dataclass
class _KLDSums:
    """Running sums of the per-token values, as kl_divergence_result keeps them."""
    nll: float = 0.0
    nll_sq: float = 0.0
    nll_base: float = 0.0
    nll_base_sq: float = 0.0
    nll_nll_base: float = 0.0
    kld: float = 0.0
    kld_sq: float = 0.0
    p_diff: float = 0.0
    p_diff_sq: float = 0.0
    p_diff_4: float = 0.0
    n_same_top: int = 0
    count: int = 0

    def add(self, nll, nll_base, kld, p_diff, same_top) -> None:
        self.nll += float(nll.sum())
        self.nll_sq += float(np.dot(nll, nll))
        self.nll_base += float(nll_base.sum())
        self.nll_base_sq += float(np.dot(nll_base, nll_base))
        self.nll_nll_base += float(np.dot(nll, nll_base))
        self.kld += float(kld.sum())
        self.kld_sq += float(np.dot(kld, kld))
        p_diff_sq = p_diff * p_diff
        self.p_diff += float(p_diff.sum())
        self.p_diff_sq += float(p_diff_sq.sum())
        self.p_diff_4 += float(np.dot(p_diff_sq, p_diff_sq))
        self.n_same_top += int(same_top.sum())
        self.count += len(nll)


def _kld_events(base: KLBase, n_chunk: int, eval_chunk: EvalChunk, bos_id: int | None):
    n_ctx = base.n_ctx
    sums = _KLDSums()
    kld_parts, p_diff_parts = [], []
    for index in range(n_chunk):
        started_s = time.perf_counter()
        rows = _scored_rows(eval_chunk(chunk_tokens(base.tokens, index, n_ctx, bos_id)), n_ctx)
        if rows.shape[1] != base.n_vocab:
            raise ValueError(f"{base.path} was computed for a vocabulary of {base.n_vocab} tokens, but the model "
                             f"has {rows.shape[1]}; the base must come from a model with the same vocabulary")
        targets = _chunk_targets(base.tokens, index, n_ctx, base.n_vocab)
        for block in _row_blocks(len(rows), rows.shape[1]):
            values = _kld_values(rows[block], base.records[index, block], targets[block],
                                 f"KL-divergence chunk {index + 1}")
            sums.add(*values)
            kld_parts.append(values[2])
            p_diff_parts.append(values[3])
        yield _chunk_event(sums, index + 1, n_chunk, time.perf_counter() - started_s)
    yield _kld_statistics(sums, np.concatenate(kld_parts), np.concatenate(p_diff_parts))


def _kld_values(rows: np.ndarray, records: np.ndarray, targets: np.ndarray, context: str):
    """Per token: NLL, base NLL, KL(base || model), p - p_base of the actual token, same argmax.
    KL = sum_i p_i (log p_i - logit_i) + log_norm * sum_i p_i, over base p_i > e^-16 as llama.cpp."""
    log_norm = _log_normalizers(rows, context)
    log_p = decode_base_rows(records, rows.shape[1]).astype(np.float64)
    at_target = (np.arange(len(rows)), targets)
    nll, nll_base = log_norm - rows[at_target], -log_p[at_target]
    p = np.exp(log_p)
    p *= log_p > KLD_MIN_LOG_PROB
    kld = (np.einsum("ij,ij->i", p, log_p) - np.einsum("ij,ij->i", p, rows.astype(np.float64))
           + log_norm * p.sum(axis=1))
    same_top = rows.argmax(axis=1) == log_p.argmax(axis=1)
    return nll, nll_base, kld, np.exp(-nll) - np.exp(-nll_base), same_top


def _mean_and_error(total: float, total_sq: float, count: int) -> tuple[float, float]:
    """Mean and its standard error; the error is 0 for 10 values or fewer (mean_and_uncertainty)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    variance = total_sq / count - mean * mean
    return mean, (float(np.sqrt(variance / (count - 1))) if variance > 0 and count > 10 else 0.0)


def _covariance_of_means(total_a: float, total_b: float, total_ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (total_ab / count - (total_a / count) * (total_b / count)) / (count - 1)


def _sqrt0(value: float) -> float:
    """sqrt of a difference of variances, which rounding can push a hair below zero."""
    return float(np.sqrt(max(value, 0.0)))


def _log_ppl_terms(sums: _KLDSums):
    log_ppl, log_ppl_error = _mean_and_error(sums.nll, sums.nll_sq, sums.count)
    log_base, log_base_error = _mean_and_error(sums.nll_base, sums.nll_base_sq, sums.count)
    covariance = _covariance_of_means(sums.nll, sums.nll_base, sums.nll_nll_base, sums.count)
    ratio_error = _sqrt0(log_ppl_error ** 2 + log_base_error ** 2 - 2.0 * covariance)
    return log_ppl, log_ppl_error, log_base, log_base_error, covariance, ratio_error


def _rms_p_diff(sums: _KLDSums) -> tuple[float, float]:
    mse, mse_error = _mean_and_error(sums.p_diff_sq, sums.p_diff_4, sums.count)
    rms = float(np.sqrt(mse))
    return rms, (0.5 / rms * mse_error if rms > 0 else 0.0)


def _same_top(sums: _KLDSums) -> tuple[float, float]:
    fraction = sums.n_same_top / sums.count
    error = float(np.sqrt(fraction * (1 - fraction) / (sums.count - 1))) if sums.count > 1 else 0.0
    return fraction, error


def _chunk_event(sums: _KLDSums, chunk: int, n_chunks: int, chunk_s: float) -> KLDivergenceEvent:
    log_ppl, log_ppl_error, log_base, _, _, ratio_error = _log_ppl_terms(sums)
    ppl = float(np.exp(log_ppl))
    kld, kld_error = _mean_and_error(sums.kld, sums.kld_sq, sums.count)
    return KLDivergenceEvent(chunk, n_chunks, sums.count, chunk_s, ppl, ppl * log_ppl_error, log_ppl - log_base,
                             ratio_error, kld, kld_error, *_rms_p_diff(sums), *_same_top(sums))


def quantile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between the two nearest ranks (perplexity.cpp's percentile)."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    position = fraction * (len(sorted_values) - 1)
    below = int(position)
    weight = position - below
    above = min(below + 1, len(sorted_values) - 1)
    return float((1 - weight) * sorted_values[below] + weight * sorted_values[above])


def _kld_statistics(sums: _KLDSums, kld_values: np.ndarray, p_diff_values: np.ndarray) -> KLDivergenceStats:
    log_ppl, log_ppl_error, log_base, log_base_error, covariance, ratio_error = _log_ppl_terms(sums)
    ppl, base_ppl = float(np.exp(log_ppl)), float(np.exp(log_base))
    ppl_error, base_ppl_error = ppl * log_ppl_error, base_ppl * log_base_error
    error_product = log_ppl_error * log_base_error
    ppl_ratio = float(np.exp(log_ppl - log_base))
    kld_sorted, p_diff_sorted = np.sort(kld_values), np.sort(p_diff_values)
    return KLDivergenceStats(
        sums.count, ppl, ppl_error, base_ppl, base_ppl_error,
        covariance / error_product if error_product > 0 else float("nan"),
        log_ppl - log_base, ratio_error, ppl_ratio, ppl_ratio * ratio_error,
        ppl - base_ppl, _sqrt0(ppl_error ** 2 + base_ppl_error ** 2 - 2.0 * ppl * base_ppl * covariance),
        *_mean_and_error(sums.kld, sums.kld_sq, sums.count),
        tuple((f, quantile(kld_sorted, f)) for f in KLD_FRACTIONS),
        *_mean_and_error(sums.p_diff, sums.p_diff_sq, sums.count),
        tuple((f, quantile(p_diff_sorted, f)) for f in P_DIFF_FRACTIONS),
        *_rms_p_diff(sums), *_same_top(sums))


# ---- KL-divergence formatting ------------------------------------------------------------------------

KLD_CHUNK_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                    "              Δp RMS            Same top p")


def format_kld_chunk_line(event: KLDivergenceEvent) -> str:
    return (f"{event.chunk:4d}    {event.ppl:9.4f} ± {event.ppl_error:9.4f}"
            f"    {event.log_ppl_ratio:10.5f} ± {event.log_ppl_ratio_error:10.5f}"
            f"    {event.kld:10.5f} ± {event.kld_error:10.5f}"
            f"    {100 * event.rms_p_diff:6.3f} ± {100 * event.rms_p_diff_error:6.3f} %"
            f"    {100 * event.same_top:6.3f} ± {100 * event.same_top_error:6.3f} %")


def _quantile_label(fraction: float) -> str:
    names = {1.0: "Maximum", 0.5: "Median", 0.0: "Minimum"}
    return f"{names.get(fraction, f'{100 * fraction:4.1f}%'):<7}"


def format_kld_report(stats: KLDivergenceStats) -> str:
    """The three statistics blocks llama-perplexity prints at the end of a KL-divergence run."""
    if stats.n_scored < MIN_TOKENS_FOR_STATISTICS:
        return (f"(only {stats.n_scored} tokens scored; no statistics below {MIN_TOKENS_FOR_STATISTICS}, "
                "as in llama-perplexity)")
    s = stats
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s.ppl:10.6f} ± {s.ppl_error:10.6f}",
        f"Mean PPL(base)                : {s.base_ppl:10.6f} ± {s.base_ppl_error:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s.log_ppl_correlation:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s.log_ppl_ratio:10.6f} ± {s.log_ppl_ratio_error:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s.ppl_ratio:10.6f} ± {s.ppl_ratio_error:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {s.ppl_diff:10.6f} ± {s.ppl_diff_error:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s.kld:10.6f} ± {s.kld_error:10.6f}",
        *(f"{_quantile_label(f)} KLD: {v:10.6f}" for f, v in s.kld_quantiles),
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {100 * s.p_diff:6.3f} ± {100 * s.p_diff_error:5.3f} %",
        *(f"{_quantile_label(f)} Δp: {100 * v:6.3f}%" for f, v in s.p_diff_quantiles),
        f"RMS Δp    : {100 * s.rms_p_diff:6.3f} ± {100 * s.rms_p_diff_error:5.3f} %",
        f"Same top p: {100 * s.same_top:6.3f} ± {100 * s.same_top_error:5.3f} %",
    ]
    return "\n".join(lines)
