"""Architecture registry: `general.architecture` -> the module of its family.

Each family module exposes `hyperparams(metadata) -> HyperParams` and
`tensor_specs(hp, tied_output) -> list[TensorSpec]`; modules are imported on first use. This
dict is also the list of hidden imports for packaging.
"""
from __future__ import annotations

import importlib
from types import ModuleType

ARCHITECTURES: dict[str, str] = {
    "llama": "engine.arch.llama",
    "qwen2": "engine.arch.llama",
    "qwen3": "engine.arch.llama",
    "qwen3moe": "engine.arch.llama",
    "gemma3": "engine.arch.gemma3",
    "llama4": "engine.arch.llama4",
    "deepseek2": "engine.arch.deepseek2",
    "qwen35moe": "engine.arch.qwen35",
    "qwen35": "engine.arch.qwen35",
    "qwen3next": "engine.arch.qwen35",
}


class UnsupportedArchitectureError(ValueError):
    def __init__(self, arch: str):
        self.arch = arch
        super().__init__(f"architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")


def family(arch: str) -> ModuleType:
    try:
        return importlib.import_module(ARCHITECTURES[arch])
    except KeyError:
        raise UnsupportedArchitectureError(arch) from None


def is_supported(arch: str) -> bool:
    return arch in ARCHITECTURES
