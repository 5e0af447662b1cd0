import math

import numpy as np
import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from engine.run.sampling import (Candidates, NonFiniteLogitsError, SamplerSettings, StopChecker, _first_reaching,
                                 apply_penalties, check_finite, filter_candidates, make_logits_processors,
                                 make_sampler, min_p, top_k, top_p, typical_p)


# ---- a plain reference of llama.cpp's chain, one candidate at a time ----------------------------

def reference_survivors(logits, s: SamplerSettings) -> set[int]:
    """top_k -> typical_p -> top_p -> min_p with Python lists and float64 math."""
    cand = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if s.top_k > 0:
        cand = cand[:s.top_k]
    if s.typical_p < 1:
        probs = ref_softmax([logits[i] for i in cand])
        entropy = -sum(p * math.log(p) for p in probs if p > 0)
        order = sorted(range(len(cand)), key=lambda j: abs(-math.log(probs[j]) - entropy))
        kept, total = [], 0.0
        for j in order:
            kept.append(cand[j])
            total += probs[j]
            if total > s.typical_p:
                break
        cand = sorted(kept, key=lambda i: -float(logits[i]))
    if s.top_p < 1:
        probs = ref_softmax([logits[i] for i in cand])
        kept, total = [], 0.0
        for i, p in zip(cand, probs):
            kept.append(i)
            total += p
            if total >= s.top_p:
                break
        cand = kept
    if s.min_p > 0:
        top = max(float(logits[i]) for i in cand)
        cand = [i for i in cand if float(logits[i]) >= top + math.log(s.min_p)]
    return set(cand)


def ref_softmax(values):
    top = max(float(v) for v in values)
    weights = [math.exp(float(v) - top) for v in values]
    return [w / sum(weights) for w in weights]


def random_logits(rng, n_vocab, scale=3.0):
    return (rng.standard_normal(n_vocab) * scale).astype(np.float32)


# ---- defaults and validation -------------------------------------------------------------------

def test_defaults_are_llama_cpp_defaults():
    s = SamplerSettings()
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.typical_p) == (0.8, 40, 0.95, 0.05, 1.0)
    assert (s.repeat_penalty, s.repeat_last_n, s.presence_penalty, s.frequency_penalty) == (1.0, 64, 0.0, 0.0)
    assert s.seed is None and not s.penalties_enabled and not s.greedy


@pytest.mark.parametrize("bad", [dict(repeat_last_n=-1), dict(repeat_penalty=0.0), dict(seed=-3),
                                 dict(temperature=float("nan"))])
def test_settings_reject_bad_values(bad):
    with pytest.raises(ValueError):
        SamplerSettings(**bad)


# ---- penalties ---------------------------------------------------------------------------------

def test_penalties_follow_llama_cpp_formulas():
    logits = np.array([2.0, -1.0, 0.5, 3.0, 0.0], dtype=np.float32)
    previous = [0, 4, 1, 0, 0, 3]           # the first 0 and the 4 fall outside a window of 4
    out = apply_penalties(logits, previous, repeat_penalty=2.0, repeat_last_n=4,
                          presence_penalty=0.25, frequency_penalty=0.5)
    # token 0 seen twice: 2/2 - (2*0.5 + 0.25); token 1 once: -1*2 - 0.75; token 3 once: 3/2 - 0.75
    np.testing.assert_array_equal(out, np.array([-0.25, -2.75, 0.5, 0.75, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0, 0.0])     # input untouched
    out = apply_penalties(logits, [4], repeat_penalty=1.5, repeat_last_n=4)
    assert out[4] == 0.0                    # a zero logit is multiplied: stays 0


def test_penalties_off_and_processors():
    logits = np.arange(5, dtype=np.float32)
    assert apply_penalties(logits, [1, 2], repeat_penalty=2.0, repeat_last_n=0) is logits
    assert make_logits_processors(SamplerSettings()) == []
    (process,) = make_logits_processors(SamplerSettings(repeat_penalty=2.0, repeat_last_n=2))
    np.testing.assert_array_equal(process(logits, [4, 1, 2]), [0, 0.5, 1, 3, 4])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_penalties(logits, [7], repeat_penalty=2.0)


def test_greedy_is_argmax_of_penalized_logits():
    rng = np.random.default_rng(1)
    logits = random_logits(rng, 1000)
    best = int(np.argmax(logits))
    assert make_sampler(SamplerSettings(temperature=0))(logits, []) == best
    penalized = make_sampler(SamplerSettings(temperature=0, repeat_penalty=1e6))
    assert penalized(logits, [best]) == int(np.argsort(logits)[-2])


# ---- candidate filters -------------------------------------------------------------------------

def test_filters_keep_exactly_the_reference_sets():
    rng = np.random.default_rng(2)
    for case in range(300):
        n_vocab = int(rng.integers(1, 400))
        s = SamplerSettings(top_k=int(rng.choice([0, 1, 5, 40, 500])), top_p=float(rng.choice([1.0, 0.5, 0.9, 0.99])),
                            min_p=float(rng.choice([0.0, 0.05, 0.3])), typical_p=float(rng.choice([1.0, 1.0, 0.7])))
        logits = random_logits(rng, n_vocab, scale=float(rng.choice([0.5, 3.0, 8.0])))
        survivors = filter_candidates(logits, s)
        assert set(survivors.token_ids.tolist()) == reference_survivors(logits, s), (case, s)
        np.testing.assert_array_equal(survivors.logits, logits[survivors.token_ids])


@pytest.mark.parametrize("n_vocab", [20_000, 262_144])
def test_large_vocabulary_paths_match_reference(n_vocab):
    rng = np.random.default_rng(3)
    logits = random_logits(rng, n_vocab)
    order = np.argsort(-logits, kind="stable")
    kept = top_k(Candidates.from_logits(logits), 40)
    np.testing.assert_array_equal(kept.logits, logits[order[:40]])     # sorted, largest first
    assert set(kept.token_ids.tolist()) == set(order[:40].tolist()) and kept.is_sorted
    # nucleus over the whole vocabulary: needs more than the first 256 candidates
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    expected_n = int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1
    assert expected_n > 256
    nucleus = top_p(Candidates.from_logits(logits), 0.9)
    assert set(nucleus.token_ids.tolist()) == set(order[:expected_n].tolist())   # equal logits may swap
    assert np.all(np.diff(nucleus.logits) <= 0)
    cut = min_p(Candidates.from_logits(logits), 0.05)
    assert set(cut.token_ids.tolist()) == set(np.flatnonzero(logits >= logits.max() + np.log(0.05)).tolist())


def test_top_k_finds_peaks_the_strided_sample_misses():
    rng = np.random.default_rng(9)
    logits = random_logits(rng, 100_000, scale=1.0)
    peaks = 24 * np.arange(10) + 1                 # off the sample's stride (100_000 // 4096 = 24)
    logits[peaks] = 100.0 + np.arange(10)
    logits[::24] = 50.0                            # a sample that is high everywhere
    np.testing.assert_array_equal(top_k(Candidates.from_logits(logits), 10).token_ids, peaks[::-1])
    assert len(top_k(Candidates.from_logits(logits), 20)) == 20


def test_filter_edge_cases():
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    assert top_p(Candidates.from_logits(logits), 0.0).token_ids.tolist() == [1]     # at least one
    assert min_p(Candidates.from_logits(logits), 1.0).token_ids.tolist() == [1]
    assert min_p(Candidates.from_logits(logits), 5.0).token_ids.tolist() == [1]
    assert len(typical_p(Candidates.from_logits(logits), 1.0)) == 3
    assert top_k(Candidates.from_logits(logits), 10).token_ids.tolist() == [1, 2, 0]


# ---- drawing -----------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible():
    rng = np.random.default_rng(4)
    rows = [random_logits(rng, 5000, scale=1.0) for _ in range(40)]
    s = SamplerSettings(seed=1234, top_k=0, top_p=1.0, min_p=0.0)
    first, again = make_sampler(s), make_sampler(s)
    other = make_sampler(SamplerSettings(seed=99, top_k=0, top_p=1.0, min_p=0.0))
    a = [first(r, []) for r in rows]
    assert a == [again(r, []) for r in rows]
    assert a != [other(r, []) for r in rows]


def test_draws_follow_softmax_of_scaled_logits():
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -3.0], dtype=np.float32)
    sampler = make_sampler(SamplerSettings(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=5))
    n = 40_000
    counts = np.bincount([sampler(logits, []) for _ in range(n)], minlength=6)
    expected = np.exp(logits / 0.7 - np.max(logits / 0.7))
    expected /= expected.sum()
    sigma = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) < 4.5 * sigma + 1), (counts, n * expected)


def test_draws_stay_inside_the_filtered_set():
    rng = np.random.default_rng(6)
    logits = random_logits(rng, 3000, scale=2.0)
    s = SamplerSettings(seed=7, top_k=50, top_p=0.8, min_p=0.1)
    allowed = reference_survivors(logits, s)
    sampler = make_sampler(s)
    drawn = {sampler(logits, []) for _ in range(2000)}
    assert drawn <= allowed and len(drawn) > 1


def test_first_reaching_matches_plain_cumulative_search():
    rng = np.random.default_rng(8)
    for n in (7, 4096, 5000, 70_001):
        weights = rng.integers(0, 4, n).astype(np.float32)     # integers: exact running sums
        cumulative = np.cumsum(weights, dtype=np.float64)
        for target in list(rng.uniform(0, cumulative[-1], 50)) + [0.0, cumulative[-1], 1.0, 3.0]:
            expected = min(int(np.searchsorted(cumulative, target, side="left")), n - 1)
            assert _first_reaching(weights, float(target)) == expected


def test_sampler_rejects_a_matrix():
    with pytest.raises(ValueError, match="one row"):
        make_sampler()(np.zeros((2, 3), dtype=np.float32), [])


# ---- stop handling -----------------------------------------------------------------------------

def feed_all(checker, pieces, ids=None):
    shown, steps = [], []
    for i, piece in enumerate(pieces):
        step = checker.feed(piece, None if ids is None else ids[i])
        steps.append(step)
        shown.append(step.text)
        if step.stop:
            break
    else:
        shown.append(checker.flush())
    return shown, steps


def test_stop_string_split_over_tokens_never_shows():
    checker = StopChecker(["</answer>"])
    shown, steps = feed_all(checker, ["Yes", " it is<", "/ans", "wer> trailing"])
    assert shown == ["Yes", " it is", "", ""]
    assert steps[-1].stop and steps[-1].reason == "stop_string" and steps[-1].stop_string == "</answer>"


def test_false_start_is_released():
    checker = StopChecker(["STOP"])
    shown, _ = feed_all(checker, ["a ST", "OR", "E"])
    assert shown == ["a ", "STOR", "E", ""]


def test_the_stop_string_completed_first_wins():
    # the same text, one piece or two: "\n" is complete before "<\n<" is
    for pieces in (["<\n<"], ["<\n", "<"], ["<", "\n<"]):
        shown, steps = feed_all(StopChecker(["<\n<", "\n"]), pieces)
        assert "".join(shown) == "<" and steps[-1].stop_string == "\n"


def test_end_of_generation_token():
    checker = StopChecker(["<|im"], eog_ids=[2])
    step = checker.feed("x <|", 10)
    assert step.text == "x " and not step.stop
    step = checker.feed("</s>", 2)
    assert step.stop and step.reason == "eog" and step.text == "<|"    # held text released, EOG text not
    assert checker.feed("more", 10) == type(step)("", True, "eog", None)


@hyp_settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab<>\n", max_size=40),
       stops=st.lists(st.text(alphabet="ab<>\n", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=12))
def test_stop_checker_shows_exactly_the_text_before_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    # generation stops as soon as a stop string is complete: the one that ends first wins
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[:min(hits)[1]] if hits else text
    shown, steps = feed_all(StopChecker(stops), pieces)
    running = ""
    for part in shown:
        running += part
        assert expected.startswith(running)       # nothing ever shown that is not final output
    assert running == expected
    assert bool(steps and steps[-1].stop) == bool(hits)


# ---- non-finite logits -------------------------------------------------------------------------

def test_check_finite():
    check_finite(np.zeros(10, dtype=np.float32), "unused")
    logits = np.zeros((3, 8), dtype=np.float32)
    logits[1, 2] = np.nan
    logits[2, 0:3] = np.inf
    with pytest.raises(NonFiniteLogitsError) as raised:
        check_finite(logits, "KV cache q4_0; try -ctk q8_0 or f16")
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert "1 NaN" in message and "3 +inf" in message and "of 24 values" in message and "row 1" in message
    assert message.endswith("KV cache q4_0; try -ctk q8_0 or f16")
