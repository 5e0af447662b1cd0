"""Token sampling, kept out of the model: logits processors (penalties) and a composed sampler.

The chain and each step's semantics follow llama.cpp's default chain (common_sampler_init with the
defaults of common_params_sampling):

    penalties -> top_k -> typical_p -> top_p -> min_p -> temperature -> dist

and greedy (the argmax of the penalized logits) when the temperature is <= 0. Top-p, typical-p and
min-p see the candidates left by the step before at temperature 1, as in llama.cpp; the temperature
only shapes the final draw. Random numbers come from a seeded numpy Generator: a seed reproduces our
own runs, not llama.cpp's (std::mt19937) draws.

Candidates are (token ids, logits) pairs; a 262144-entry vocabulary is never fully sorted on the
common path: the k largest are found by a threshold pre-filter plus np.argpartition.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Sequence

import numpy as np

LogitsProcessor = Callable[[np.ndarray, Sequence[int]], np.ndarray]
Sampler = Callable[[np.ndarray, Sequence[int]], int]

_SMALL_VOCAB = 8192          # below this, plain argpartition is already fast
_SAMPLE_BLOCK = 1024         # block length of the two-level inverse-CDF search


@dataclass(frozen=True)
class SamplerSettings:
    """llama.cpp's sampling parameters, with its defaults (common_params_sampling)."""
    temperature: float = 0.8        # <= 0: greedy
    top_k: int = 40                 # <= 0: the whole vocabulary
    top_p: float = 0.95             # >= 1: off
    min_p: float = 0.05             # <= 0: off
    typical_p: float = 1.0          # >= 1: off
    repeat_penalty: float = 1.0     # 1: off
    repeat_last_n: int = 64         # tokens the penalties look back over; 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None         # None: a fresh random seed

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                     "presence_penalty", "frequency_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"sampling setting {name} must be a finite number, not {getattr(self, name)}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat penalty must be > 0 (1 = off), not {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat-last-n must be >= 0 (0 = off), not {self.repeat_last_n}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0 or None (random), not {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalties_enabled(self) -> bool:
        # llama_sampler_penalties::is_disabled
        return self.repeat_last_n > 0 and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                           or self.presence_penalty != 0.0)


# ---- logits processors -------------------------------------------------------------------------

def apply_penalties(logits: np.ndarray, previous_tokens: Sequence[int], repeat_penalty: float = 1.0,
                    repeat_last_n: int = 64, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0) -> np.ndarray:
    """llama.cpp's penalties sampler over the last `repeat_last_n` previous tokens: a token seen
    `count` times has a positive logit divided by `repeat_penalty` (a logit <= 0 multiplied), then
    `count * frequency_penalty + presence_penalty` subtracted. Returns a new array; float32 math."""
    if repeat_last_n <= 0 or len(previous_tokens) == 0:
        return logits
    window = np.asarray(previous_tokens[-repeat_last_n:], dtype=np.int64)
    token_ids, counts = np.unique(window, return_counts=True)
    if token_ids[0] < 0 or token_ids[-1] >= logits.shape[-1]:
        raise ValueError(f"previous token id {int(token_ids[0] if token_ids[0] < 0 else token_ids[-1])} "
                         f"is outside the vocabulary of {logits.shape[-1]} tokens")
    out = logits.copy()
    seen = out[token_ids]
    seen = np.where(seen <= 0, seen * out.dtype.type(repeat_penalty), seen / out.dtype.type(repeat_penalty))
    seen -= counts.astype(out.dtype) * out.dtype.type(frequency_penalty) + out.dtype.type(presence_penalty)
    out[token_ids] = seen
    return out


def make_logits_processors(settings: SamplerSettings) -> list[LogitsProcessor]:
    """The processors that run before the sampler (mlx-lm style): penalties, when enabled."""
    if not settings.penalties_enabled:
        return []
    return [partial(apply_penalties, repeat_penalty=settings.repeat_penalty, repeat_last_n=settings.repeat_last_n,
                    presence_penalty=settings.presence_penalty, frequency_penalty=settings.frequency_penalty)]


# ---- candidate filters ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidates:
    """Surviving tokens and their logits. `ids` None means the whole vocabulary in id order;
    `is_sorted` means by descending logit."""
    ids: np.ndarray | None
    logits: np.ndarray
    is_sorted: bool = False

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> Candidates:
        return cls(None, logits)

    @property
    def token_ids(self) -> np.ndarray:
        return np.arange(len(self.logits)) if self.ids is None else self.ids

    def take(self, index: np.ndarray | slice, is_sorted: bool) -> Candidates:
        if self.ids is not None:
            ids = self.ids[index]
        elif isinstance(index, slice):
            ids = np.arange(len(self.logits))[index]
        else:
            ids = index                 # positions in the whole vocabulary are token ids
        return Candidates(ids, self.logits[index], is_sorted)

    def __len__(self) -> int:
        return len(self.logits)


def top_k(candidates: Candidates, k: int) -> Candidates:
    """The k highest logits, sorted descending (llama_sampler_top_k; k <= 0 keeps all)."""
    if k <= 0:
        return candidates
    k = min(k, len(candidates))
    if candidates.is_sorted:
        return candidates.take(slice(0, k), True)
    return candidates.take(_top_indices(candidates.logits, k), True)


def typical_p(candidates: Candidates, p: float) -> Candidates:
    """Locally typical sampling (llama_sampler_typical): keep the tokens whose surprisal is closest
    to the entropy until their probability exceeds p."""
    if p >= 1.0:
        return candidates
    probs = _softmax(candidates.logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_probs = np.log(probs)
        entropy = -np.sum(np.where(probs > 0, probs * log_probs, 0.0))
        distance = np.abs(-log_probs - entropy)
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(probs[order])
    n_keep = min(int(np.searchsorted(cumulative, p, side="right")) + 1, len(order))
    return candidates.take(order[:n_keep], False)


def top_p(candidates: Candidates, p: float) -> Candidates:
    """Nucleus sampling (llama_sampler_top_p): the fewest highest tokens whose probability reaches p,
    at least one. Sorts only as far as needed: 256 candidates, then 16x more."""
    if p >= 1.0:
        return candidates
    weights = _exp_weights(candidates.logits)
    target = p * weights.sum(dtype=np.float64)
    n = len(candidates)
    k = n if candidates.is_sorted else min(256, n)
    while True:
        order = np.arange(n) if candidates.is_sorted else _top_indices(candidates.logits, k)
        reached = int(np.searchsorted(np.cumsum(weights[order], dtype=np.float64), target, side="left"))
        if reached < k or k == n:
            return candidates.take(order[:min(reached + 1, k)], True)
        k = min(n, 16 * k)


def min_p(candidates: Candidates, p: float) -> Candidates:
    """llama_sampler_min_p: keep tokens with probability >= p * the highest, i.e. logit >= max + log p
    (float32 as in llama.cpp); order is kept."""
    if p <= 0.0 or len(candidates) == 0:
        return candidates
    max_logit = np.float32(candidates.logits.max())
    min_logit = min(max_logit + np.float32(np.log(np.float32(p))), max_logit)    # p > 1 keeps the top
    return candidates.take(np.flatnonzero(candidates.logits >= min_logit), candidates.is_sorted)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits / logits.dtype.type(temperature)


def filter_candidates(logits: np.ndarray, settings: SamplerSettings) -> Candidates:
    """The candidates that survive top_k -> typical_p -> top_p -> min_p (logits already processed)."""
    candidates = top_k(Candidates.from_logits(logits), settings.top_k)
    candidates = typical_p(candidates, settings.typical_p)
    candidates = top_p(candidates, settings.top_p)
    return min_p(candidates, settings.min_p)


def sample_candidate(candidates: Candidates, temperature: float, rng: np.random.Generator) -> int:
    """Draw one token from softmax(logits / temperature) over the candidates (llama_sampler_dist:
    the first candidate whose running probability reaches a uniform draw)."""
    draw = rng.random()         # always one draw per token, so a seed gives one stream
    if len(candidates) == 1:
        return int(candidates.token_ids[0])
    weights = _exp_weights(apply_temperature(candidates.logits, temperature))
    index = _first_reaching(weights, draw * weights.sum(dtype=np.float64))
    return int(index if candidates.ids is None else candidates.ids[index])


def make_sampler(settings: SamplerSettings = SamplerSettings()) -> Sampler:
    """sampler(logits (n_vocab,), previous_tokens) -> token id. Runs the settings' logits processors
    itself (do not apply them again), then greedy or the filter chain and a seeded draw."""
    processors = make_logits_processors(settings)
    rng = np.random.default_rng(settings.seed)

    def sample(logits: np.ndarray, previous_tokens: Sequence[int] = ()) -> int:
        if logits.ndim != 1:
            raise ValueError(f"the sampler takes one row of logits (n_vocab,), not shape {logits.shape}")
        for process in processors:
            logits = process(logits, previous_tokens)
        if settings.greedy:
            return int(np.argmax(logits))
        return sample_candidate(filter_candidates(logits, settings), settings.temperature, rng)

    return sample


# ---- helpers -------------------------------------------------------------------------------------

def _exp_weights(logits: np.ndarray) -> np.ndarray:
    """exp(logits - max) in float32, in place on one copy: a whole vocabulary stays cheap."""
    weights = np.array(logits, dtype=np.float32)
    weights -= weights.max()
    return np.exp(weights, out=weights)


def _softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits.astype(np.float64) - logits.max())
    return weights / weights.sum()


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first."""
    pool = _pool_holding_top(values, k)
    if k < len(pool):
        pool = pool[np.argpartition(-values[pool], k - 1)[:k]]
    return pool[np.argsort(-values[pool], kind="stable")]


def _pool_holding_top(values: np.ndarray, k: int) -> np.ndarray:
    """A few thousand indices that surely include the k largest: everything at or above a threshold
    read from a strided sample. Exact whenever the pool holds >= k values (then the k-th largest is
    above the threshold); otherwise all indices."""
    n = len(values)
    if n <= _SMALL_VOCAB or 16 * k > n:
        return np.arange(n)
    stride = n // 4096
    sample = values[::stride]
    rank = min(len(sample) - 1, (4 * k + 256) // stride)
    threshold = np.partition(sample, len(sample) - 1 - rank)[len(sample) - 1 - rank]
    pool = np.flatnonzero(values >= threshold)
    return pool if len(pool) >= k else np.arange(n)


def _first_reaching(weights: np.ndarray, target: float) -> int:
    """First index whose running sum of weights is >= target: block sums first, so a whole
    vocabulary costs one pass instead of a full cumulative sum."""
    if len(weights) <= 4 * _SAMPLE_BLOCK:
        return _first_reaching_in(weights, target)
    block_ends = np.cumsum(np.add.reduceat(weights, np.arange(0, len(weights), _SAMPLE_BLOCK), dtype=np.float64))
    block = _first_reaching_in(np.diff(block_ends, prepend=0.0), target)
    before = block_ends[block - 1] if block else 0.0
    start = block * _SAMPLE_BLOCK
    return start + _first_reaching_in(weights[start:start + _SAMPLE_BLOCK], target - before)


def _first_reaching_in(weights: np.ndarray, target: float) -> int:
    cumulative = np.cumsum(weights, dtype=np.float64)
    return min(int(np.searchsorted(cumulative, target, side="left")), len(weights) - 1)


# ---- stopping ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StopStep:
    """What to show now, and whether generation ends here."""
    text: str
    stop: bool = False
    reason: str | None = None           # "eog" or "stop_string"
    stop_string: str | None = None


class StopChecker:
    """Watches generated text for stop strings and end-of-generation tokens.

    Text that could be the start of a stop string is held back until it is known not to be one,
    so no part of a stop string ever reaches the user; `flush()` releases what is held when
    generation ends for another reason (length, cancel)."""

    def __init__(self, stop_strings: Iterable[str] = (), eog_ids: Iterable[int] = ()):
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.eog_ids = frozenset(int(t) for t in eog_ids)
        self._held = ""
        self._stopped: StopStep | None = None

    def feed(self, text: str, token_id: int | None = None) -> StopStep:
        """Take the text of one token (and its id); return what may be shown and whether to stop.
        The text of an end-of-generation token itself is never shown."""
        if self._stopped is not None:
            return StopStep("", True, self._stopped.reason, self._stopped.stop_string)
        if token_id is not None and token_id in self.eog_ids:
            return self._stop(StopStep(self.flush(), True, "eog"))
        pending = self._held + text
        found = self._earliest_stop(pending)
        if found is not None:
            start, stop_string = found
            self._held = ""
            return self._stop(StopStep(pending[:start], True, "stop_string", stop_string))
        n_hold = self._partial_suffix_len(pending)
        self._held = pending[len(pending) - n_hold:] if n_hold else ""
        return StopStep(pending[:len(pending) - n_hold])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    @property
    def held_text(self) -> str:
        return self._held

    def _stop(self, step: StopStep) -> StopStep:
        self._stopped = step
        return step

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string whose first occurrence ends first (so the result does not depend on how
        the text was cut into tokens); on a tie, the one that starts first."""
        hits = [(start + len(s), start, s) for s in self.stop_strings if (start := text.find(s)) >= 0]
        if not hits:
            return None
        _, start, stop_string = min(hits)
        return start, stop_string

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


# ---- numerical health --------------------------------------------------------------------------

class NonFiniteLogitsError(ValueError):
    """The model produced NaN or infinite logits."""


def check_finite(logits: np.ndarray, context: str = "") -> None:
    """Raise NonFiniteLogitsError naming what was found (and where) plus the caller's context,
    e.g. "KV cache q4_0; try -ctk q8_0 or f16"."""
    if np.isfinite(logits).all():
        return
    counts = {"NaN": int(np.isnan(logits).sum()), "+inf": int(np.isposinf(logits).sum()),
              "-inf": int(np.isneginf(logits).sum())}
    found = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    where = ""
    if logits.ndim == 2:
        where = f", first in row {int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])}"
    message = f"the model produced non-finite logits: {found} of {logits.size} values{where}"
    raise NonFiniteLogitsError(f"{message}; {context}" if context else message)
