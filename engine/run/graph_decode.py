"""One-token evaluation with each device range of layers run as one step of kernels only.

Decoding one token, Python's overhead dominates: on a GPU every norm, rope and add of the
family's array math is a launch, and an activation crosses the host API each time; on the CPU
the ops' checks and allocations cost a quarter of a small model's token. Where the placement
allows, each device range (consecutive layers with the same home device) runs instead as one
step built from the family's decode plan (engine.arch.decode_plan):
- a CUDA range as `engine.backends.cuda_decode.RangeDecode`, launches only, captured once by
  `CapturedDecode` and replayed token after token with the token id, position and cache cells
  refilled; a new capture when a layer's padded attended length changes (every
  GRAPH_CELL_PADDING tokens) or when a new cache is used. The embedding row and the output head
  join the graph of the first / last range when their weights live on its device.
- a CPU range as `engine.backends.cpu_decode.CpuRangeDecode`, the family's kernels called
  directly with everything bound once, bit-identical with the family's forward pass.
Ranges that cannot (a tensor of theirs elsewhere, a KV cache type or a family the step has no
kernels for) run the family's `forward_layer` as always, and a CUDA range's reason is logged
once; the activation moves between ranges as it does between layers.

RunConfig(cuda_graphs=False) (--no-cuda-graphs) or llama.cpp's GGML_CUDA_DISABLE_GRAPHS=1 in the
environment turns the CUDA graphs off, for the command line and the app alike.
"""
from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass

import numpy as np

from engine.backends.cuda import GRAPH_CELL_PADDING, CapturedDecode, CudaBackend, graph_blocker, padded_cells
from engine.backends.cpu_decode import CpuRangeDecode, lean_blocker
from engine.backends.cuda_decode import RangeDecode, decode_blocker

log = logging.getLogger(__name__)
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphs_turned_off(run_config) -> str | None:
    """Why no CUDA graph is captured at all, or None. The environment switch is read here, at
    the step, so that it holds wherever the run was configured (a saved plan, the app)."""
    if os.environ.get("GGML_CUDA_DISABLE_GRAPHS", "") not in ("", "0"):
        return "CUDA graphs are turned off (GGML_CUDA_DISABLE_GRAPHS)"
    if not run_config.cuda_graphs:
        return "CUDA graphs are turned off (--no-cuda-graphs)"
    return None


@dataclass
class DeviceRange:
    device: str
    layers: range
    step: CapturedDecode | None = None      # None: the family's forward_layer, layer by layer
    reason: str | None = None               # why a CUDA range is not a graph
    embeds: bool = False
    head: bool = False
    lean: CpuRangeDecode | None = None      # a CPU range's step of kernels only


def graph_decode(model, tokens: np.ndarray, positions: np.ndarray, cache, check_cancelled=None) -> np.ndarray | None:
    """Logits (1, n_vocab) of one token, the ranges that can running as CUDA graphs; None where
    none can (the caller evaluates it as usual)."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = GraphDecode(model)
    return decoder(tokens, positions, cache, check_cancelled)


class GraphDecode:
    """The device ranges of one model and their captured steps, bound to one cache at a time."""

    padding = GRAPH_CELL_PADDING

    def __init__(self, model):
        self._model = weakref.ref(model)        # the decoders' table must not keep a model alive
        self.ranges: list[DeviceRange] = []
        self._cache = None

    @property
    def model(self):
        return self._model()

    @property
    def graphed(self) -> bool:
        return any(r.step is not None for r in self.ranges)

    @property
    def has_steps(self) -> bool:
        """Whether some range runs as a step (a CUDA graph or the CPU's lean step)."""
        return any(r.step is not None or r.lean is not None for r in self.ranges)

    def bind(self, cache) -> None:
        """Ranges for `cache` (a graph holds its buffers): CUDA ranges become graphs where they can."""
        m = self.model
        self._cache = weakref.ref(cache)
        plan = m.family.decode_plan(m) if hasattr(m.family, "decode_plan") else None
        tensor_devices = m.placement.tensor_devices() if m.placement is not None else {}
        self.ranges = []
        start = 0
        for il in range(1, m.hparams.n_layer + 1):
            if il == m.hparams.n_layer or m.homes[il] != m.homes[start]:
                self.ranges.append(self._device_range(m.homes[start], range(start, il), plan, tensor_devices, cache))
                start = il
        for r in self.ranges:
            if r.reason is not None:
                log.info("layers %d-%d on %s decode without a CUDA graph: %s", r.layers.start, r.layers.stop - 1,
                         r.device, r.reason)

    def _device_range(self, device: str, layers: range, plan, tensor_devices, cache) -> DeviceRange:
        m = self.model
        backend = m.ops.backends[device]
        if not isinstance(backend, CudaBackend):
            if lean_blocker(backend, plan) is None and graph_blocker(tensor_devices, device, layers) is None:
                return DeviceRange(device, layers, lean=CpuRangeDecode(backend, m, plan, layers, device, cache))
            return DeviceRange(device, layers)
        reason = graphs_turned_off(m.run_config)
        reason = reason or decode_blocker(plan, m.hparams, layers, cache.layers)
        reason = reason or graph_blocker(tensor_devices, device, layers)
        if reason is not None:
            return DeviceRange(device, layers, reason=reason)
        embedding = m.globals["token_embd.weight"]
        embeds = layers.start == 0 and embedding.device == device
        head = layers.stop == m.hparams.n_layer and m.output_home == device and m.output_weight.device == device
        vectors = {name: m.globals[name] for name in {b.rope.freq_factors for b in plan.blocks} if name in m.globals}
        step = RangeDecode(backend, m.hparams, plan, layers, m.layers, cache.layers, vectors,
                           embedding if embeds else None,
                           (m.globals["output_norm.weight"], m.output_weight) if head else None)
        captured = CapturedDecode(backend.runtime, step, None, f"decode of layers {layers.start}-{layers.stop - 1}")
        return DeviceRange(device, layers, captured, embeds=embeds, head=head)

    # --- one token ----------------------------------------------------------------------------------

    def __call__(self, tokens, positions, cache, check_cancelled=None) -> np.ndarray | None:
        if self._cache is None or self._cache() is not cache:
            self.bind(cache)
        if not self.has_steps:
            return None
        from engine.run.model import UBatch, check_finite

        m = self.model
        batch = UBatch(m.hparams, positions, cache, m.ops)
        x = None
        if not self.ranges[0].embeds:
            m.ops.enter(m.homes[0])
            embed = getattr(m.family, "embed", None)
            x = embed(m, tokens) if embed else m.embed_tokens(tokens)
        for r in self.ranges:
            if check_cancelled is not None:
                check_cancelled()
            if r.step is not None:
                x = self._replayed(r, x, tokens, positions, cache)
            elif r.lean is not None:
                x = self._lean(r, x, batch)
            else:
                x = self._layers(r, x, batch, check_cancelled)
            m.file.check_unchanged()
            check_finite(m.ops, x, f"layers {r.layers.start}-{r.layers.stop - 1}", m.kv_hint)
        cache.n_past = max(cache.n_past, int(positions.max()) + 1)
        if self.ranges[-1].head:
            return m.ops.to_host(x)
        x = m._enter(x, m.output_home)
        output = getattr(m.family, "output", None)
        logits = m.ops.to_host(output(m, x) if output else m.output_logits(x))
        check_finite(m.ops, logits, "the output layer", m.kv_hint)
        return logits

    def _layers(self, r: DeviceRange, x, batch, check_cancelled):
        """The family's own forward pass over the range, as the model runs it."""
        m = self.model
        for il in r.layers:
            if check_cancelled is not None and il != r.layers.start:
                check_cancelled()
            x = m._enter(x, m.homes[il])
            x = m.family.forward_layer(m, il, x, batch)
        return x

    def _lean(self, r: DeviceRange, x, batch):
        """The CPU range's lean step; where it ends non-finite, the range again layer by layer to
        name the first layer that went wrong (a step rewrites its cache cells with the same values)."""
        from engine.run.model import check_finite

        m = self.model
        x = m._enter(x, r.device)
        y = r.lean(x, batch)
        if not (np.isfinite(y.max()) and np.isfinite(y.min())):
            for il in r.layers:
                x = m.family.forward_layer(m, il, x, batch)
                check_finite(m.ops, x, f"layer {il}", m.kv_hint)
        return y

    def _replayed(self, r: DeviceRange, x, tokens, positions, cache):
        """The range's graph replayed (captured first where its key is new) on this token."""
        m = self.model
        backend = m.ops.backends[r.device]
        steps = [cache.step(il, positions) for il in r.layers]
        inputs = {"pos": positions.astype(np.int64), "cells": np.array([s.cells[0] for s in steps], np.int64)}
        if r.embeds:
            inputs["ids"] = tokens.astype(np.int64)
        else:
            x = m._enter(x, r.device)
            inputs["x"] = backend.memory.to_runtime(backend.namespace.reshape(x, (1, m.hparams.n_embd)))
        key = tuple(padded_cells(s.n_filled, cache.layers[il].layout.n_cells, self.padding)
                    for il, s in zip(r.layers, steps))
        out, routed = r.step(key, inputs)
        # the family's array math (the head, a non-finite check) runs on the device's default
        # stream, not the runtime's: the replay must be done before anything reads its output
        backend.runtime.synchronize()
        if routed is not None:
            moe_layers = r.step.step.moe_layers
            for il, ids in zip(moe_layers, backend.runtime.download(routed)):
                m.expert_counts[il] += np.bincount(ids, minlength=m.hparams.n_expert)
        m.ops.enter(r.device)
        return backend.memory.from_runtime(out)
