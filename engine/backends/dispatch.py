"""Placement-driven execution over several devices.

Each weight lives on the device the placement names, and each op that reads a weight runs on
that device. Each layer has a **home device** (`enter`): the device of its attention, which holds
its KV cache, its 1-D tensors and its rope tables. The activation lives on the home device; an op
whose weight lives elsewhere moves the activation there and its result back, and every move is
counted (`transfers`, `transfer_bytes`).

A routed-expert tensor whose experts are spread over devices is held as one part per device. A
MoE layer groups its selected experts by device: one move in and one out per device, and the
outputs are summed on the home device in a fixed expert order, so any placement gives the same
logits as all-CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.arch.layers import expert_feed_forward
from engine.backends import Weight
from engine.backends.cpu import CpuBackend
from engine.backends.protocol import layer_ops
from engine.backends.strict import DeviceMismatchError, StrictSimBackend

__all__ = ["DeviceMismatchError", "NoCudaBackendError", "SplitExpertWeight", "make_backends",
           "place_weight"]


class NoCudaBackendError(RuntimeError):
    pass


@dataclass(frozen=True, eq=False)
class SplitExpertWeight(Weight):
    """A routed-expert tensor whose experts live on several devices: one part per device."""

    expert_device: tuple[str, ...] = ()
    parts: dict = field(default_factory=dict)           # device -> Weight of its experts
    local_index: tuple[int, ...] = ()                   # expert -> its index inside its part


def place_weight(w: Weight, devices: str | tuple[str, ...], backends: dict) -> Weight:
    """`w` uploaded to its device, or for per-expert devices, each device's experts to it."""
    if isinstance(devices, str):
        return backends[devices].upload(w)
    parts, local_index = {}, [0] * len(devices)
    for device in dict.fromkeys(devices):
        experts = [e for e, d in enumerate(devices) if d == device]
        for i, e in enumerate(experts):
            local_index[e] = i
        parts[device] = backends[device].upload(w, experts)
    return SplitExpertWeight(w.name, w.data[:0], w.ggml_type, w.shape, "split", tuple(devices), parts,
                             tuple(local_index))


def expert_part(w: Weight, expert: int) -> tuple[str, Weight, int]:
    """(device, the weight on it, the expert's index there) of one expert of w."""
    if isinstance(w, SplitExpertWeight):
        device = w.expert_device[expert]
        return device, w.parts[device], w.local_index[expert]
    return w.device, w, expert


class PlacedOps:
    """The op set the families call (`model.ops`), routed to the device of each weight."""

    def __init__(self, backends: dict):
        self.backends = backends
        self._layer_ops = {name: layer_ops(backend) for name, backend in backends.items()}
        self.home = next(iter(backends))
        self.transfers = 0
        self.transfer_bytes = 0

    # --- where the activation lives ---------------------------------------------------------------

    def enter(self, device: str) -> None:
        """From now on activations live on `device` (the current layer's home)."""
        self.home = device

    @property
    def home(self) -> str:
        return self._home

    @home.setter
    def home(self, device: str) -> None:
        # looked up once here, not on each of a layer's dozens of ops
        self._home = device
        self.home_backend = self.backends[device]
        self.home_layer_ops = self._layer_ops[device]

    def move(self, x, src: str, dst: str):
        """x from device src to device dst, counted; as is when they are the same device."""
        if src == dst:
            return x
        host = self.backends[src].to_host(x)
        self.transfers += 1
        self.transfer_bytes += host.nbytes
        return self.backends[dst].to_device(host)

    def to_host(self, x) -> np.ndarray:
        """A small result (router ids) read back from the home device."""
        return self.home_backend.to_host(x)

    def index(self, host_ints: np.ndarray):
        """Host index arrays (MoE row mapping) copied to the home device."""
        return self.home_backend.to_device(host_ints)

    # --- ops that read a weight ----------------------------------------------------------------

    def _on_weight_device(self, op: str, x, w: Weight, *args):
        if w.device == self.home:
            return getattr(self.home_backend, op)(x, w, *args)
        y = getattr(self.backends[w.device], op)(self.move(x, self.home, w.device), w, *args)
        return self.move(y, w.device, self.home)

    def matmul(self, x, w: Weight):
        if w.device == self._home:
            return self.home_backend.matmul(x, w)
        return self._on_weight_device("matmul", x, w)

    def matmuls(self, x, ws) -> list:
        """[matmul(x, w) for w in ws] for weights of one width (q, k and v; gate and up): one call
        where they all live on the home device and its backend has this op (the CPU then rounds
        or quantizes x once for all of them)."""
        together = getattr(self.home_backend, "matmuls", None)
        if together is not None and all(w.device == self._home for w in ws):
            return together(x, ws)
        return [self.matmul(x, w) for w in ws]

    def head_matmul(self, x, w: Weight):
        return self._on_weight_device("head_matmul", x, w)

    def expert_matmul(self, x, w: Weight, expert: int):
        device, part, local = expert_part(w, expert)
        if device == self.home:
            return self.home_backend.expert_matmul(x, part, local)
        y = self.backends[device].expert_matmul(self.move(x, self.home, device), part, local)
        return self.move(y, device, self.home)

    def embedding(self, w: Weight, ids: np.ndarray):
        return self.move(self.backends[w.device].embedding(w, ids), w.device, self.home)

    def dequantize(self, w: Weight):
        return self.move(self.backends[w.device].dequantize(w), w.device, self.home)

    # --- the small ops of a layer, on the home device (engine.backends.protocol.LayerOps) ----------

    def rms_norm(self, x, w, eps: float):
        return self.home_layer_ops.rms_norm(x, w, eps)

    def add_rms_norm(self, residual, y, w, eps: float):
        return self.home_layer_ops.add_rms_norm(residual, y, w, eps)

    def glu(self, gate, up, activation):
        return self.home_layer_ops.glu(gate, up, activation)

    def rope_qk(self, q, k, cos, sin, neox: bool, q_scale: float = 1.0):
        return self.home_layer_ops.rope_qk(q, k, cos, sin, neox, q_scale)

    # --- mixture of experts -------------------------------------------------------------------

    @staticmethod
    def expert_device(w: Weight):
        """expert -> the device holding it (of the gate tensor, which groups the experts)."""
        if isinstance(w, SplitExpertWeight):
            return w.expert_device.__getitem__
        return lambda expert: w.device

    def expert_ffn(self, rows_in, segments, lw, activation):
        """The selected experts' FFN over their rows (R, n_embd) on the home device; `segments`
        lists per device its experts and their row ranges (engine.arch.layers.ExpertRows). Each
        device gets its rows in one move and sends its outputs back in one move."""
        home = self.home
        outputs = []
        for device, spans in segments:
            first, end = spans[0][1], spans[-1][2]
            x = self.move(rows_in[first:end, ...], home, device)
            self.home = device          # the experts' own matmuls run here
            try:
                y = self._experts_on(device, x, [(e, a - first, b - first) for e, a, b in spans], lw, activation)
            finally:
                self.home = home
            outputs.append(self.move(y, device, home))
        return outputs[0] if len(outputs) == 1 else self.home_backend.namespace.concat(outputs, axis=0)

    def _experts_on(self, device: str, x, spans, lw, activation):
        """The experts of `spans` (expert, first, end) over their rows of x, on `device`: in one
        backend op (protocol.RoutedExperts) where the backend has it and holds all three tensors
        of these experts at one index, else one expert at a time."""
        grouped = getattr(self.backends[device], "routed_experts", None)
        parts = self._parts_on(device, [e for e, _, _ in spans], lw)
        y = None
        if grouped is not None and parts is not None:
            local_spans = [(local, a, b) for local, (_, a, b) in zip(parts[0], spans)]
            y = grouped(x, local_spans, *parts[1], activation)
        if y is None:
            ys = [self._one_expert(x[a:b, ...], lw, expert, activation) for expert, a, b in spans]
            y = ys[0] if len(ys) == 1 else self.backends[device].namespace.concat(ys, axis=0)
        return y

    @staticmethod
    def _parts_on(device: str, experts, lw):
        """(the experts' index in their parts, the gate, up and down parts) when all three
        tensors hold these experts on `device` at the same index; else None."""
        parts, indices = [], []
        for w in (lw.ffn_gate_exps, lw.ffn_up_exps, lw.ffn_down_exps):
            placed = [expert_part(w, e) for e in experts]
            if any(d != device for d, _, _ in placed):
                return None
            parts.append(placed[0][1])
            indices.append([local for _, _, local in placed])
        return (indices[0], parts) if indices[0] == indices[1] == indices[2] else None

    def _one_expert(self, x, lw, expert: int, activation):
        # gate, up and down of one expert usually share the device the rows were moved to; where
        # a placement splits them differently, expert_matmul moves the activation for the odd one
        return expert_feed_forward(self, x, lw.ffn_gate_exps, lw.ffn_up_exps, lw.ffn_down_exps, expert, activation)

    # --- bookkeeping ------------------------------------------------------------------------------

    def set_threads(self, n_threads: int) -> None:
        for backend in self.backends.values():
            backend.set_threads(n_threads)

    def allocated_bytes(self) -> dict[str, int]:
        return {name: backend.allocated_bytes for name, backend in self.backends.items()}


def make_backends(devices, activations: str = "f32") -> dict:
    """A backend per device: the host for the CPU, a strict simulated GPU for each simulated
    device, the CUDA backend on the emulator for each emulated one and through CuPy for a real
    GPU. A real GPU without CuPy is refused rather than quietly run on the CPU."""
    backends = {}
    n_simulated = 0
    for device in devices:
        if not device.is_gpu:
            backends[device.name] = CpuBackend(activations)
        elif device.emulated:
            from engine.backends.cuda import emulated_backend
            backends[device.name] = emulated_backend(device.name, activations, index=n_simulated)
            n_simulated += 1
        elif device.simulated:
            backends[device.name] = StrictSimBackend(device.name, activations, index=n_simulated)
            n_simulated += 1
        else:
            backends[device.name] = _cuda_backend(device, activations)
    return backends


def _cuda_backend(device, activations: str):
    """The CUDA backend for a real GPU; without CuPy or a usable GPU, a clear refusal (never the CPU)."""
    from engine.backends.cuda import CudaUnavailableError, gpu_backend
    try:
        return gpu_backend(device.name, int(device.name.removeprefix("CUDA")), activations)
    except CudaUnavailableError as e:
        raise NoCudaBackendError(f"{device.name} ({device.description}) needs the CUDA backend: {e}") from e
