"""Text generation as an iterator of small frozen events (mlx-lm's `stream_generate` shape).

A `Session` holds a model, its tokenizer and one KV cache, and remembers which tokens the cache
holds, so a chat turn re-evaluates only what changed since the last one. Nothing here knows Qt:
the GUI runs these iterators on its engine thread and cancels them through a threading.Event.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from engine.run.sampling import SamplerSettings, StopChecker, check_finite, make_sampler
from engine.text.tokenizer import StreamingDetokenizer, Tokenizer

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass(frozen=True)
class GenerationEvent:
    text: str                       # new text since the previous event
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    context_used: int               # positions the cache holds after this step
    finish_reason: str | None = None
    prompt_evaluated: int = 0       # prompt tokens actually evaluated (the rest came from the cache)


class _Stopped(Exception):
    """Raised between layers when a prefill is cancelled."""


def _raise_when_set(cancel: threading.Event | None) -> Callable[[], None] | None:
    if cancel is None:
        return None

    def check() -> None:
        if cancel.is_set():
            raise _Stopped
    return check


class Session:
    """A model, its tokenizer and a KV cache that remembers the tokens it holds."""

    def __init__(self, model, tokenizer: Tokenizer | None = None, n_ctx: int | None = None):
        self.model = model
        self.tokenizer = tokenizer or Tokenizer.from_metadata(model.metadata)
        self.cache = model.new_cache(n_ctx)
        self.tokens: list[int] = []
        self.prompt_evaluated = 0       # tokens the last prefill evaluated

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    def reuse_prefix(self, tokens: Sequence[int]) -> int:
        """Keep the cached prefix shared with `tokens` (leaving at least one token to evaluate)."""
        keep = 0
        for cached, new in zip(self.tokens, tokens):
            if cached != new:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)
        try:
            self.cache.truncate(keep)
        except ValueError:      # a sliding-window cache cannot rewind that far: start over
            keep = 0
            self.cache.reset()
        keep = min(keep, self.cache.n_past)     # a recurrent state resumes from its last checkpoint
        del self.tokens[keep:]
        return keep

    def reusable_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` a prefill will take from the cache: the prefix
        shared with what it holds (one token is always evaluated), or, where the cache keeps
        checkpoints, the newest checkpoint inside that prefix."""
        keep = 0
        for cached, new in zip(self.tokens, tokens):
            if cached != new:
                break
            keep += 1
        keep = min(keep, max(0, len(tokens) - 1))
        if self.checkpoints and keep < len(self.tokens):
            keep = max((c.n_past for c in self.cache.checkpoints if c.n_past <= keep), default=0)
        return keep

    @property
    def checkpoints(self) -> bool:
        """The cache cannot rewind freely (a recurrent state) and keeps checkpoints instead."""
        return hasattr(self.cache, "checkpoint")

    def checkpoint(self) -> None:
        """Mark a turn boundary: a later prompt that shares the tokens so far resumes from here."""
        if self.checkpoints:
            self.cache.checkpoint()

    def prefill(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None,
                cancel: threading.Event | None = None) -> np.ndarray | None:
        """Evaluate `tokens` after the reusable prefix; the logits of the last one (None if cancelled)."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; "
                             "raise the context length (-c) or shorten the conversation")
        keep = self.reuse_prefix(tokens)
        todo = np.asarray(tokens[keep:], dtype=np.int32)
        self.prompt_evaluated = len(todo)
        # with checkpoints, the state before the prompt's last token is kept: a regenerate, which
        # sends the same prompt again, resumes there
        pieces = [todo[:-1], todo[-1:]] if self.checkpoints and len(todo) > 1 else [todo]
        logits, done = None, keep
        check = _raise_when_set(cancel)
        for piece in pieces:
            for start in range(0, len(piece), self.cache.n_ubatch):
                if cancel is not None and cancel.is_set():
                    return None
                chunk = piece[start:start + self.cache.n_ubatch]
                try:
                    logits = self.model.eval_logits(chunk, self.cache, last_only=True, check_cancelled=check)
                except _Stopped:
                    self._forget_partial_ubatch()
                    return None
                self.tokens.extend(int(t) for t in chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(tokens))
            if piece is not pieces[-1]:
                self.checkpoint()
        return logits[-1]

    def _forget_partial_ubatch(self) -> None:
        """A stop inside a ubatch leaves part of it in the cache (some layers' keys, a recurrent
        state moved on in some layers): go back to what is whole. A recurrent state cannot be
        trimmed, so it goes back to a checkpoint before the tokens kept."""
        whole = len(self.tokens)
        if self.checkpoints:
            if whole == 0:
                self.cache.reset()
            else:
                self.cache.truncate(whole - 1)
        else:
            try:
                self.cache.truncate(whole)
            except ValueError:
                self.cache.reset()
        del self.tokens[self.cache.n_past:]

    def step(self, token: int) -> np.ndarray:
        if len(self.tokens) >= self.n_ctx:
            raise ValueError(f"the context of {self.n_ctx} tokens is full")
        logits = self.model.eval_logits(np.array([token], dtype=np.int32), self.cache, last_only=True)
        self.tokens.append(int(token))
        return logits[-1]


def generate(session: Session, prompt_tokens: Sequence[int], settings: SamplerSettings = SamplerSettings(),
             max_tokens: int = 256, stop_strings: Sequence[str] = (), cancel: threading.Event | None = None,
             progress: Callable[[int, int], None] | None = None) -> Iterator[GenerationEvent]:
    """Prefill the prompt, then sample and yield one event per token; the last event carries
    the finish reason (`stop`, `length` or `cancelled`)."""
    tokenizer = session.tokenizer
    sampler = make_sampler(settings)
    detokenizer = StreamingDetokenizer(tokenizer)
    stops = StopChecker(stop_strings, tokenizer.eog_ids)
    start = time.perf_counter()
    logits = session.prefill(list(prompt_tokens), progress, cancel)
    prompt_s = time.perf_counter() - start
    n_prompt = len(prompt_tokens)
    n_evaluated = session.prompt_evaluated
    prompt_tps = n_evaluated / prompt_s if prompt_s > 0 else 0.0     # the tokens the prefill evaluated
    generated: list[int] = []
    gen_start = time.perf_counter()

    def event(text: str, token: int | None, finish: str | None = None) -> GenerationEvent:
        elapsed = time.perf_counter() - gen_start
        if finish is not None:
            session.checkpoint()        # the end of a reply is the next turn's boundary
        return GenerationEvent(text, token, n_prompt, prompt_tps, len(generated),
                               len(generated) / elapsed if elapsed > 0 else 0.0, len(session.tokens), finish,
                               n_evaluated)

    if logits is None:
        yield event("", None, FINISH_CANCELLED)
        return
    while True:
        if cancel is not None and cancel.is_set():
            yield event(stops.flush(), None, FINISH_CANCELLED)
            return
        check_finite(logits, session.model.kv_hint.strip(" ()"))
        token = sampler(logits, session.tokens)
        generated.append(token)
        step = stops.feed(detokenizer.add_token(token), token)
        if step.stop:
            yield event(step.text, token, FINISH_STOP)
            return
        if len(generated) >= max_tokens or len(session.tokens) >= session.n_ctx:
            yield event(step.text + stops.feed(detokenizer.finalize()).text + stops.flush(), token, FINISH_LENGTH)
            return
        yield event(step.text, token)
        logits = session.step(token)
