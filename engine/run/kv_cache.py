"""The KV cache: preallocated per-layer K and V arrays, sized exactly as llama.cpp sizes them.

A full-attention layer keeps one cell per position of the padded context; a sliding-window or
chunked layer keeps llama.cpp's smaller window cache (llama_kv_cache_iswa) and uses it as a
ring: position p lives in cell p % cells. Each cell remembers its position (-1: empty), which is
what the attention mask is built from.

Each layer's storage lives on the layer's home device and is allocated by that device's backend
(`Backend.new_kv_layer`); this class keeps the host's bookkeeping (which cell each position goes
to, which positions are held) and hands the backend an `AttentionStep` per layer and ubatch.

The sizes come from `engine.plan.memory.kv_cells`, the planner's own rule, so the estimate and the
allocation cannot drift apart.
"""
from __future__ import annotations

import numpy as np

from engine.arch.base import AttentionKind, HyperParams
from engine.backends.cpu import CpuBackend
from engine.backends.protocol import AttentionStep, KVLayout
from engine.plan.memory import flash_attention_on, kv_cells
from engine.run_config import KV_CACHE_TYPES, RunConfig


class ContextOverflowError(ValueError):
    pass


class KVCache:
    """K and V of every layer for one sequence; `n_past` positions have been evaluated."""

    def __init__(self, hp: HyperParams, run_config: RunConfig, homes=None):
        """`homes[il]`: the backend of layer il's home device (all on the CPU when None)."""
        for type_name in (run_config.type_k, run_config.type_v):
            if type_name not in KV_CACHE_TYPES:
                raise ValueError(f"unknown KV cache type {type_name!r}; choose one of {', '.join(KV_CACHE_TYPES)}")
        self.n_ctx = run_config.context_length(hp.n_ctx_train)
        self.n_ubatch = run_config.n_ubatch
        homes = homes or [CpuBackend()] * hp.n_layer
        self.layers = []                        # each layer's storage, on its home device
        self.cell_pos: list[np.ndarray] = []    # position held by each cell, -1 when empty
        self.ring: list[bool] = []
        self.kinds = [hp.attention_kind(il) for il in range(hp.n_layer)]
        self.window = hp.attention_window
        for il in range(hp.n_layer):
            cells = kv_cells(hp, il, run_config)
            layout = KVLayout(cells, hp.n_embd_k_gqa(il), hp.n_embd_v_gqa(il), run_config.type_k, run_config.type_v,
                              run_config.activations, flash_attention_on(run_config))
            self.layers.append(homes[il].new_kv_layer(layout))
            self.cell_pos.append(np.full(cells, -1, dtype=np.int64))
            self.ring.append(cells < self.n_ctx)
        self.n_filled = [0] * hp.n_layer     # cells in use from the start of each layer's arrays
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def k(self) -> list:
        """Each layer's key storage as its device holds it (host arrays on the CPU)."""
        return [layer.k for layer in self.layers]

    @property
    def v(self) -> list:
        return [layer.v for layer in self.layers]

    def check_positions(self, positions: np.ndarray) -> None:
        if len(positions) and (positions.min() < 0 or positions.max() >= self.n_ctx):
            raise ContextOverflowError(
                f"position {int(positions.max())} does not fit the context of {self.n_ctx} tokens; "
                "start a new cache with a larger context (-c) or shorten the input")

    def step(self, il: int, positions: np.ndarray) -> AttentionStep:
        """Where layer il stores the keys/values of these positions, the host's record of them
        updated; the home device's backend does the storing (`Backend.attend`)."""
        if self.ring[il] and len(positions) > self.n_ubatch:
            # more would overwrite keys that this step's first queries still need
            raise ValueError(f"{len(positions)} tokens in one step exceed the ubatch size {self.n_ubatch} "
                             "that the sliding-window cache was sized for")
        cells = positions % len(self.cell_pos[il]) if self.ring[il] else positions
        self.cell_pos[il][cells] = positions
        self.n_filled[il] = max(self.n_filled[il], int(cells.max()) + 1)
        return AttentionStep(cells, self.n_filled[il], self.kinds[il], self.window)

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
        for pos, layer in zip(self.cell_pos, self.layers):
            pos[pos >= n_past] = -1
            layer.forget(n_past)
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
