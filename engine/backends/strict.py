"""The simulated GPU (`--sim-gpus`): a device whose arrays are not NumPy arrays.

Its weights and activations are `array_api_strict` arrays on a non-CPU device of that library,
which refuses every implicit conversion to NumPy (`np.asarray` raises) and every op that mixes
arrays of two devices. A forward pass that slips a host-only call onto device data therefore
fails here the way it would fail on CuPy, on a machine without a GPU.

Its "kernels" are the CPU backend's: inside this module, and only here, an array is unwrapped
explicitly (`_memory`) the way a CUDA kernel reads device memory, and the result wrapped again.
The same NumPy arithmetic runs underneath, so results are bit-identical to the CPU backend.
"""
from __future__ import annotations

from typing import Sequence

import array_api_strict
import numpy as np
from array_api_strict._array_object import Array as StrictArray

from engine.backends import Weight
from engine.arch.kv_rotation import is_quantized
from engine.backends.cpu import GLU_KINDS, CpuBackend, q8_0_rounded
from engine.backends.kv_store import HostKVLayer, attend_cached
from engine.backends.protocol import AttentionStep, KVLayout

# array_api_strict's devices other than its CPU (two with float64, as a GPU has): simulated
# GPUs take them in turn, so neighbouring GPUs never share one
STRICT_DEVICES = (array_api_strict.Device("device1"), array_api_strict.Device("device2"))


class DeviceMismatchError(RuntimeError):
    pass


class StrictSimBackend:
    """A GPU simulated on the host with strict device arrays."""

    def __init__(self, name: str, activations: str = "f32", index: int = 0):
        self.name = name
        self.device = STRICT_DEVICES[index % len(STRICT_DEVICES)]
        self.kernels = CpuBackend(activations)
        self.allocated_bytes = 0

    @property
    def namespace(self):
        return array_api_strict

    # --- device memory (explicit, inside the backend only) ----------------------------------------

    def _memory(self, x) -> np.ndarray:
        """The NumPy memory behind a device array of this device, as a kernel reads it."""
        if not isinstance(x, StrictArray):
            raise DeviceMismatchError(f"{self.name} was given a {type(x).__name__}, not one of its own arrays")
        if x.device != self.device:
            raise DeviceMismatchError(f"an array on {x.device} was used on {self.name}")
        return x._array

    def _wrap(self, x: np.ndarray):
        return array_api_strict.asarray(x, device=self.device)

    def _weight(self, w: Weight) -> Weight:
        if w.device != self.name:
            raise DeviceMismatchError(f"{w.name} lives on {w.device} but was used on {self.name}")
        return Weight(w.name, self._memory(w.data), w.ggml_type, w.shape, w.device)

    # --- memory and transfers -------------------------------------------------------------------

    def upload(self, w: Weight, experts: Sequence[int] | None = None) -> Weight:
        host = np.array(w.data if experts is None else w.data[list(experts)], copy=True)
        host.setflags(write=False)
        self.allocated_bytes += host.nbytes
        shape = w.shape if experts is None else (len(experts), *w.shape[1:])
        return Weight(w.name, self._wrap(host), w.ggml_type, shape, self.name)

    def upload_vector(self, values: np.ndarray):
        return self._wrap(np.array(values, dtype=np.float32, copy=True))

    def to_device(self, x: np.ndarray):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"to_device takes a host NumPy array, not a {type(x).__name__}")
        return self._wrap(np.array(x, copy=True))

    def to_host(self, x) -> np.ndarray:
        return np.array(self._memory(x), copy=True)

    # --- ops that read weights ------------------------------------------------------------------

    def matmul(self, x, w: Weight):
        return self._wrap(self.kernels.matmul(self._memory(x), self._weight(w)))

    def expert_matmul(self, x, w: Weight, expert: int, rows: slice | None = None):
        return self._wrap(self.kernels.expert_matmul(self._memory(x), self._weight(w), expert, rows))

    def head_matmul(self, x, w: Weight):
        return self._wrap(self.kernels.head_matmul(self._memory(x), self._weight(w)))

    def embedding(self, w: Weight, ids: np.ndarray):
        return self._wrap(self.kernels.embedding(self._weight(w), ids))

    def dequantize(self, w: Weight):
        return self._wrap(self.kernels.dequantize(self._weight(w)))

    # --- the small ops of a layer: the CPU's kernels on this device's memory ----------------------

    def rms_norm(self, x, w, eps: float):
        return self._wrap(self.kernels.rms_norm(self._memory(x), None if w is None else self._memory(w), eps))

    def add_rms_norm(self, residual, y, w, eps: float):
        return self._wrap(self.kernels.add_rms_norm(self._memory(residual), self._memory(y), self._memory(w), eps))

    def glu(self, gate, up, activation):
        if activation not in GLU_KINDS:
            return activation(gate, up)
        return self._wrap(self.kernels.glu(self._memory(gate), self._memory(up), activation))

    def rope_qk(self, q, k, cos, sin, neox: bool, q_scale: float = 1.0):
        q, k = self.kernels.rope_qk(self._memory(q), self._memory(k), self._memory(cos), self._memory(sin), neox,
                                    q_scale)
        return self._wrap(q), self._wrap(k)

    # --- the KV cache: host-layout storage that only this device reads ---------------------------

    @staticmethod
    def new_kv_layer(layout: KVLayout) -> HostKVLayer:
        return HostKVLayer(layout)

    def attend(self, kv: HostKVLayer, step: AttentionStep, positions, q, k, v, kq_scale: float,
               v_from_k: int = 0):
        if self.kernels.round_inputs and is_quantized(kv.layout.type_k):
            # as on the CPU: llama.cpp dots a quantized key with the query in Q8_0 blocks
            q = self._wrap(q8_0_rounded(np.ascontiguousarray(self._memory(q), dtype=np.float32)))
        host_positions = self._memory(positions)
        kv.store(step.cells, host_positions, self._memory(k), None if v is None else self._memory(v))
        if kv.attends_by_rows(q.shape[0]):
            return self._wrap(kv.attend_rows(step, host_positions, self._memory(q), k.shape[1], kq_scale))
        keys, values, key_pos = kv.view(step.n_filled)
        keys, key_pos = self._wrap(np.array(keys, copy=True)), self._wrap(np.array(key_pos, copy=True))
        values = None if values is None else self._wrap(np.array(values, copy=True))
        return attend_cached(keys, values, key_pos, positions, step, q, k.shape[1], kq_scale, v_from_k)

    def set_threads(self, n_threads: int) -> None:
        self.kernels.set_threads(n_threads)
