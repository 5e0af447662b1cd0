"""The KV cache: preallocated per-layer K and V arrays, sized exactly as llama.cpp sizes them.

A full-attention layer keeps one cell per position of the padded context; a sliding-window or
chunked layer keeps llama.cpp's smaller window cache (llama_kv_cache_iswa) and uses it as a
ring: position p lives in cell p % cells. Each cell remembers its position (-1: empty), which is
what the attention mask is built from.

The sizes come from `engine.memory.kv_cells`, the planner's own rule, so the estimate and the
allocation cannot drift apart.
"""
from __future__ import annotations

import numpy as np

from engine.arch.base import AttentionKind, HyperParams
from engine.memory import kv_cells
from engine.run_config import RunConfig

CACHE_DTYPES = {"f32": np.float32, "f16": np.float16}


class ContextOverflowError(ValueError):
    pass


def cache_dtype(type_name: str) -> type:
    try:
        return CACHE_DTYPES[type_name]
    except KeyError:
        raise ValueError(f"KV cache type {type_name} is not supported by the CPU engine yet; "
                         f"use one of {', '.join(CACHE_DTYPES)}") from None


class KVCache:
    """K and V of every layer for one sequence; `n_past` positions have been evaluated."""

    def __init__(self, hp: HyperParams, run_config: RunConfig):
        self.n_ctx = run_config.context_length(hp.n_ctx_train)
        self.n_ubatch = run_config.n_ubatch
        k_dtype, v_dtype = cache_dtype(run_config.type_k), cache_dtype(run_config.type_v)
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray | None] = []
        self.cell_pos: list[np.ndarray] = []    # position held by each cell, -1 when empty
        self.ring: list[bool] = []
        self.kinds = [hp.attention_kind(il) for il in range(hp.n_layer)]
        self.window = hp.attention_window
        for il in range(hp.n_layer):
            cells = kv_cells(hp, il, run_config)
            self.k.append(np.zeros((cells, hp.n_embd_k_gqa(il)), dtype=k_dtype))
            n_v = hp.n_embd_v_gqa(il)
            self.v.append(np.zeros((cells, n_v), dtype=v_dtype) if n_v else None)   # MLA: V is part of K
            self.cell_pos.append(np.full(cells, -1, dtype=np.int64))
            self.ring.append(cells < self.n_ctx)
        self.n_filled = [0] * hp.n_layer     # cells in use from the start of each layer's arrays
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + (0 if v is None else v.nbytes) for k, v in zip(self.k, self.v))

    def check_positions(self, positions: np.ndarray) -> None:
        if len(positions) and (positions.min() < 0 or positions.max() >= self.n_ctx):
            raise ContextOverflowError(
                f"position {int(positions.max())} does not fit the context of {self.n_ctx} tokens; "
                "start a new cache with a larger context (-c) or shorten the input")

    def store(self, il: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray | None) -> None:
        """Write the keys/values (n_tokens, ...) of the given positions into layer il."""
        if self.ring[il] and len(positions) > self.n_ubatch:
            # more would overwrite keys that this step's first queries still need
            raise ValueError(f"{len(positions)} tokens in one step exceed the ubatch size {self.n_ubatch} "
                             "that the sliding-window cache was sized for")
        cells = positions % len(self.cell_pos[il]) if self.ring[il] else positions
        self.k[il][cells] = k.reshape(len(positions), -1)
        if v is not None:
            self.v[il][cells] = v.reshape(len(positions), -1)
        self.cell_pos[il][cells] = positions
        self.n_filled[il] = max(self.n_filled[il], int(cells.max()) + 1)

    def view(self, il: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(keys, values, positions) of the cells in use, keys and values as float32."""
        n = self.n_filled[il]
        keys = self.k[il][:n].astype(np.float32, copy=False)
        values = None if self.v[il] is None else self.v[il][:n].astype(np.float32, copy=False)
        return keys, values, self.cell_pos[il][:n]

    def truncate(self, n_past: int) -> None:
        """Forget every position >= n_past (to re-evaluate from there). A window layer's ring may
        already have dropped keys that position n_past needs; then this refuses, as llama.cpp's
        SWA cache does."""
        for il, pos in enumerate(self.cell_pos):
            if self.ring[il] and n_past > 0:
                first_needed = self.first_visible(il, n_past)
                kept = np.count_nonzero((pos >= first_needed) & (pos < n_past))
                if kept < n_past - first_needed:
                    raise ValueError(f"cannot rewind to position {n_past}: layer {il}'s window cache no longer "
                                     "holds the keys it needs; evaluate again from the start")
        for pos in self.cell_pos:
            pos[pos >= n_past] = -1
        self.n_past = min(self.n_past, n_past)

    def first_visible(self, il: int, position: int) -> int:
        """The oldest position that a query at `position` sees in layer il."""
        if self.kinds[il] is AttentionKind.SLIDING:
            return max(0, position - self.window + 1)
        if self.kinds[il] is AttentionKind.CHUNKED:
            return position // self.window * self.window
        return 0

    def reset(self) -> None:
        self.truncate(0)
        self.n_filled = [0] * len(self.n_filled)
