"""What the window and its panels run on the engine thread. No widgets here.

* `load_model` opens a GGUF (or split set) with its metadata overrides and builds its inventory;
  the `LoadedModel` it returns is what every panel is handed.
* `ChatRunner` owns the chat's model, its `Session` (the KV cache, reused across turns so that
  each turn evaluates only what changed since the last) and its chat template; it rebuilds them
  when the model, the run config or the placement changes. Only jobs touch it. `prepare` builds
  them ahead of the first turn, compiling the CPU kernels when Numba's cache is cold.
* `run_perplexity` builds a model, reads and tokenizes the text there (never on the GUI thread),
  and yields what `engine.eval.perplexity` yields, after a `PerplexityStarted`.

The panels submit these through `app.bridge`; every payload that comes back is a frozen dataclass.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.bridge import JobContext
from engine.arch.overrides import MetadataOverride, apply_overrides, parse_override_kv
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.eval.perplexity import count_chunks, kl_divergence, perplexity, read_kl_base
from engine.run.generate import GenerationEvent, Session, generate
from engine.run.sampling import SamplerSettings
from engine.run_config import RunConfig
from engine.units import format_bytes

MODE_PERPLEXITY, MODE_SAVE_BASE, MODE_COMPARE = "perplexity", "save_base", "compare"

ModelFactory = Callable[[Any, RunConfig, Any], Any]     # (model_file, run_config, placement) -> model


# ---- opening models -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedModel:
    """A model opened on the engine thread, handed to the GUI. Treat every part as read-only.

    With metadata overrides, `model_file.metadata` holds the overridden values (what the inventory,
    chat and perplexity see) and `file_metadata` the file's own."""
    path: Path
    model_file: ModelFile
    inventory: Inventory
    load_s: float
    overrides: tuple[MetadataOverride, ...] = ()
    file_metadata: Mapping[str, Any] | None = None     # None: the same as model_file.metadata
    notice: str = ""                                    # what the window should tell the user about it

    @property
    def metadata_in_file(self) -> Mapping[str, Any]:
        return self.model_file.metadata if self.file_metadata is None else self.file_metadata

    @property
    def name(self) -> str:
        return self.inventory.name

    @property
    def total_bytes(self) -> int:
        return self.inventory.total_bytes

    def summary(self) -> str:
        n = len(self.overrides)
        return (f"{self.name} · {self.inventory.arch} · {format_bytes(self.total_bytes)} · "
                f"{len(self.inventory.tensors)} tensors"
                + (f" · {n} metadata override{'s' if n != 1 else ''}" if n else ""))


def load_model(path: str | Path, ctx: JobContext,
               overrides: Iterable[MetadataOverride | str] = ()) -> LoadedModel:
    """Open a GGUF (or split set) and build its inventory; runs on the engine thread. Metadata
    overrides (`--override-kv`) replace the file's values before anything reads them."""
    start_s = time.perf_counter()
    path = Path(path).expanduser()
    overrides = tuple(parse_override_kv(o) if isinstance(o, str) else o for o in overrides)
    ctx.progress(0, 2, f"reading {path.name}")
    model_file = ModelFile(path)
    file_metadata = model_file.metadata
    if overrides:
        model_file.metadata = apply_overrides(file_metadata, overrides)
    ctx.check_cancelled()
    ctx.progress(1, 2, f"building the inventory of {path.name}")
    inventory = Inventory.from_model_file(model_file)
    ctx.check_cancelled()
    ctx.progress(2, 2, f"opened {path.name}")
    return LoadedModel(path, model_file, inventory, time.perf_counter() - start_s, overrides, file_metadata)


def load_default_model(ctx: JobContext) -> LoadedModel:
    """The built-in chat model (else the base model, else the synthetic demo, which comes with a
    notice on how to get a real model); the first run may assemble or write it into the cache
    (slow, once)."""
    from engine.synth.default_model import GET_A_REAL_MODEL, chat_model_path, is_synthetic_demo
    ctx.note("finding the built-in model")
    path = chat_model_path(progress=ctx.note)
    ctx.check_cancelled()
    loaded = load_model(path, ctx)
    return dataclasses.replace(loaded, notice=GET_A_REAL_MODEL) if is_synthetic_demo(path) else loaded


# ---- running them -------------------------------------------------------------------------------

def default_model_factory(model_file, run_config: RunConfig, placement: Any):
    """The engine model over an open GGUF, each weight on the device the placement gives it (none,
    or all on the CPU: the plain CPU backend). Weights are memory-mapped, so this is quick."""
    from engine.run.model import Model
    return Model(model_file, run_config, placement=placement)


# ---- chat ---------------------------------------------------------------------------------------

class ChatTurnError(ValueError):
    """A turn that cannot run: a template that fails, a conversation longer than the context."""


@dataclass(frozen=True)
class ChatRequest:
    loaded: LoadedModel
    run_config: RunConfig
    placement: Any                          # engine.plan.placement.Placement or None; a change rebuilds the session
    messages: tuple[dict[str, str], ...]    # role/content, system prompt first when there is one
    settings: SamplerSettings
    max_tokens: int
    completion: bool = False                # a base model: the text so far continued as is, no chat template


@dataclass(frozen=True)
class TurnStarted:
    """Yielded once the prompt is tokenized, before it is evaluated."""
    n_ctx: int
    prompt_tokens: int
    reused_tokens: int      # the prefix the KV cache already held
    template_name: str


def compiling_text(progress) -> str:
    """One line on a `kernels.compile_progress.CompileProgress`, for the status bar and the chat."""
    return f"Preparing CPU kernels for this machine (first run): {progress.describe()}"


def prepare_kernels(model, ctx: JobContext) -> None:
    """With a cold cache, compile every kernel this model's prompts use (the job's `compiling`
    signal shows each); with a warm one, evaluate one token: the kernels are loaded before a
    turn is timed, so its tokens/s are real."""
    from engine.run.warmup import is_warm, warm_up
    if is_warm(model.file, model.run_config):
        model.eval_logits(np.zeros(1, dtype=np.int32), model.new_cache(1), last_only=True)
        return
    ctx.note("preparing CPU kernels for this machine (first run)")
    warm_up(model, ctx.check_cancelled)


class ChatRunner:
    """The chat's model, Session and template on the engine thread; reused until the model,
    run config or placement changes. Never touched from the GUI thread."""

    def __init__(self, model_factory: ModelFactory = default_model_factory):
        self.model_factory = model_factory
        self.session: Session | None = None
        self.template = None
        self._key: tuple | None = None

    def release(self, ctx: JobContext | None = None) -> None:
        """Drop the model and its KV cache (the memory goes back)."""
        self.session, self.template, self._key = None, None, None

    def _ensure_session(self, request: ChatRequest, ctx: JobContext) -> Session:
        from engine.text.chat_template import ChatTemplate, ChatTemplateError
        key = (request.loaded.model_file, request.run_config, request.placement)
        if self._key is not None and self._key[0] is key[0] and self._key[1:] == key[1:] and self.session is not None:
            return self.session
        self.release()
        ctx.note(f"preparing {request.loaded.path.name}")
        model = self.model_factory(request.loaded.model_file, request.run_config, request.placement)
        ctx.note("preparing kernels")
        prepare_kernels(model, ctx)
        try:
            template = ChatTemplate.from_metadata(model.metadata, request.loaded.model_file.architecture)
        except ChatTemplateError as e:
            raise ChatTurnError(f"The model's chat template cannot be used: {e}") from e
        self.session, self.template, self._key = Session(model), template, key
        return self.session

    def prepare(self, request: ChatRequest, ctx: JobContext) -> None:
        """With a cold kernel cache, the session for `request` built now and its kernels compiled,
        so that the first turn starts at once; with a warm one nothing (the first turn builds it
        in well under a second, and an open model may be too large to evaluate idly)."""
        from engine.run.warmup import is_warm
        if not is_warm(request.loaded.model_file, request.run_config):
            self._ensure_session(request, ctx)

    def turn(self, request: ChatRequest, ctx: JobContext) -> Iterator[TurnStarted | GenerationEvent]:
        """One assistant reply: render, tokenize, then stream `generate`'s events."""
        from engine.text.chat_template import ChatTemplateError
        session = self._ensure_session(request, ctx)
        try:
            prompt = completion_prompt(request.messages) if request.completion else \
                self.template.render_prompt(list(request.messages), add_generation_prompt=True)
        except ChatTemplateError as e:
            raise ChatTurnError(f"Cannot build the prompt: {e}") from e
        tokens = session.tokenizer.encode(prompt, add_special=True, parse_special=True)
        if len(tokens) >= session.n_ctx:
            raise ChatTurnError(f"The conversation is {len(tokens)} tokens long and the context holds "
                                f"{session.n_ctx}: start a new chat, shorten this one, or raise the context length.")
        reused = session.reusable_prefix(tokens)
        yield TurnStarted(session.n_ctx, len(tokens), reused,
                          "completion (no chat template)" if request.completion else self.template.name)
        try:
            yield from generate(session, tokens, request.settings, request.max_tokens, (), ctx.cancel_event,
                                lambda done, total: ctx.progress(done, total, "reading the prompt"))
        except Exception:
            self._forget_cache(session)     # what the cache holds is unknown after a failure mid-step
            raise
        # router selections so far (n_layer, n_expert): the designer's heat map
        return session.model.expert_counts.copy()

    @staticmethod
    def _forget_cache(session: Session) -> None:
        session.tokens.clear()
        session.cache.reset()


def completion_prompt(messages: Sequence[dict[str, str]]) -> str:
    """A base model's prompt: the system prompt and the turns as one running text, which the reply continues."""
    return "".join(m["content"] for m in messages)


# ---- perplexity ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PerplexityRequest:
    loaded: LoadedModel
    run_config: RunConfig
    placement: Any
    text: str | None                # pasted text, or
    text_path: str | None           # a file, read on the engine thread
    n_ctx: int
    n_chunks: int | None            # None: every chunk
    mode: str = MODE_PERPLEXITY
    base_path: str | None = None


@dataclass(frozen=True)
class PerplexityStarted:
    """Yielded once the text is tokenized (or the base is read), before the first chunk."""
    mode: str
    n_tokens: int
    n_chunks: int
    n_ctx: int
    tokenize_s: float


def _read_text(request: PerplexityRequest) -> str | None:
    if request.text is not None:
        return request.text
    if request.text_path:
        return Path(request.text_path).expanduser().read_text(encoding="utf-8", errors="replace")
    return None


def run_perplexity(request: PerplexityRequest, ctx: JobContext,
                   model_factory: ModelFactory = default_model_factory) -> Iterator:
    """The job: PerplexityStarted, then the engine's per-chunk events and its final result."""
    from engine.text.tokenizer import Tokenizer
    ctx.note(f"preparing {request.loaded.path.name}")
    base = read_kl_base(request.base_path) if request.mode == MODE_COMPARE else None
    n_ctx = base.n_ctx if base is not None else request.n_ctx     # a comparison runs at the base's context
    model = model_factory(request.loaded.model_file, request.run_config.replace(n_ctx=n_ctx), request.placement)
    tokenizer = Tokenizer.from_metadata(model.metadata)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    text = _read_text(request)
    ctx.check_cancelled()
    ctx.note("tokenizing the input")
    started_s = time.perf_counter()
    tokens = None if text is None else np.asarray(tokenizer.encode(text, add_special=True), dtype=np.int32)
    tokenize_s = time.perf_counter() - started_s
    ctx.check_cancelled()
    cache = model.new_cache(n_ctx)

    def eval_chunk(chunk: np.ndarray) -> np.ndarray:
        cache.reset()       # each chunk starts from an empty cache, as llama-perplexity's do
        # checked before every layer: Cancel stops within a layer, not at the end of a long chunk
        return model.eval_logits(chunk, cache, check_cancelled=ctx.check_cancelled)

    if base is not None:
        n_chunk = base.n_chunk if request.n_chunks is None else min(request.n_chunks, base.n_chunk)
        yield PerplexityStarted(MODE_COMPARE, len(base.tokens), n_chunk, n_ctx, tokenize_s)
        yield from kl_divergence(tokens, n_ctx, eval_chunk, request.base_path, bos_id, request.n_chunks)
        return
    if tokens is None:
        raise ValueError("choose a text file or paste some text to measure perplexity on")
    n_chunk = count_chunks(len(tokens), n_ctx, request.n_chunks)
    yield PerplexityStarted(request.mode, len(tokens), n_chunk, n_ctx, tokenize_s)
    base_path = request.base_path if request.mode == MODE_SAVE_BASE else None
    yield from perplexity(tokens, n_ctx, eval_chunk, bos_id, request.n_chunks, kl_base_path=base_path)
