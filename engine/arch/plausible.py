"""Hyperparameters checked against the tensors that carry them, before anything is sized from them.

Metadata is untrusted: a 1 MB file can claim `block_count = 10**9` or `rope.dimension_count =
2**32 - 1`, and anything sized from such a number (a tuple per layer, a rope table, a KV cache)
exhausts memory. Every number that sizes something is confirmed by the file's own tensors first:
the layer count is the highest `blk.N` + 1, the widths and head counts must reproduce the shapes
of the tensors the family needs, and the rest (rope dims, frequencies, expert counts) must be in
range of what those confirm. What cannot be confirmed is refused with a HyperParamError.
"""
from __future__ import annotations

import math
import re
from types import ModuleType
from typing import Any, Mapping

from gguf.constants import Keys

from engine.arch.base import HyperParamError, HyperParams, Metadata, TensorSpec

LAYER_INDEX_RE = re.compile(r"^blk\.(\d+)\.")
MAX_CONTEXT_TOKENS = 1 << 32         # llama.cpp keeps n_ctx_train in a uint32
MAX_QUOTED_CHARS = 60


def layer_count_of_tensors(tensor_names) -> int:
    """The highest `blk.N` among the names, plus one (0 without layer tensors)."""
    return 1 + max((int(m.group(1)) for m in map(LAYER_INDEX_RE.match, tensor_names) if m), default=-1)


def checked_hyperparams(family: ModuleType, md: Mapping[str, Any],
                        tensor_shapes: Mapping[str, tuple[int, ...]]) -> HyperParams:
    """The family's hyperparameters, each confirmed by `tensor_shapes` (name -> numpy-order shape)."""
    _check_layer_count(md, tensor_shapes)
    try:
        hp = family.hyperparams(md)
    except HyperParamError:
        raise
    except (TypeError, ValueError, OverflowError, IndexError, KeyError) as e:
        # a value of the wrong type or range (a string block count, a list where a number goes)
        raise HyperParamError(f"metadata does not make a {Metadata(md).arch} model: {_short(e)}") from None
    _check_ranges(hp)
    tied = "output.weight" not in tensor_shapes
    check_tensor_shapes(family.tensor_specs(hp, tied), tensor_shapes)
    return hp


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def _check_layer_count(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> None:
    m = Metadata(md)
    key = m.key(Keys.LLM.BLOCK_COUNT)
    claimed = m.require(Keys.LLM.BLOCK_COUNT)
    if type(claimed) is not int:
        raise HyperParamError(f"{key} must be an integer, not {_short(repr(claimed))}")
    in_file = layer_count_of_tensors(tensor_shapes)
    if in_file == 0:
        raise HyperParamError(f"the file has no layer tensors (blk.N.*), but {key} says {claimed} layers")
    if claimed != in_file:
        raise HyperParamError(f"{key} says {_short(claimed)} layers, but the file's tensors go up to "
                              f"blk.{in_file - 1} ({in_file} layers)")


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise HyperParamError(problem)


def _check_ranges(hp: HyperParams) -> None:
    """Numbers no tensor shape carries, checked against those that shapes do confirm."""
    _require(hp.n_embd > 0 and hp.n_head > 0, f"n_embd {hp.n_embd} and n_head {hp.n_head} must be positive")
    _require(all(0 <= n <= hp.n_head for n in hp.n_head_kv),
             f"n_head_kv {_short(sorted(set(hp.n_head_kv)))} must lie in 0..n_head ({hp.n_head})")
    _require(0 <= hp.n_rot <= hp.n_embd_head_k and hp.n_rot % 2 == 0,
             f"rope dimension count {_short(hp.n_rot)} must be even and at most the head size {hp.n_embd_head_k}")
    _require(math.isfinite(hp.rope_freq_base) and hp.rope_freq_base > 0,
             f"rope frequency base {hp.rope_freq_base} must be a positive number")
    _require(math.isfinite(hp.rope_freq_scale) and hp.rope_freq_scale > 0,
             f"rope frequency scale {hp.rope_freq_scale} must be a positive number")
    _require(math.isfinite(hp.rms_eps) and hp.rms_eps >= 0, f"norm epsilon {hp.rms_eps} must be a non-negative number")
    _require(0 < hp.n_ctx_train <= MAX_CONTEXT_TOKENS,
             f"training context {_short(hp.n_ctx_train)} must lie in 1..{MAX_CONTEXT_TOKENS}")
    _require(0 <= hp.n_expert_used <= hp.n_expert,
             f"n_expert_used {_short(hp.n_expert_used)} must lie in 0..n_expert ({hp.n_expert})")


def check_tensor_shapes(specs: list[TensorSpec], tensor_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor the hyperparameters call for is in the file with the shape they call for."""
    for spec in specs:
        shape = tensor_shapes.get(spec.name)
        if shape is None:
            _require(spec.optional, f"tensor {spec.name!r} is missing")
        else:
            _require(spec.accepts(shape), f"tensor {spec.name!r} has shape {tuple(shape)}; the "
                                                 f"hyperparameters call for {_short(spec.shape)}")
