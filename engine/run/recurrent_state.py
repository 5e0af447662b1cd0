"""The recurrent state of hybrid models (Qwen3.5, Qwen3-Next): per sequence and recurrent layer,
the conv state and the delta-rule state in F32, next to the KV cache of the attention layers, on
the layer's home device like that cache (the mixer runs there, next to its state).

The sizes come from `engine.plan.memory.recurrent_layer_bytes`, the planner's own rule, which is
llama.cpp's (`llama_memory_recurrent`: n_embd_r + n_embd_s floats per sequence and layer), so the
estimate and the allocation cannot drift apart.

A recurrent state cannot be rewound the way a KV cache is (it has folded every token in), so
the hybrid cache keeps checkpoints: copies of the state (each on its layer's device) together
with the position they belong to. Rewinding restores the newest checkpoint at or before the
wanted position (the KV cache of the attention layers is simply cut there), which is what lets a
chat follow-up or a regenerate evaluate only the tokens after the last turn boundary instead of
the whole conversation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.arch.base import HyperParams
from engine.arch.delta_net import HostMemory, RecurrentLayer
from engine.plan.memory import RECURRENT_CHECKPOINTS, recurrent_layer_bytes, recurrent_sequences
from engine.run.kv_cache import KVCache
from engine.run_config import RunConfig

MAX_CHECKPOINTS = RECURRENT_CHECKPOINTS    # each one is a full copy of the recurrent state (in the estimate)


class RecurrentState:
    """Conv and delta-rule states of every recurrent layer (`layers[il]`, None on attention
    layers), each in the memory of the layer's home device: the backend's own
    (`new_recurrent_layer`, a `DeltaNetBackend`), else host memory, where the host mixer runs."""

    def __init__(self, hp: HyperParams, run_config: RunConfig, homes=None):
        rows = recurrent_sequences(run_config)
        self.layers: list[RecurrentLayer | None] = []
        for il in range(hp.n_layer):
            conv_bytes, ssm_bytes = recurrent_layer_bytes(hp, il, run_config)
            if not hp.is_recurrent(il):
                self.layers.append(None)
                continue
            allocate = getattr(homes[il], "new_recurrent_layer", None) if homes else None
            sizes = (rows, conv_bytes // 4 // rows, ssm_bytes // 4 // rows)
            self.layers.append(allocate(*sizes) if allocate else RecurrentLayer(HostMemory(), *sizes))

    @property
    def conv(self) -> list:
        """Each layer's conv state (rows, n_embd_r) as its device holds it; None on attention layers."""
        return [None if layer is None else layer.conv for layer in self.layers]

    @property
    def ssm(self) -> list:
        return [None if layer is None else layer.ssm for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers if layer is not None)

    def snapshot(self) -> list:
        return [None if layer is None else layer.snapshot() for layer in self.layers]

    def restore(self, saved: list) -> None:
        for layer, copy in zip(self.layers, saved):
            if layer is not None:
                layer.restore(copy)

    def clear(self) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.clear()


@dataclass(frozen=True)
class Checkpoint:
    n_past: int
    states: list        # per layer a snapshot on the layer's device (RecurrentLayer.snapshot)


class HybridCache(KVCache):
    """A KV cache for the attention layers plus the recurrent state of the others, with
    checkpoints at turn boundaries."""

    def __init__(self, hp: HyperParams, run_config: RunConfig, homes=None):
        """`homes[il]`: the backend of layer il's home device, which holds its KV storage or its
        recurrent state."""
        super().__init__(hp, run_config, homes)
        self.recurrent = RecurrentState(hp, run_config, homes)
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
        self.checkpoints.append(Checkpoint(self.n_past, self.recurrent.snapshot()))
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
        self.recurrent.restore(restored.states)
        super().truncate(restored.n_past)
        self.checkpoints = usable

    def reset(self) -> None:
        super().truncate(0)
        self.n_filled = [0] * len(self.n_filled)
        self.recurrent.clear()
        self.checkpoints = []
