"""The recurrent state of hybrid models (Qwen3.5, Qwen3-Next): per sequence and recurrent layer,
the conv state and the delta-rule state in F32, next to the KV cache of the attention layers.

The sizes come from `engine.plan.memory.recurrent_layer_bytes`, the planner's own rule, which is
llama.cpp's (`llama_memory_recurrent`: n_embd_r + n_embd_s floats per sequence and layer), so the
estimate and the allocation cannot drift apart.

A recurrent state cannot be rewound the way a KV cache is (it has folded every token in), so
the hybrid cache keeps checkpoints: copies of the state together with the position they belong
to. Rewinding restores the newest checkpoint at or before the wanted position (the KV cache of
the attention layers is simply cut there), which is what lets a chat follow-up or a regenerate
evaluate only the tokens after the last turn boundary instead of the whole conversation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.arch.base import HyperParams
from engine.plan.memory import recurrent_layer_bytes, recurrent_sequences
from engine.run.kv_cache import KVCache
from engine.run_config import RunConfig

MAX_CHECKPOINTS = 4     # each one is a full copy of the recurrent state


class RecurrentState:
    """Conv and delta-rule states of every recurrent layer: `conv[il]` (rows, n_embd_r) and
    `ssm[il]` (rows, n_embd_s) float32, one row per sequence; None on attention layers."""

    def __init__(self, hp: HyperParams, run_config: RunConfig):
        rows = recurrent_sequences(run_config)
        self.conv: list[np.ndarray | None] = []
        self.ssm: list[np.ndarray | None] = []
        for il in range(hp.n_layer):
            conv_bytes, ssm_bytes = recurrent_layer_bytes(hp, il, run_config)
            recurrent = hp.is_recurrent(il)
            self.conv.append(np.zeros((rows, conv_bytes // 4 // rows), np.float32) if recurrent else None)
            self.ssm.append(np.zeros((rows, ssm_bytes // 4 // rows), np.float32) if recurrent else None)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.conv + self.ssm if a is not None)

    def copy_arrays(self) -> tuple[list, list]:
        return ([None if a is None else a.copy() for a in self.conv],
                [None if a is None else a.copy() for a in self.ssm])

    def load_arrays(self, conv: list, ssm: list) -> None:
        for mine, saved in zip(self.conv + self.ssm, conv + ssm):
            if mine is not None:
                mine[...] = saved

    def clear(self) -> None:
        for a in self.conv + self.ssm:
            if a is not None:
                a.fill(0.0)


@dataclass(frozen=True)
class Checkpoint:
    n_past: int
    conv: list
    ssm: list


class HybridCache(KVCache):
    """A KV cache for the attention layers plus the recurrent state of the others, with
    checkpoints at turn boundaries."""

    def __init__(self, hp: HyperParams, run_config: RunConfig, homes=None):
        """`homes[il]`: the backend of layer il's home device, which holds its KV storage; the
        recurrent state stays in host memory, where the DeltaNet recurrence runs."""
        super().__init__(hp, run_config, homes)
        self.recurrent = RecurrentState(hp, run_config)
        self.checkpoints: list[Checkpoint] = []

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.recurrent.nbytes

    def check_positions(self, positions: np.ndarray) -> None:
        super().check_positions(positions)
        expected = np.arange(self.n_past, self.n_past + len(positions))
        if not np.array_equal(positions, expected):
            raise ValueError(f"a recurrent state only continues its sequence: positions must run from "
                             f"{self.n_past} on, one by one")

    def checkpoint(self) -> None:
        """Remember the state at the current position (a turn boundary)."""
        self.checkpoints = [c for c in self.checkpoints if c.n_past != self.n_past]
        self.checkpoints.append(Checkpoint(self.n_past, *self.recurrent.copy_arrays()))
        self.checkpoints.sort(key=lambda c: c.n_past)
        del self.checkpoints[:-MAX_CHECKPOINTS]

    def truncate(self, n_past: int) -> None:
        """Rewind to the newest checkpoint at or before n_past (or to the start when none is);
        `n_past` afterwards says where evaluation must resume."""
        if n_past >= self.n_past:
            return
        usable = [c for c in self.checkpoints if c.n_past <= n_past]
        if not usable:
            self.reset()
            return
        restored = usable[-1]
        self.recurrent.load_arrays(restored.conv, restored.ssm)
        super().truncate(restored.n_past)
        self.checkpoints = usable

    def reset(self) -> None:
        super().truncate(0)
        self.n_filled = [0] * len(self.n_filled)
        self.recurrent.clear()
        self.checkpoints = []
