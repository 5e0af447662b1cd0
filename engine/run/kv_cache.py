"""The KV cache: preallocated per-layer K and V arrays, sized exactly as llama.cpp sizes them.

A full-attention layer keeps one cell per position of the padded context; a sliding-window or
chunked layer keeps llama.cpp's smaller window cache (llama_kv_cache_iswa) and uses it as a
ring: position p lives in cell p % cells. Each cell remembers its position (-1: empty), which is
what the attention mask is built from.

The sizes come from `engine.plan.memory.kv_cells`, the planner's own rule, so the estimate and the
allocation cannot drift apart.
"""
from __future__ import annotations

import numpy as np

from engine.gguf import ggml_types
from engine.arch.base import AttentionKind, HyperParams
from engine.plan.memory import kv_cells, kv_row_bytes
from engine.run_config import KV_CACHE_TYPES, RunConfig
from kernels.cpu import dequantize_rows, quantize_rows

FLOAT_DTYPES = {"f32": np.float32, "f16": np.float16}


class ContextOverflowError(ValueError):
    pass


class RowCodec:
    """How one cache type stores rows: NumPy floats for f32/f16, ggml blocks (bytes) for the rest,
    quantized with the same block formats and rounding as llama.cpp's CPU cache."""

    def __init__(self, type_name: str):
        if type_name not in KV_CACHE_TYPES:
            raise ValueError(f"unknown KV cache type {type_name!r}; choose one of {', '.join(KV_CACHE_TYPES)}")
        self.type_name = type_name
        self.dtype = FLOAT_DTYPES.get(type_name)
        self.type_id = ggml_types.type_id_by_name(type_name)

    def empty(self, cells: int, n_values: int) -> np.ndarray:
        if self.dtype is not None:
            return np.zeros((cells, n_values), dtype=self.dtype)
        return np.zeros((cells, kv_row_bytes(self.type_name, n_values)), dtype=np.uint8)

    def encode(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.dtype is not None else quantize_rows(np.ascontiguousarray(rows, np.float32), self.type_id)

    def decode(self, stored: np.ndarray, n_values: int) -> np.ndarray:
        if self.dtype is not None:
            return stored.astype(np.float32, copy=False)
        return dequantize_rows(stored, self.type_id, n_values)


class KVCache:
    """K and V of every layer for one sequence; `n_past` positions have been evaluated."""

    def __init__(self, hp: HyperParams, run_config: RunConfig):
        self.n_ctx = run_config.context_length(hp.n_ctx_train)
        self.n_ubatch = run_config.n_ubatch
        self.k_codec, self.v_codec = RowCodec(run_config.type_k), RowCodec(run_config.type_v)
        self.n_k = [hp.n_embd_k_gqa(il) for il in range(hp.n_layer)]
        self.n_v = [hp.n_embd_v_gqa(il) for il in range(hp.n_layer)]
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray | None] = []
        self.cell_pos: list[np.ndarray] = []    # position held by each cell, -1 when empty
        self.ring: list[bool] = []
        self.kinds = [hp.attention_kind(il) for il in range(hp.n_layer)]
        self.window = hp.attention_window
        for il in range(hp.n_layer):
            cells = kv_cells(hp, il, run_config)
            self.k.append(self.k_codec.empty(cells, self.n_k[il]))
            n_v = self.n_v[il]
            self.v.append(self.v_codec.empty(cells, n_v) if n_v else None)   # MLA: V is part of K
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
        self.k[il][cells] = self.k_codec.encode(k.reshape(len(positions), -1))
        if v is not None:
            self.v[il][cells] = self.v_codec.encode(v.reshape(len(positions), -1))
        self.cell_pos[il][cells] = positions
        self.n_filled[il] = max(self.n_filled[il], int(cells.max()) + 1)

    def view(self, il: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(keys, values, positions) of the cells in use, keys and values as float32."""
        n = self.n_filled[il]
        keys = self.k_codec.decode(self.k[il][:n], self.n_k[il])
        values = None if self.v[il] is None else self.v_codec.decode(self.v[il][:n], self.n_v[il])
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
