"""The CUDA backend: the Backend protocol (engine.backends.protocol) over a device runtime.

Weights are uploaded in their GGUF encoding and read by the kernels of `kernels.cuda`; each layer's
KV cache lives in device memory in its cache type and is read inside the attention kernel. Two
runtimes carry it (kernels.cuda.runtime):

- `CupyRuntime` on a real GPU: activations are CuPy arrays (namespace array_api_compat.cupy), so
  the family code's norms, rope and softmax run on the GPU as CuPy array math;
- `EmulatedRuntime` (`--emulate-cuda`): the same `.cu` files compiled for the CPU. Activations
  are array_api_strict arrays on a non-CPU device, exactly like the strict simulated GPU, and each
  op copies them into emulated device memory, launches, and copies the result back. Slow; it is
  for checking that a plan runs and gives the right numbers on a machine without a GPU.

Decode (up to 8 tokens) uses the fused matvec kernels: q8_1-rounded activations and integer dot
products with `activations="llama.cpp"` (llama.cpp's CUDA path), exact float32 activations with
"f32". Prefill decodes weight tiles to float32 on the device and multiplies them with cuBLAS.

`CapturedDecode` runs a decode step of a layer range that lives on one device as a CUDA graph:
captured once, replayed on later tokens with the token's id, position and cache cell copied into
device buffers its kernels read (llama.cpp's way), captured anew when a shape baked into the
launches changes; direct launches, with the reason in a debug log, where the placement or the
step needs the host in the middle. The model's one-token steps are such steps wherever a device
holds a range of layers whole (engine.run.graph_decode, over engine.backends.cuda_decode).
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from engine.arch.base import AttentionKind
from engine.backends import Weight
from engine.backends.protocol import AttentionStep, KVLayout
from kernels.cuda import ops

MASK_KIND = {AttentionKind.FULL: "full", AttentionKind.SLIDING: "sliding", AttentionKind.CHUNKED: "chunked"}
LAYER_NAME = re.compile(r"blk\.(\d+)\.")
GRAPH_CELL_PADDING = 256        # the attended cache length is padded to this, as llama.cpp pads its KV view
log = logging.getLogger(__name__)


class CudaUnavailableError(RuntimeError):
    pass


class EmulatedMemory:
    """Activations of an emulated GPU: array_api_strict arrays on one of that library's devices."""

    def __init__(self, runtime, index: int):
        import array_api_strict

        from engine.backends.strict import STRICT_DEVICES

        self.xp = array_api_strict
        self.runtime = runtime
        self.device = STRICT_DEVICES[index % len(STRICT_DEVICES)]

    def host_of(self, x) -> np.ndarray:
        from engine.backends.strict import DeviceMismatchError

        from array_api_strict._array_object import Array as StrictArray

        if not isinstance(x, StrictArray):
            raise DeviceMismatchError(f"{self.runtime.device_name} was given a {type(x).__name__}, not one of its arrays")
        if x.device != self.device:
            raise DeviceMismatchError(f"an array on {x.device} was used on {self.runtime.device_name}")
        return x._array

    def to_runtime(self, x):
        """A device array of the runtime holding x (a C-contiguous copy in emulated memory)."""
        return self.runtime.upload(np.ascontiguousarray(self.host_of(x)))

    def from_runtime(self, a):
        return self.xp.asarray(self.runtime.download(a), device=self.device)

    def from_host(self, x: np.ndarray):
        return self.xp.asarray(np.array(x, copy=True), device=self.device)

    def to_host(self, x) -> np.ndarray:
        return np.array(self.host_of(x), copy=True)


class CupyMemory:
    """Activations of a real GPU: CuPy arrays on the runtime's device."""

    def __init__(self, runtime):
        import array_api_compat.cupy

        self.xp = array_api_compat.cupy
        self.runtime = runtime
        self.cp = runtime.cp

    def to_runtime(self, x):
        if x.device.id != self.runtime.device.id:
            raise ValueError(f"an array on GPU {x.device.id} was used on {self.runtime.device_name}")
        with self.runtime.device:
            return self.cp.ascontiguousarray(x)

    @staticmethod
    def from_runtime(a):
        return a

    def from_host(self, x: np.ndarray):
        return self.runtime.upload(x)

    def to_host(self, x) -> np.ndarray:
        return self.runtime.download(self.to_runtime(x))


class CudaKVLayer:
    """One layer's K (n_cells, row_bytes) and V rows in their cache types, and each cell's position."""

    def __init__(self, runtime, layout: KVLayout):
        self.layout = layout
        self.runtime = runtime
        self.k = runtime.zeros((layout.n_cells, ops.cache_row_bytes(layout.type_k, layout.n_k)), np.uint8)
        self.v = (runtime.zeros((layout.n_cells, ops.cache_row_bytes(layout.type_v, layout.n_v)), np.uint8)
                  if layout.n_v else None)                       # MLA: V is the start of each key
        self.cell_pos = runtime.upload(np.full(layout.n_cells, -1, np.int64))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + (0 if self.v is None else self.v.nbytes)

    def forget(self, n_past: int) -> None:
        ops.forget_cells(self.runtime, self.cell_pos, n_past)

    def store(self, cache, cells, rows_host_or_device, type_name: str) -> None:
        if type_name in ops.STORED_ON_DEVICE:
            ops.store_rows(self.runtime, rows_host_or_device, cache, cells, type_name)
        else:       # q4_0, q5_1, iq4_nl, ...: ggml's quantizer on the host, the bytes copied over
            from kernels.cpu import quantize_rows

            rows = self.runtime.download(rows_host_or_device)
            encoded = quantize_rows(rows, ops.FORMATS[type_name.upper()].ggml_type)
            ops.scatter_rows(self.runtime, self.runtime.upload(encoded), cache, cells)


class CudaBackend:
    """One CUDA device (real or emulated) implementing engine.backends.protocol.Backend."""

    def __init__(self, name: str, runtime, activations: str = "f32", index: int = 0):
        self.name = name
        self.runtime = runtime
        self.round_inputs = activations == "llama.cpp"
        self.memory = CupyMemory(runtime) if runtime.name == "cupy" else EmulatedMemory(runtime, index)
        self.allocated_bytes = 0

    @property
    def namespace(self):
        return self.memory.xp

    # --- memory and transfers -------------------------------------------------------------------

    def upload(self, w: Weight, experts: Sequence[int] | None = None) -> Weight:
        host = w.data if experts is None else w.data[list(experts)]
        data = self.runtime.upload(np.ascontiguousarray(host))
        self.allocated_bytes += data.nbytes
        shape = w.shape if experts is None else (len(experts), *w.shape[1:])
        return Weight(w.name, data, w.ggml_type, shape, self.name)

    def upload_vector(self, values: np.ndarray):
        return self.memory.from_host(np.ascontiguousarray(values, dtype=np.float32))

    def to_device(self, x: np.ndarray):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"to_device takes a host NumPy array, not a {type(x).__name__}")
        return self.memory.from_host(x)

    def to_host(self, x) -> np.ndarray:
        return self.memory.to_host(x)

    # --- ops that read weights ------------------------------------------------------------------

    def _check(self, w: Weight) -> None:
        if w.device != self.name:
            from engine.backends.strict import DeviceMismatchError

            raise DeviceMismatchError(f"{w.name} lives on {w.device} but was used on {self.name}")

    def _matmul_rows(self, x2d, data, w: Weight):
        """x2d (n_tokens, n_cols) runtime array @ data (n_rows, row_bytes).T -> runtime array."""
        type_name = w.type_name
        if x2d.shape[0] <= ops.MAX_DECODE_TOKENS:
            return ops.matvec(self.runtime, x2d, data, type_name, w.n_cols, exact=not self.round_inputs)
        return ops.matmul_prefill(self.runtime, x2d, data, type_name, w.n_cols)

    def matmul(self, x, w: Weight):
        self._check(w)
        lead = tuple(x.shape[:-1])
        x2d = self.memory.to_runtime(self.namespace.reshape(x, (-1, w.n_cols)))
        y = self.memory.from_runtime(self._matmul_rows(x2d, w.data, w))
        return self.namespace.reshape(y, (*lead, w.n_rows))

    def expert_matmul(self, x, w: Weight, expert: int, rows: slice | None = None):
        self._check(w)
        data = w.data[expert] if rows is None else w.data[expert][rows]
        return self.memory.from_runtime(self._matmul_rows(self.memory.to_runtime(x), data, w))

    def head_matmul(self, x, w: Weight):
        """x (n_tokens, n_head, n_cols) through W (n_head, n_rows, n_cols): one matmul per head."""
        self._check(w)
        xp = self.namespace
        heads = [self.memory.from_runtime(self._matmul_rows(self.memory.to_runtime(x[:, h, :]), w.data[h], w))
                 for h in range(w.shape[0])]
        return xp.stack(heads, axis=1)

    def embedding(self, w: Weight, ids: np.ndarray):
        self._check(w)
        ids = self.runtime.upload(np.ascontiguousarray(ids, dtype=np.int64))
        return self.memory.from_runtime(ops.get_rows(self.runtime, w.data, ids, w.type_name, w.n_cols))

    def dequantize(self, w: Weight):
        """The whole tensor as float32 (small tensors only: norms, biases)."""
        self._check(w)
        rows = w.data.reshape(-1, w.data.shape[-1])
        out = ops.dequantize_rows(self.runtime, rows, w.type_name, w.n_cols)
        return self.namespace.reshape(self.memory.from_runtime(out), w.shape)

    # --- the KV cache and attention ---------------------------------------------------------------

    def new_kv_layer(self, layout: KVLayout) -> CudaKVLayer:
        return CudaKVLayer(self.runtime, layout)

    def attend(self, kv: CudaKVLayer, step: AttentionStep, positions, q, k, v, kq_scale: float, v_from_k: int = 0):
        rt, xp = self.runtime, self.namespace
        n_tokens = q.shape[0]
        if self.round_inputs and kv.layout.type_k not in ("f32", "f16", "bf16"):
            q = q8_1_rounded(xp, q)      # llama.cpp's CUDA attention dots a quantized key with a q8_1 query
        cells = rt.upload(np.ascontiguousarray(step.cells, dtype=np.int64))
        kv.store(kv.k, cells, self.memory.to_runtime(xp.reshape(k, (n_tokens, -1))), kv.layout.type_k)
        if v is not None:
            kv.store(kv.v, cells, self.memory.to_runtime(xp.reshape(v, (n_tokens, -1))), kv.layout.type_v)
        q_pos = self.memory.to_runtime(positions)
        ops.store_positions(rt, kv.cell_pos, cells, q_pos)
        out = ops.attention(rt, self.memory.to_runtime(q), kv.k, kv.v, kv.cell_pos, q_pos, step.n_filled,
                            k.shape[1], kv.layout.type_k, kv.layout.type_v, kq_scale, MASK_KIND[step.kind],
                            step.window, v_from_k if v is None else 0)
        return self.memory.from_runtime(out)

    # --- the Gated DeltaNet mixer next to its recurrent state (protocol.DeltaNetBackend) ----------

    def new_recurrent_layer(self, rows: int, conv_values: int, ssm_values: int):
        from engine.arch.delta_net import RecurrentLayer

        return RecurrentLayer(self.runtime, rows, conv_values, ssm_values)

    def delta_net(self, state, qkv, beta, g, z, conv_weight, norm_weight, heads):
        """engine.arch.delta_net.mixer with the kernels of delta_net.cu, sequence 0 of `state`."""
        rt, mem, d = self.runtime, self.memory, heads.head_dim
        n_tokens, channels = qkv.shape
        conv_state = state.conv[0].reshape(conv_weight.shape[1] - 1, channels)
        mixed = ops.causal_conv_silu(rt, mem.to_runtime(qkv), conv_state, mem.to_runtime(conv_weight))
        out = ops.gated_delta_rule(rt, mixed, mem.to_runtime(g), mem.to_runtime(beta), state.ssm[0], heads.n_k_heads,
                                   heads.n_v_heads, d, heads.grouped, heads.eps, 1.0 / d ** 0.5)     # (T, Hv, d)
        out = ops.gated_rms_norm(rt, out, mem.to_runtime(norm_weight), mem.to_runtime(z).reshape(out.shape), heads.eps)
        return self.namespace.reshape(mem.from_runtime(out), (n_tokens, heads.n_v_heads * d))

    def set_threads(self, n_threads: int) -> None:
        pass        # the device's own parallelism; -t is for the CPU

    # --- CUDA graphs ----------------------------------------------------------------------------

    def captured_decode(self, step: Callable, tensor_devices: Mapping[str, str | tuple[str, ...]], layers: range,
                        name: str = "decode step") -> CapturedDecode:
        """`step` (kernels on this device for `layers`) as a CUDA graph, or as direct launches where
        the placement (tensor_devices: name -> device or per-expert devices) puts part of those
        layers elsewhere."""
        return CapturedDecode(self.runtime, step, graph_blocker(tensor_devices, self.name, layers), name)


def graph_blocker(tensor_devices: Mapping[str, str | tuple[str, ...]], device: str, layers: range) -> str | None:
    """Why a decode step of `layers` on `device` cannot be one CUDA graph (a tensor of those layers,
    or some of its experts, on another device: the step would wait for the host in between), or
    None. tensor_devices is the placement's name -> device, or per-expert devices for split tensors."""
    for name, where in sorted(tensor_devices.items()):
        m = LAYER_NAME.match(name)
        if m is None or int(m.group(1)) not in layers:
            continue
        others = sorted(set(where if isinstance(where, tuple) else (where,)) - {device})
        if others:
            return f"{name} is on {', '.join(others)}: its layer's step needs the host between launches"
    return None


def padded_cells(n_filled: int, n_cells: int, padding: int = GRAPH_CELL_PADDING) -> int:
    """The cache length a captured attention launch covers: n_filled rounded up to `padding` (cells
    past the filled ones are masked by their position), at most the whole cache."""
    return min(n_cells, -(-n_filled // padding) * padding)


class CapturedDecode:
    """A decode step of kernels on one runtime, captured as a CUDA graph and replayed.

    step(key, inputs) launches kernels only and returns its output device arrays; `inputs` are
    device arrays of the names and shapes given on each call (token id, position, cache cell...),
    static while a graph lives, refilled before each replay from the host arrays or the runtime's
    device arrays (an activation already on the device) given. `key` holds what the
    launches bake in (the padded cache length, the batch shape); a new key captures anew and drops
    the old graph. With `blocker` set (graph_blocker's reason), or when capturing meets work that
    needs the host (CaptureError), every step runs as direct launches and the reason is logged."""

    def __init__(self, runtime, step: Callable, blocker: str | None = None, name: str = "decode step"):
        self.runtime, self.step, self.name = runtime, step, name
        self.blocker = None
        self.key = None
        self.graph = self.inputs = self.outputs = None
        self.captures = self.replays = self.direct_steps = 0
        if blocker is not None:
            self._fall_back(blocker)

    def __call__(self, key, inputs: Mapping[str, np.ndarray]):
        if self.blocker is None and (key != self.key or self.graph is None):
            self._capture(key, inputs)
        if self.blocker is not None:
            self.direct_steps += 1
            return self.step(key, {name: self._on_device(v) for name, v in inputs.items()})
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                value = np.ascontiguousarray(value, dtype=self.inputs[name].dtype)
            self.runtime.copy_into(self.inputs[name], value)
        self.runtime.replay(self.graph)
        self.replays += 1
        return self.outputs

    def _capture(self, key, inputs: Mapping[str, np.ndarray]) -> None:
        from kernels.cuda.runtime import CaptureError

        rt = self.runtime
        self.graph = None                    # the old graph's memory goes with it
        static = {name: self._on_device(v) for name, v in inputs.items()}
        # one direct run first, as llama.cpp evaluates a graph before capturing it: modules are
        # compiled and the memory pool grown outside the capture (a decode step run twice on the
        # same inputs writes the same cache cells again)
        self.step(key, static)
        rt.begin_capture()
        try:
            outputs = self.step(key, static)
        except CaptureError as e:
            rt.abort_capture()
            self._fall_back(str(e))
            return
        except BaseException:
            rt.abort_capture()
            raise
        self.graph, self.inputs, self.outputs, self.key = rt.end_capture(), static, outputs, key
        self.captures += 1
        log.debug("%s on %s captured as a CUDA graph for %r", self.name, rt.device_name, key)

    def _on_device(self, value):
        """A host input uploaded, or a copy of a device one (the step's own buffer while a graph lives)."""
        if isinstance(value, np.ndarray):
            return self.runtime.upload(np.ascontiguousarray(value))
        copy = self.runtime.alloc(value.shape, value.dtype)
        self.runtime.copy_into(copy, value)
        return copy

    def _fall_back(self, reason: str) -> None:
        self.blocker = reason
        log.debug("%s on %s runs as direct launches, not a CUDA graph: %s", self.name, self.runtime.device_name, reason)


def q8_1_rounded(xp, x):
    """x (..., d) rounded to q8_1 blocks of 32 (d = amax / 127, round half away from zero), in
    its own namespace on its own device; unchanged when d is not a multiple of 32."""
    if x.shape[-1] % 32:
        return x
    blocks = xp.reshape(x, (*x.shape[:-1], x.shape[-1] // 32, 32))
    scale = xp.max(xp.abs(blocks), axis=-1, keepdims=True) / 127.0
    scaled = blocks / xp.where(scale > 0, scale, xp.ones_like(scale))
    return xp.reshape(xp.sign(scaled) * xp.floor(xp.abs(scaled) + 0.5) * scale, x.shape)


def emulated_backend(name: str, activations: str = "f32", index: int = 0, debug: bool | None = None) -> CudaBackend:
    """A CUDA device emulated on the CPU (`--emulate-cuda`); debug buffers with OFFLOAD_STUDIO_EMU_DEBUG=1."""
    from kernels.cuda.runtime import EmulatedRuntime

    return CudaBackend(name, EmulatedRuntime(name, debug=debug), activations, index)


def physical_device(name: str, device_id: int) -> int:
    """The GPU a logical device runs on: its own index, unless OFFLOAD_STUDIO_CUDA_DEVICE_MAP maps
    it (`CUDA1=0` runs CUDA1 on GPU 0: the multi-GPU path tested on one physical GPU)."""
    import os

    for item in os.environ.get("OFFLOAD_STUDIO_CUDA_DEVICE_MAP", "").split(","):
        logical, _, physical = item.partition("=")
        if logical.strip() == name and physical.strip():
            return int(physical)
    return device_id


def gpu_backend(name: str, device_id: int, activations: str = "f32") -> CudaBackend:
    """A real GPU through CuPy; refused with a clear error when CuPy or the GPU is missing."""
    try:
        import cupy
    except ImportError as e:
        raise CudaUnavailableError("CuPy is not installed (pip install 'offload-studio[cuda13]', or [cuda12] for a "
                                   "CUDA 12 driver); or place everything on the CPU, or use --emulate-cuda") from e
    if not cupy.is_available():
        raise CudaUnavailableError(f"CuPy is installed but sees no usable CUDA device for {name}")
    from kernels.cuda.runtime import CupyRuntime

    physical = physical_device(name, device_id)
    if physical >= cupy.cuda.runtime.getDeviceCount():
        raise CudaUnavailableError(f"{name} is GPU {physical}, but CuPy sees {cupy.cuda.runtime.getDeviceCount()}")
    return CudaBackend(name, CupyRuntime(name, physical), activations)
