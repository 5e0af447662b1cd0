"""ggml tensor types: names and byte sizes, for mainline types and ik_llama.cpp's extras.

Mainline types come from the `gguf` package's own tables; the types only ik_llama.cpp
defines come from `engine.gguf.ik_types`. Sizes are what the inventory and planner use, so a file
in a type we cannot run still gets exact per-tensor and per-expert bytes.
"""
from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.gguf import ik_types

# Types the CPU kernels decode (everything gguf.quants can dequantize).
RUNNABLE_TYPE_NAMES = frozenset({
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
})


class UnknownTypeError(ValueError):
    pass


def _mainline(type_id: int) -> GGMLQuantizationType | None:
    try:
        return GGMLQuantizationType(type_id)
    except ValueError:
        return None


def is_known(type_id: int) -> bool:
    return _mainline(type_id) is not None or type_id in ik_types.IK_TYPES


def is_ik_only(type_id: int) -> bool:
    return _mainline(type_id) is None and type_id in ik_types.IK_TYPES


def type_name(type_id: int) -> str:
    t = _mainline(type_id)
    if t is not None:
        return t.name
    if type_id in ik_types.IK_TYPES:
        return ik_types.IK_TYPES[type_id].name
    return f"type#{type_id}"


def is_runnable(type_id: int) -> bool:
    return _mainline(type_id) is not None and type_name(type_id) in RUNNABLE_TYPE_NAMES


def block_size(type_id: int) -> int:
    t = _mainline(type_id)
    if t is not None:
        return GGML_QUANT_SIZES[t][0]
    if type_id in ik_types.IK_TYPES:
        return ik_types.IK_TYPES[type_id].block_size
    raise UnknownTypeError(f"unknown ggml type id {type_id}")


def row_bytes(type_id: int, n_cols: int) -> int | None:
    """Bytes of one row of `n_cols` elements; None when the type's layout is not known."""
    t = _mainline(type_id)
    if t is not None:
        blck, type_size = GGML_QUANT_SIZES[t]
        if n_cols % blck:
            return None
        return n_cols // blck * type_size
    if type_id in ik_types.IK_TYPES:
        return ik_types.ik_row_bytes(ik_types.IK_TYPES[type_id], n_cols)
    raise UnknownTypeError(f"unknown ggml type id {type_id}")


def type_id_by_name(name: str) -> int:
    upper = name.upper()
    try:
        return int(GGMLQuantizationType[upper])
    except KeyError:
        pass
    for t in ik_types.IK_TYPES.values():
        if t.name.upper() == upper:
            return t.type_id
    raise UnknownTypeError(f"unknown ggml type {name!r}")


def kv_row_bytes(type_name: str, n_values: int) -> int:
    """Bytes of one token's row of `n_values` in a KV cache of `type_name` (f16, q8_0, ...): what
    the planner estimates and the backends allocate."""
    if n_values == 0:
        return 0
    row = row_bytes(type_id_by_name(type_name), n_values)
    if row is None:
        raise ValueError(f"KV cache type {type_name} needs rows that are a multiple of its block size; "
                         f"this model caches {n_values} values per token: use f16 or q8_0")
    return row
