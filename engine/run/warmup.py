"""Compile the CPU kernels a model needs before anyone waits on them.

The kernels are Numba functions cached on disk. With a cold cache (a fresh install, another
OFFLOAD_STUDIO_CPU_ISA, a new version) a model's first prompt compiles them: about a minute for
Gemma 3 270M on a 2-core Xeon, with a warm cache about a second. A weight takes one of three
product paths by the number of tokens in a step (`kernels.cpu.qmatmul`: the one-token integer
kernels, the float tiles, the prefill GEMM from PREFILL_MIN_TOKENS), so a warm-up evaluates one
step of each size in a throwaway cache: the kernels and signatures a prompt uses, compiled now.

A warm-up is a forward pass, which reads every weight: cheap for a small model, slow for one
memory-mapped from disk and pointless when the cache is warm. So a complete one leaves a marker
in Numba's cache directory, keyed by what decides which kernels compile: Numba's version, the
kernels' sources as Numba sees them (file names, sizes and times), the instruction-set form,
and the model's kind (architecture, tensor types, KV cache and activation settings). `is_warm`
reads it without building a model.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np

import kernels.cpu
from kernels.compile_progress import CompileCounter, CompileProgress, counting_compiles
from kernels.cpu.isa import ISA
from kernels.cpu.qgemm import PREFILL_MIN_TOKENS

# one step on each product path: the prefill GEMM, the float tiles, a decode step
WARM_UP_STEPS = (PREFILL_MIN_TOKENS, 2, 1)


def warm_up(model, check_cancelled: Callable[[], None] | None = None,
            report: Callable[[CompileProgress], None] = lambda progress: None) -> CompileCounter:
    """Evaluate one step of each size in a throwaway cache, then mark the kernels warm for
    models of this kind; the counter says what compiled."""
    cache = model.new_cache(sum(WARM_UP_STEPS))
    with counting_compiles(report) as counter:
        for n_tokens in WARM_UP_STEPS:
            # token 0 exists in every vocabulary; every logit of the prefill, as perplexity asks
            model.eval_logits(np.zeros(n_tokens, dtype=np.int32), cache, last_only=n_tokens < PREFILL_MIN_TOKENS,
                              check_cancelled=check_cancelled)
    _mark_warm(marker_path(model.file, model.run_config))
    return counter


def is_warm(model_file, run_config) -> bool:
    """Whether a complete warm-up of a model of this kind ran against this kernel cache."""
    return marker_path(model_file, run_config).exists()


def marker_path(model_file, run_config) -> Path:
    return cache_dir() / f"warm-{_kind_digest(model_file, run_config)}"


def cache_dir() -> Path:
    """Where Numba keeps the kernels' cache: NUMBA_CACHE_DIR, else beside their sources."""
    configured = numba.config.CACHE_DIR
    return Path(configured) / "offload-studio" if configured else Path(kernels.cpu.__file__).parent / "__pycache__"


def _kind_digest(model_file, run_config) -> str:
    digest = hashlib.sha256(f"{numba.__version__} {ISA}".encode())
    for source in sorted(Path(kernels.cpu.__file__).parent.glob("*.py")):
        stat = source.stat()        # what Numba checks before it trusts a cached kernel
        digest.update(f"{source.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    types = sorted({info.ggml_type for info in model_file.tensors.values()})
    digest.update(repr((model_file.architecture, types, run_config.type_k, run_config.type_v,
                        run_config.flash_attn, run_config.activations)).encode())
    return digest.hexdigest()[:32]


def _mark_warm(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:     # a read-only cache: every open warms up again, which is only slower
        pass
