import struct

import numpy as np
import pytest

from engine.eval.kl_base import base_row_values, decode_base_rows, encode_base_rows, read_kl_base
from engine.eval.perplexity import (KLD_CHUNK_HEADER, KLDivergenceEvent, KLDivergenceStats, PerplexityEvent,
                                    PerplexityResult, format_eta, format_final_estimate, format_kld_chunk_line,
                                    format_kld_report, format_perplexity_line, kl_divergence, perplexity,
                                    save_kl_base)
from engine.run.sampling import NonFiniteLogitsError

N_VOCAB = 64
N_CTX = 64
BOS = 1


class FakeModel:
    """A tiny deterministic 'language model': the logits at a position depend on the token there,
    on the chunk's first token (so BOS substitution matters) and on the position."""

    def __init__(self, seed: int, n_vocab: int = N_VOCAB, noise: float = 0.0):
        rng = np.random.default_rng(seed)
        self.by_token = rng.standard_normal((n_vocab, n_vocab)) * 1.2
        self.by_first = rng.standard_normal((n_vocab, n_vocab)) * 0.4
        self.by_position = rng.standard_normal(n_vocab) * 0.01
        if noise:
            self.by_token = self.by_token + np.random.default_rng(seed + 1).standard_normal(self.by_token.shape) * noise
        self.chunks = []

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        self.chunks.append(chunk.copy())
        positions = np.arange(len(chunk))[:, None]
        return (self.by_token[chunk] + self.by_first[chunk[0]] + positions * self.by_position).astype(np.float32)


def text_tokens(n_tokens: int, seed: int = 11) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(3, N_VOCAB, n_tokens).astype(np.int32)
    tokens[0] = BOS
    return tokens


def exact_log_probs(model, tokens, n_ctx, bos_id):
    """Independent float64 evaluation: per chunk, the scored rows' log-softmax and their targets."""
    out = []
    for c in range(len(tokens) // n_ctx):
        chunk = np.array(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        logits = model(chunk).astype(np.float64)
        for pos in range(n_ctx // 2, n_ctx - 1):
            row = logits[pos]
            log_probs = row - (row.max() + np.log(np.sum(np.exp(row - row.max()))))
            out.append((log_probs, tokens[c * n_ctx + pos + 1]))
    return out


def reference_ppl(nll):
    nll = np.asarray(nll)
    ppl = np.exp(nll.mean())
    return ppl, ppl * np.std(nll) / np.sqrt(len(nll) - 1)


def run(iterator):
    items = list(iterator)
    return items[:-1], items[-1]


# ---- perplexity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_ctx,bos_id", [(64, BOS), (33, BOS), (64, None)])
def test_perplexity_matches_a_plain_float64_computation(n_ctx, bos_id):
    tokens = text_tokens(5 * n_ctx + 17)
    model = FakeModel(1)
    events, result = run(perplexity(tokens, n_ctx, model, bos_id))
    reference_nll = [-lp[t] for lp, t in exact_log_probs(FakeModel(1), tokens, n_ctx, bos_id)]
    per_chunk = n_ctx - 1 - n_ctx // 2
    assert isinstance(result, PerplexityResult) and result.n_chunks == 5 == len(events)
    assert result.n_scored == 5 * per_chunk == len(reference_nll)
    ppl, error = reference_ppl(reference_nll)
    assert result.ppl == pytest.approx(ppl, rel=1e-12)
    assert result.ppl_error == pytest.approx(error, rel=1e-9)
    for i, event in enumerate(events):
        assert (event.chunk, event.n_chunks, event.n_scored) == (i + 1, 5, (i + 1) * per_chunk)
        assert event.ppl == pytest.approx(np.exp(np.mean(reference_nll[:(i + 1) * per_chunk])), rel=1e-12)
        assert result.chunk_ppl[i] == pytest.approx(
            np.exp(np.mean(reference_nll[i * per_chunk:(i + 1) * per_chunk])), rel=1e-12)
    assert result.running_ppl == tuple(e.ppl for e in events)
    assert events[-1].ppl_error == pytest.approx(result.ppl_error)
    for i, chunk in enumerate(model.chunks):           # BOS replaces the first token of each chunk
        original = tokens[i * n_ctx:(i + 1) * n_ctx]
        assert chunk[0] == (original[0] if bos_id is None else bos_id)
        np.testing.assert_array_equal(chunk[1:], original[1:])


def test_model_may_return_only_the_read_rows():
    tokens = text_tokens(3 * N_CTX)
    model = FakeModel(2)
    _, full = run(perplexity(tokens, N_CTX, model, BOS))
    _, tail = run(perplexity(tokens, N_CTX, lambda chunk: model(chunk)[N_CTX // 2:], BOS))
    assert tail.ppl == full.ppl and tail.ppl_error == full.ppl_error


def test_chunk_count_and_short_text():
    tokens = text_tokens(2 * N_CTX)
    assert run(perplexity(tokens, N_CTX, FakeModel(3), BOS))[1].n_chunks == 2
    assert run(perplexity(text_tokens(10 * N_CTX), N_CTX, FakeModel(3), BOS, n_chunks=3))[1].n_chunks == 3
    assert run(perplexity(tokens, N_CTX, FakeModel(3), BOS, n_chunks=99))[1].n_chunks == 2
    with pytest.raises(ValueError, match="you need at least 128 tokens .* context of 64; .* only 127 tokens"):
        perplexity(tokens[:-1], N_CTX, FakeModel(3), BOS)
    with pytest.raises(ValueError, match="only 0 tokens"):
        perplexity([], N_CTX, FakeModel(3), BOS)
    with pytest.raises(ValueError, match="at least 1"):
        perplexity(tokens, N_CTX, FakeModel(3), BOS, n_chunks=0)
    with pytest.raises(ValueError, match="shape"):
        run(perplexity(tokens, N_CTX, lambda chunk: np.zeros((5, N_VOCAB), np.float32), BOS))


def test_non_finite_logits_are_reported():
    def broken(chunk):
        logits = FakeModel(4)(chunk)
        logits[40, 7] = np.nan
        return logits
    with pytest.raises(NonFiniteLogitsError, match="1 NaN.*perplexity chunk 1"):
        run(perplexity(text_tokens(2 * N_CTX), N_CTX, broken, BOS))


def test_perplexity_printf_layout():
    event = PerplexityEvent(chunk=3, n_chunks=10, ppl=6.123449, ppl_error=0.2, n_scored=93, chunk_s=2.5)
    assert format_perplexity_line(event) == "[%d]%.4lf," % (3, 6.123449) == "[3]6.1234,"
    result = PerplexityResult(5.98764, 0.123456, 310, 64, (5.98764,), (5.98764,))
    assert format_final_estimate(result) == "Final estimate: PPL = 5.9876 +/- 0.12346"
    assert "Unexpected negative standard deviation" in format_final_estimate(
        PerplexityResult(1.0, float("nan"), 1, 64, (1.0,), (1.0,)))
    assert format_eta(event) == "perplexity: 2.50 seconds per pass - ETA 0.42 minutes"
    long = PerplexityEvent(1, 2000, 6.0, 0.1, 31, 2.5)
    assert format_eta(long) == "perplexity: 2.50 seconds per pass - ETA 1 hours 23.33 minutes"


# ---- the base file -------------------------------------------------------------------------------

def test_base_rows_follow_llama_cpp_coding():
    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((6, 101)) * 4).astype(np.float32)      # odd n_vocab: one pad value
    rows[0, :50] -= 30.0                                                # far below the 16-nat window
    records = encode_base_rows(rows)
    assert records.shape == (6, base_row_values(101)) == (6, 106) and records.dtype == np.uint16
    exact = rows - rows.max(1, keepdims=True) - np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1, keepdims=True))
    decoded = decode_base_rows(records, 101)
    scale = np.frombuffer(records[:, :4].tobytes(), "<f4")[::2]
    inside = rows > (rows.max(1, keepdims=True) - 16)
    assert np.all(np.abs(decoded - exact)[inside] <= (scale[:, None] * 0.5 + 1e-5).repeat(101, 1)[inside])
    assert np.all(records[np.arange(6), 4 + rows.argmax(1)] == 65535)
    np.testing.assert_array_equal(decoded[0, :50], np.full(50, decoded[0, :50].min()))   # the floor
    assert np.all(records[:, -1] == 0)


def test_base_file_layout_is_llama_cpps(tmp_path):
    tokens = text_tokens(2 * N_CTX + 5)
    path = tmp_path / "base.kld"
    events, result = run(save_kl_base(tokens, N_CTX, FakeModel(6), path, BOS))
    raw = path.read_bytes()
    n_rows, row_values = N_CTX - 1 - N_CTX // 2, N_VOCAB + 4
    assert raw[:8] == b"_logits_"
    assert struct.unpack("<Iii", raw[8:20]) == (N_CTX, N_VOCAB, 2)
    assert np.array_equal(np.frombuffer(raw[20:20 + 4 * 2 * N_CTX], "<i4"), tokens[:2 * N_CTX])
    assert len(raw) == 20 + 4 * 2 * N_CTX + 2 * 2 * n_rows * row_values
    # the first row of the second chunk, decoded by hand
    offset = 20 + 4 * 2 * N_CTX + 2 * n_rows * row_values * 1
    scale, min_log_prob = struct.unpack("<ff", raw[offset:offset + 8])
    codes = np.frombuffer(raw[offset + 8:offset + 8 + 2 * N_VOCAB], "<u2")
    log_probs, _ = exact_log_probs(FakeModel(6), tokens, N_CTX, BOS)[n_rows]
    np.testing.assert_allclose(scale * codes.astype(np.float32) + min_log_prob, log_probs, atol=scale)
    assert not list(tmp_path.glob("*.partial"))
    assert result.n_chunks == 2 and len(events) == 2


def test_cancelled_base_run_leaves_no_file(tmp_path):
    model = FakeModel(7)
    iterator = save_kl_base(text_tokens(4 * N_CTX), N_CTX, model, tmp_path / "base.kld", BOS)
    assert isinstance(next(iterator), PerplexityEvent)
    iterator.close()
    assert list(tmp_path.iterdir()) == [] and len(model.chunks) == 1


def test_bad_base_files(tmp_path):
    tokens = text_tokens(3 * N_CTX)
    path = tmp_path / "base.kld"
    run(save_kl_base(tokens, N_CTX, FakeModel(8), path, BOS))
    with pytest.raises(ValueError, match="vocabulary of 64 tokens, but the model has 80"):
        run(kl_divergence(tokens, N_CTX, FakeModel(8, n_vocab=80), path, BOS))
    with pytest.raises(ValueError, match="context of 64 tokens, not 32"):
        kl_divergence(tokens, 32, FakeModel(8), path, BOS)
    other = tokens.copy()
    other[100] = (other[100] + 1) % N_VOCAB
    with pytest.raises(ValueError, match="different token sequence .* token 100"):
        kl_divergence(other, N_CTX, FakeModel(8), path, BOS)
    with pytest.raises(ValueError, match="only 100"):
        kl_divergence(tokens[:100], N_CTX, FakeModel(8), path, BOS)
    truncated = tmp_path / "short.kld"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_kl_base(truncated)
    stranger = tmp_path / "stranger.bin"
    stranger.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match="does not look like"):
        read_kl_base(stranger)


# ---- KL divergence -------------------------------------------------------------------------------

def test_kld_of_the_model_against_itself_is_zero(tmp_path):
    tokens = text_tokens(6 * N_CTX)
    path = tmp_path / "base.kld"
    _, base_result = run(save_kl_base(tokens, N_CTX, FakeModel(9), path, BOS))
    events, stats = run(kl_divergence(None, None, FakeModel(9), path, BOS))
    assert len(events) == 6 and stats.n_scored == 6 * 31
    assert stats.same_top == 1.0 and stats.same_top_error == 0.0
    assert abs(stats.kld) < 2e-5 and max(abs(v) for _, v in stats.kld_quantiles) < 1e-4
    assert stats.ppl == pytest.approx(base_result.ppl, rel=1e-12)
    assert stats.base_ppl == pytest.approx(base_result.ppl, rel=1e-4)
    assert stats.log_ppl_correlation == pytest.approx(1.0, abs=1e-6)
    assert abs(stats.rms_p_diff) < 1e-4


def test_kld_statistics_match_an_independent_computation(tmp_path):
    tokens = text_tokens(8 * N_CTX + 3)
    path = tmp_path / "base.kld"
    run(save_kl_base(tokens, N_CTX, FakeModel(10), path, BOS))
    events, stats = run(kl_divergence(tokens, N_CTX, FakeModel(10, noise=0.25), path, BOS))

    base = exact_log_probs(FakeModel(10), tokens, N_CTX, BOS)
    quant = exact_log_probs(FakeModel(10, noise=0.25), tokens, N_CTX, BOS)
    assert min(lp.min() for lp, _ in base) > -15      # the 16-nat window drops nothing here
    kld = np.array([np.sum(np.exp(p) * (p - q)) for (p, _), (q, _) in zip(base, quant)])
    nll_q = np.array([-q[t] for q, t in quant])
    nll_b = np.array([-p[t] for p, t in base])
    p_diff = np.exp(-nll_q) - np.exp(-nll_b)
    same = np.mean([np.argmax(p) == np.argmax(q) for (p, _), (q, _) in zip(base, quant)])
    n = len(kld)
    assert stats.n_scored == n == 8 * 31

    assert stats.kld == pytest.approx(kld.mean(), abs=2e-5) and kld.mean() > 0.02
    assert stats.kld_error == pytest.approx(np.std(kld) / np.sqrt(n - 1), rel=1e-2)
    for fraction, value in stats.kld_quantiles:
        assert value == pytest.approx(np.percentile(kld, 100 * fraction), abs=1e-4)
    assert stats.ppl == pytest.approx(np.exp(nll_q.mean()), rel=1e-10)
    assert stats.ppl_error == pytest.approx(np.exp(nll_q.mean()) * np.std(nll_q) / np.sqrt(n - 1), rel=1e-8)
    assert stats.base_ppl == pytest.approx(np.exp(nll_b.mean()), rel=1e-4)
    assert stats.log_ppl_correlation == pytest.approx(np.corrcoef(nll_q, nll_b)[0, 1], abs=1e-4)
    ratio = nll_q - nll_b
    assert stats.log_ppl_ratio == pytest.approx(ratio.mean(), abs=1e-4)
    assert stats.log_ppl_ratio_error == pytest.approx(np.std(ratio) / np.sqrt(n - 1), rel=1e-2)
    assert stats.ppl_ratio == pytest.approx(np.exp(ratio.mean()), rel=1e-4)
    assert stats.ppl_diff == pytest.approx(np.exp(nll_q.mean()) - np.exp(nll_b.mean()), abs=1e-3)
    assert stats.p_diff == pytest.approx(p_diff.mean(), abs=1e-5)
    assert stats.p_diff_error == pytest.approx(np.std(p_diff) / np.sqrt(n - 1), rel=1e-2)
    assert stats.rms_p_diff == pytest.approx(np.sqrt(np.mean(p_diff ** 2)), rel=1e-3)
    rms = np.sqrt(np.mean(p_diff ** 2))
    assert stats.rms_p_diff_error == pytest.approx(0.5 / rms * np.std(p_diff ** 2) / np.sqrt(n - 1), rel=1e-2)
    for fraction, value in stats.p_diff_quantiles:
        assert value == pytest.approx(np.percentile(p_diff, 100 * fraction), abs=1e-5)
    assert stats.same_top == pytest.approx(same) and 0.5 < same < 1
    assert stats.same_top_error == pytest.approx(np.sqrt(same * (1 - same) / (n - 1)))
    # the last chunk's running line carries the final values
    last = events[-1]
    assert (last.chunk, last.n_chunks, last.n_scored) == (8, 8, n)
    assert (last.kld, last.kld_error, last.same_top) == (stats.kld, stats.kld_error, stats.same_top)
    assert last.log_ppl_ratio == pytest.approx(stats.log_ppl_ratio)


def test_kld_printf_layout():
    event = KLDivergenceEvent(chunk=7, n_chunks=9, n_scored=217, chunk_s=0.5, ppl=12.34567, ppl_error=0.98765,
                              log_ppl_ratio=0.0123456, log_ppl_ratio_error=0.00123456, kld=0.0456789,
                              kld_error=0.00098765, rms_p_diff=0.0345678, rms_p_diff_error=0.00456789,
                              same_top=0.9123456, same_top_error=0.0123456)
    expected = ("%4d" % 7 + "    %9.4lf ± %9.4lf" % (12.34567, 0.98765)
                + "    %10.5lf ± %10.5lf" % (0.0123456, 0.00123456)
                + "    %10.5lf ± %10.5lf" % (0.0456789, 0.00098765)
                + "    %6.3lf ± %6.3lf %%" % (3.45678, 0.456789) + "    %6.3lf ± %6.3lf %%" % (91.23456, 1.23456))
    assert format_kld_chunk_line(event) == expected
    assert KLD_CHUNK_HEADER.split() == ["chunk", "PPL", "ln(PPL(Q)/PPL(base))", "KL", "Divergence", "Δp", "RMS",
                                        "Same", "top", "p"]


def make_stats(**changes):
    kld_q = tuple(zip((1.0, 0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001, 0.0),
                      (0.9, 0.5, 0.25, 0.125, 0.1, 0.0123456, 0.002, 0.001, 0.0005, 0.0001, 0.0)))
    dp_q = tuple(zip((1.0, 0.999, 0.99, 0.95, 0.90, 0.75, 0.5, 0.25, 0.10, 0.05, 0.01, 0.001, 0.0),
                     (0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.312345)))
    fields = dict(n_scored=12345, ppl=10.5, ppl_error=0.25, base_ppl=10.25, base_ppl_error=0.2421875,
                  log_ppl_correlation=0.9912, log_ppl_ratio=0.024097, log_ppl_ratio_error=0.0031,
                  ppl_ratio=1.02439, ppl_ratio_error=0.0032, ppl_diff=0.25, ppl_diff_error=0.033,
                  kld=0.0123456, kld_error=0.000123, kld_quantiles=kld_q, p_diff=-0.0012, p_diff_error=0.0004,
                  p_diff_quantiles=dp_q, rms_p_diff=0.0345, rms_p_diff_error=0.0012, same_top=0.95,
                  same_top_error=0.00196)
    fields.update(changes)
    return KLDivergenceStats(**fields)


def test_kld_report_layout():
    lines = format_kld_report(make_stats()).split("\n")
    assert lines[0] == "====== Perplexity statistics ======"
    assert lines[1] == "Mean PPL(Q)                   : %10.6lf ± %10.6lf" % (10.5, 0.25)
    assert lines[3] == "Cor(ln(PPL(Q)), ln(PPL(base))): %6.2lf%%" % 99.12
    assert lines[6] == "Mean PPL(Q)-PPL(base)         : %10.6lf ± %10.6lf" % (0.25, 0.033)
    assert lines[7] == "" and lines[8] == "====== KL divergence statistics ======"
    assert lines[9] == "Mean    KLD: %10.6lf ± %10.6lf" % (0.0123456, 0.000123)
    assert lines[10:21] == ["Maximum KLD:   0.900000", "99.9%   KLD:   0.500000", "99.0%   KLD:   0.250000",
                            "95.0%   KLD:   0.125000", "90.0%   KLD:   0.100000", "Median  KLD:   0.012346",
                            "10.0%   KLD:   0.002000", " 5.0%   KLD:   0.001000", " 1.0%   KLD:   0.000500",
                            " 0.1%   KLD:   0.000100", "Minimum KLD:   0.000000"]
    assert lines[22] == "====== Token probability statistics ======"
    assert lines[23] == "Mean    Δp: %6.3lf ± %5.3lf %%" % (-0.12, 0.04)
    assert lines[24] == "Maximum Δp: 30.000%" and lines[29] == "75.0%   Δp:  1.000%"
    assert lines[30] == "Median  Δp:  0.000%" and lines[36] == "Minimum Δp: -31.234%"
    assert lines[37] == "RMS Δp    :  3.450 ± 0.120 %"
    assert lines[38] == "Same top p: 95.000 ± 0.196 %" and len(lines) == 39


def test_kld_report_needs_a_hundred_tokens():
    assert "only 99 tokens" in format_kld_report(make_stats(n_scored=99))


def test_few_tokens_give_no_uncertainties(tmp_path):
    # llama.cpp's mean_and_uncertainty reports no error for 10 values or fewer
    n_ctx = 8                                        # 3 scored tokens per chunk
    tokens = text_tokens(3 * n_ctx)
    path = tmp_path / "base.kld"
    run(save_kl_base(tokens, n_ctx, FakeModel(12), path, BOS))
    events, stats = run(kl_divergence(tokens, n_ctx, FakeModel(12, noise=0.5), path, BOS))
    assert [e.n_scored for e in events] == [3, 6, 9]
    assert all(e.kld_error == 0.0 and e.ppl_error == 0.0 for e in events) and stats.kld > 0


def test_token_outside_the_vocabulary():
    tokens = text_tokens(2 * N_CTX)
    tokens[100] = N_VOCAB + 5
    with pytest.raises(ValueError, match="token id 69 in chunk 2 is outside the model's vocabulary of 64"):
        run(perplexity(tokens, N_CTX, lambda chunk: FakeModel(13)(np.minimum(chunk, N_VOCAB - 1)), BOS))
