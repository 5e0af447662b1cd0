"""What a device does for a forward pass: the `Backend` protocol.

The family code (`engine.arch`) is array math over whatever namespace its inputs come from; it
never names a device. Everything that is tied to one device goes through a backend:

- **weights**: `upload` puts a GGUF-encoded tensor (whole, or a subset of a routed-expert
  tensor's experts) into the device's memory; `upload_vector` puts a small 1-D float32 tensor
  (norm weights, biases, rope factors) there.
- **activations**: `to_device` / `to_host` copy float32 (or int) arrays between host memory and
  the device. The multi-device dispatcher (`engine.backends.dispatch`) moves an activation
  between two devices as `dst.to_device(src.to_host(x))` and counts each move.
- **quantized matmuls**: `matmul` (2-D weight), `expert_matmul` (one expert of a 3-D
  `*_exps` tensor, optionally a row range of it), `head_matmul` (one matrix per head of a 3-D
  tensor, MLA's `attn_k_b` / `attn_v_b`). Weights stay in their GGUF encoding; how a backend
  decodes them (and whether it rounds the input to llama.cpp's Q8 blocks first, see
  `RunConfig.activations`) is its own business.
- **embedding lookup**: rows of a (possibly quantized) table as float32 activations.
- **the KV cache of the layers living on the device, and attention over it**: `new_kv_layer`
  allocates one layer's K/V storage (in the cache type, quantized or not); `attend` stores a
  ubatch's keys/values and attends over everything the layer has cached, masks built on the
  device. A GPU backend may read a quantized cache inside its attention kernel instead of
  decoding the whole cache each step.
- **the array namespace** of its arrays (`namespace`): NumPy for the CPU, array-api-strict for the
  simulated GPUs, CuPy for CUDA. Arrays of one backend never meet arrays of another in an op:
  the dispatcher moves them first.

Shapes are NumPy order, rows first; a weight `W` of shape `(out, in)` computes `y = x @ W.T`.
Every array a backend returns lives on that backend's device.

Adding a device: implement this protocol, register a factory for it in the conformance suite's
backend list (`tests/support/backend_registry.py`), and every op is checked against a NumPy
float64 reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from engine.arch.base import AttentionKind
from engine.arch.layers import ArrayOps
from engine.backends import Weight

Array = Any     # an array of the backend's namespace (numpy.ndarray, array_api_strict.Array, cupy.ndarray)


@dataclass(frozen=True)
class KVLayout:
    """The shape of one layer's KV storage, as `engine.plan.memory` sizes it.

    n_v == 0 means the values are a prefix of each key (MLA caches only [latent | k_rope])."""

    n_cells: int
    n_k: int            # key values per cell (n_embd_k_gqa)
    n_v: int            # value values per cell (n_embd_v_gqa), 0 with MLA
    type_k: str         # "f32", "f16", "q8_0", ... (RunConfig's cache types)
    type_v: str
    # how attention over the cache rounds: RunConfig.activations and whether llama.cpp runs flash
    # attention (-fa resolved); the CPU backend rounds as llama.cpp's CPU backend does with these
    activations: str = "f32"
    flash_attn: bool = True


@dataclass(frozen=True)
class AttentionStep:
    """The host's bookkeeping of one ubatch in one layer: where its tokens go in the cache and
    which cached keys a query may see (llama_hparams::is_masked_swa)."""

    cells: np.ndarray   # host int64 (n_tokens,): the cell each token's key/value is written to
    n_filled: int       # cells in use from the start of the layer's storage, after this store
    kind: AttentionKind
    window: int         # tokens of a sliding window or chunk; 0 for full attention


@runtime_checkable
class KVLayer(Protocol):
    """One layer's keys and values, held on the device that runs the layer's attention."""

    layout: KVLayout

    @property
    def nbytes(self) -> int:
        """Bytes of K and V storage (the same number `engine.plan.memory.kv_layer_bytes` gives)."""

    def forget(self, n_past: int) -> None:
        """Mark every cell holding a position >= n_past empty (truncate / reset)."""


@runtime_checkable
class DeltaNetBackend(Protocol):
    """Optional: a device that runs the Gated DeltaNet mixer (Qwen3.5, Qwen3-Next) itself, next to
    the recurrent state it holds in its own memory. Without these the layer's state stays in host
    memory and the host's NumPy mixer runs on host copies of the inputs (the CPU's own way, and
    the simulated GPU's, whose memory is the host's); a real GPU must have them."""

    def new_recurrent_layer(self, rows: int, conv_values: int, ssm_values: int):
        """One layer's zeroed states (engine.arch.delta_net.RecurrentLayer) in this device's memory."""

    def delta_net(self, state, qkv: Array, beta: Array, g: Array, z: Array, conv_weight: Array, norm_weight: Array,
                  heads) -> Array:
        """engine.arch.delta_net.mixer on this device: qkv (T, C), beta and g (T, Hv), z (T, Hv * d),
        conv_weight (C, K) and norm_weight (d,) its arrays, `heads` a DeltaNetHeads; sequence 0 of
        `state` updated. -> (T, Hv * d)."""


@runtime_checkable
class Backend(Protocol):
    """One device: its memory, its transfers and the ops that read its weights or its cache."""

    name: str               # llama.cpp's buffer name: "CPU", "CUDA0", ...
    allocated_bytes: int    # weight bytes uploaded to this device (0 for the CPU's memory map)

    @property
    def namespace(self) -> ModuleType:
        """The array namespace of this device's arrays (Array API standard)."""

    # --- memory ---------------------------------------------------------------------------------

    def upload(self, w: Weight, experts: Sequence[int] | None = None) -> Weight:
        """`w` resident on this device, `device` set to `name`. With `experts`, only those
        experts of a routed-expert tensor (n_expert, rows, row_bytes), in the order given: the
        result has shape (len(experts), rows, cols) and expert i of it is experts[i]."""

    def upload_vector(self, values: np.ndarray) -> Array:
        """A small float32 host tensor (norm weight, bias, rope factors) copied to the device."""

    def to_device(self, x: np.ndarray) -> Array:
        """A host array copied to the device, dtype kept (float32 activations, int64 positions)."""

    def to_host(self, x: Array) -> np.ndarray:
        """A device array copied to host memory as a NumPy array."""

    # --- ops that read weights ------------------------------------------------------------------

    def matmul(self, x: Array, w: Weight) -> Array:
        """x (..., n_cols) @ W.T -> (..., n_rows) float32, W (n_rows, n_cols) on this device."""

    def expert_matmul(self, x: Array, w: Weight, expert: int, rows: slice | None = None) -> Array:
        """x (n_tokens, n_cols) @ W[expert][rows].T -> (n_tokens, n_rows): reads only that
        expert's bytes (only those rows when a range is given)."""

    def head_matmul(self, x: Array, w: Weight) -> Array:
        """x (n_tokens, n_head, n_cols) with W (n_head, n_rows, n_cols) -> (n_tokens, n_head,
        n_rows), each head through its own matrix."""

    def embedding(self, w: Weight, ids: np.ndarray) -> Array:
        """Rows `ids` (host int array) of the table W (n_vocab, n_embd) as float32 (n_ids, n_embd)."""

    # --- the KV cache and attention -------------------------------------------------------------

    def new_kv_layer(self, layout: KVLayout) -> KVLayer:
        """Empty K/V storage of one layer (every cell empty) on this device."""

    def attend(self, kv: KVLayer, step: AttentionStep, positions: Array, q: Array, k: Array,
               v: Array | None, kq_scale: float, v_from_k: int = 0) -> Array:
        """Store this ubatch's keys k (T, n_head_kv, d_k) and values v (T, n_head_kv, d_v) in
        the cells `step.cells`, then attend over the layer's cache:

            softmax(kq_scale * q K^T + mask) V  ->  (T, n_head * d_v)

        q (T, n_head, d_k) with grouped-query heads (query head h reads kv head
        h // (n_head / n_head_kv)); `positions` (T,) int64 on this device are the queries'
        positions, from which the mask is built here (a cell is visible when it holds a
        position <= the query's, inside the sliding window or chunk of `step.kind`).
        v None: the values are the first `v_from_k` entries of each key (MLA's latent)."""

    # --- threads --------------------------------------------------------------------------------

    def set_threads(self, n_threads: int) -> None:
        """Worker threads for ops called from the calling thread (-t); 0 leaves the default."""


@runtime_checkable
class RoutedExperts(Protocol):
    """Optional: a device that runs all the selected experts of a MoE layer it holds in one op
    (the CPU's grouped products, one parallel region for all gate and up products). Without it,
    or where it returns None, the dispatcher runs one expert at a time through expert_matmul."""

    def routed_experts(self, x: Array, spans, gate: Weight, up: Weight, down: Weight, activation) -> Array | None:
        """down(activation(gate(x), up(x))) per expert over its rows of x (R, n_cols) -> (R, n_embd):
        `spans` lists (expert, first_row, end_row) covering x's rows in order, `expert` indexing
        all three weights; bit-identical to one expert_feed_forward per expert, or None."""


@runtime_checkable
class LayerOps(Protocol):
    """The small ops of a layer on activations of one device, optional for a backend: one that
    has them runs its own kernels (the CPU's one-pass loops, `kernels.cpu.fused_ops`); for one
    that has not, the dispatcher runs `engine.arch.layers.ArrayOps`, the same math over the
    backend's array namespace (`layer_ops`). Arrays float32, rows first, the backend's own."""

    def rms_norm(self, x: Array, w: Array | None, eps: float) -> Array:
        """x / sqrt(mean(x^2 over the last axis) + eps), times w (n,) unless w is None."""

    def add_rms_norm(self, residual: Array, y: Array, w: Array, eps: float) -> Array:
        """residual + rms_norm(y, w, eps)."""

    def glu(self, gate: Array, up: Array, activation) -> Array:
        """activation(gate, up): `layers.swiglu` or `layers.geglu` (another function is applied as is)."""

    def rope_qk(self, q: Array, k: Array, cos: Array, sin: Array, neox: bool,
                q_scale: float = 1.0) -> tuple[Array, Array]:
        """q and k (T, heads, head_dim) rotated by cos/sin (T, n_dims/2) (`layers.apply_rope`),
        q then times q_scale."""


def layer_ops(backend) -> LayerOps:
    """The backend's own small ops, or the array-namespace ones."""
    return backend if isinstance(backend, LayerOps) else ArrayOps

