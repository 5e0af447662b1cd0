"""Per-device memory estimate: weights + KV cache + compute buffers + fixed overhead.

A pure function of (inventory, placement, run config, devices), cheap enough to run on every
mouse move of a drag: the placement keeps its per-device weight totals up to date as tensors
move, and everything else here is O(n_layer).

The KV cache is sized exactly as llama.cpp sizes it (`llama_kv_cache` / `llama_kv_cache_iswa`);
`kv_layer_bytes` is the one function the engine's cache allocator uses too.

Compute buffers are what llama.cpp's scheduler reserves, derived by engine.plan.compute_buffers
from the family's worst-case graph and a port of ggml's allocator, per device of the placement.
Overhead is a list of named terms (`OverheadTerm`), for the llama.cpp command line the plan
exports or for this app's own engine (`MemoryOptions.target`); each says whether it is derived
from a rule or was measured (see docs/memory-model.md).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.gguf import ggml_types
from engine.arch.base import AttentionKind, HyperParams
from engine.plan import compute_buffers
from engine.plan.placement import INPUT_SLOT, tensor_slot
from engine.run_config import RunConfig
from engine.units import format_bytes

MIB = 1 << 20
# Per-GPU terms of a llama.cpp run. Derived (no GPU has measured them here yet): the CUDA
# context with ggml-cuda's kernels loaded lazily, and cuBLAS's handle and workspace.
CUDA_CONTEXT_BYTES = 384 * MIB
CUBLAS_WORKSPACE_BYTES = 64 * MIB
# This app's own process, measured (RSS) on the CPU build: the interpreter with NumPy and the
# Numba kernels compiled, and the Qt GUI on top; per GPU, CuPy's module cache and pool slack.
APP_ENGINE_BYTES = 160 * MIB
APP_GUI_BYTES = 48 * MIB
CUPY_RUNTIME_BYTES = 64 * MIB
GPU_CONTEXT_BYTES = CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES     # per GPU, both targets
CPU_BASELINE_BYTES = APP_ENGINE_BYTES + APP_GUI_BYTES
TARGETS = ("llama.cpp", "app")
KV_PAD_CELLS = 256                  # llama.cpp pads cache sizes to 256 cells
F32_BYTES = 4


def pad_cells(n: int) -> int:
    return -(-n // KV_PAD_CELLS) * KV_PAD_CELLS


def kv_cells(hp: HyperParams, il: int, rc: RunConfig) -> int:
    """Cache cells of layer il: the padded context, or llama.cpp's smaller window cache."""
    n_ctx = rc.context_length(hp.n_ctx_train)
    if hp.attention_kind(il) is AttentionKind.FULL:
        return n_ctx
    # llama_kv_cache_iswa: a window layer keeps window * n_seq + n_ubatch cells at most
    return pad_cells(min(n_ctx, hp.attention_window * rc.n_seq + rc.n_ubatch))


def kv_layer_bytes(hp: HyperParams, il: int, rc: RunConfig) -> tuple[int, int]:
    """(K bytes, V bytes) of layer il's cache."""
    cells = kv_cells(hp, il, rc)
    return (ggml_types.kv_row_bytes(rc.type_k, hp.n_embd_k_gqa(il)) * cells,
            ggml_types.kv_row_bytes(rc.type_v, hp.n_embd_v_gqa(il)) * cells)


def kv_cache_bytes(hp: HyperParams, rc: RunConfig) -> int:
    return sum(sum(kv_layer_bytes(hp, il, rc)) for il in range(hp.n_layer))


def recurrent_sequences(rc: RunConfig) -> int:
    """Rows of the recurrent cache: one per sequence (llama.cpp's rs_size = max(1, n_seq_max))."""
    return max(1, rc.n_seq)


def recurrent_layer_bytes(hp: HyperParams, il: int, rc: RunConfig) -> tuple[int, int]:
    """(conv-state bytes, delta-rule-state bytes) of layer il, F32 as llama_memory_recurrent
    allocates them; (0, 0) for a layer without a recurrent state."""
    if not hp.is_recurrent(il):
        return 0, 0
    rows = recurrent_sequences(rc)
    return hp.n_embd_r() * rows * F32_BYTES, hp.n_embd_s() * rows * F32_BYTES


# this app's engine keeps this many copies of a hybrid model's recurrent state, each on its
# layer's device, to rewind a chat to a turn boundary (engine.run.recurrent_state); llama.cpp's
# own context checkpoints (-ctxcp) are the server's business and not in its load-time buffers
RECURRENT_CHECKPOINTS = 4


def recurrent_state_bytes(hp: HyperParams, rc: RunConfig) -> int:
    """llama.cpp's `RS buffer size` over all layers."""
    return sum(sum(recurrent_layer_bytes(hp, il, rc)) for il in range(hp.n_layer))


def hybrid_kv_cache_note(hp: HyperParams | None, rc: RunConfig) -> str | None:
    """On a hybrid (recurrent + attention) model, what a q4_0 cache saves over f16 at this context
    (only the attention layers have a KV cache) and the reported risk; None for other models."""
    if hp is None or not any(hp.is_recurrent(il) for il in range(hp.n_layer)):
        return None
    n_kv_layers = sum(not hp.is_recurrent(il) for il in range(hp.n_layer))
    f16 = kv_cache_bytes(hp, rc.replace(type_k="f16", type_v="f16"))
    q4_0 = kv_cache_bytes(hp, rc.replace(type_k="q4_0", type_v="q4_0"))
    n_ctx = rc.context_length(hp.n_ctx_train)
    return (f"hybrid model: {n_kv_layers} of {hp.n_layer} layers have a KV cache; at {n_ctx:,} "
            f"tokens q4_0 saves {format_bytes(f16 - q4_0)} over f16 (the {format_bytes(recurrent_state_bytes(hp, rc))} "
            "recurrent state stays F32). Caches below q8_0 are reported to produce NaN on these models: if a run "
            "stops on non-finite values, use -ctk q8_0 -ctv q8_0")


def flash_attention_on(rc: RunConfig, has_gpu: bool = False) -> bool:
    # llama.cpp's "auto" (resolve_fused_ops) turns flash attention on when every layer's device
    # runs it: the CPU backend and every CUDA GPU do
    return rc.flash_attn in ("on", "auto")


# A rough model of one layer's activations, for families without a graph in compute_buffers.

def layer_compute_bytes(hp: HyperParams, il: int, rc: RunConfig, flash_attn: bool) -> int:
    """Largest simultaneously-live activations of one layer for one ubatch."""
    n_tokens = min(rc.n_ubatch, rc.n_batch)
    n_kv = kv_cells(hp, il, rc)
    residual = 4 * n_tokens * hp.n_embd * F32_BYTES          # input, normed, attention out, sum
    q_k_v = n_tokens * (hp.n_head * hp.n_embd_head_k + hp.n_embd_k_gqa(il) + hp.n_embd_v_gqa(il)) * F32_BYTES
    if flash_attn:
        attention = q_k_v + n_tokens * hp.n_head * hp.n_embd_head_v * F32_BYTES
    else:
        attention = q_k_v + n_tokens * n_kv * hp.n_head * F32_BYTES   # the KQ score matrix
    if hp.is_moe_layer(il) and hp.n_expert:
        ffn = 3 * n_tokens * hp.n_expert_used * (hp.n_ff_exp or hp.n_ff[il]) * F32_BYTES
    else:
        ffn = 3 * n_tokens * hp.n_ff[il] * F32_BYTES
    return residual + max(attention, ffn)


def expert_compute_bytes(hp: HyperParams, il: int, rc: RunConfig) -> int:
    """Intermediates of the selected experts of one ubatch, on a device holding some of them."""
    n_tokens = min(rc.n_ubatch, rc.n_batch)
    return (3 * hp.n_expert_used * (hp.n_ff_exp or hp.n_ff[il]) + 2 * hp.n_embd) * n_tokens * F32_BYTES


def output_compute_bytes(hp: HyperParams, rc: RunConfig) -> int:
    return min(rc.n_ubatch, rc.n_batch) * hp.n_vocab * F32_BYTES


@dataclass(frozen=True)
class MemoryOptions:
    target: str = "llama.cpp"           # whose process: the exported llama.cpp command, or this app
    gpu_overhead_bytes: int | None = None   # one fixed figure per GPU instead of the named terms
    gpu_margin_bytes: int = 0           # the user's safety margin per GPU
    cpu_baseline_bytes: int | None = None   # one fixed figure for the host instead of the named terms

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"memory target must be one of {', '.join(TARGETS)}, not {self.target!r}")


@dataclass(frozen=True)
class OverheadTerm:
    """One named piece of a device's overhead."""
    name: str
    n_bytes: int
    derived: bool       # True: follows from a rule, not yet measured on such a device


def overhead_terms(hp: HyperParams | None, rc: RunConfig, is_gpu: bool,
                   options: MemoryOptions) -> tuple[OverheadTerm, ...]:
    """What a device carries besides weights, KV cache and compute buffers."""
    if is_gpu:
        if options.gpu_overhead_bytes is not None:
            return (OverheadTerm("GPU overhead (given)", options.gpu_overhead_bytes, False),)
        terms = [OverheadTerm("CUDA context", CUDA_CONTEXT_BYTES, True),
                 OverheadTerm("cuBLAS workspace", CUBLAS_WORKSPACE_BYTES, True)]
        if options.target == "app":
            terms.append(OverheadTerm("CuPy modules and pool", CUPY_RUNTIME_BYTES, True))
        return tuple(terms)
    if options.cpu_baseline_bytes is not None:
        return (OverheadTerm("host overhead (given)", options.cpu_baseline_bytes, False),)
    if options.target == "app":
        return (OverheadTerm("engine process (Python, NumPy, Numba)", APP_ENGINE_BYTES, False),
                OverheadTerm("Qt GUI", APP_GUI_BYTES, False))
    # llama_context's output buffer at load: logits of one row per sequence (it grows to a
    # batch of rows only when a batch asks for all of them, as llama-perplexity does)
    n_vocab = hp.n_vocab if hp is not None else 0
    return (OverheadTerm("llama.cpp output buffer", n_vocab * max(1, rc.n_seq) * F32_BYTES, False),)


@dataclass(frozen=True)
class DeviceEstimate:
    device: str
    capacity_bytes: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    margin_bytes: int
    overhead_terms: tuple[OverheadTerm, ...] = ()
    compute_derived: bool = False       # a GPU's compute buffer: derived, not measured

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes + self.margin_bytes <= self.capacity_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes - self.margin_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    devices: tuple[DeviceEstimate, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def __getitem__(self, device: str) -> DeviceEstimate:
        for d in self.devices:
            if d.device == device:
                return d
        raise KeyError(device)

    def overfull(self) -> list[DeviceEstimate]:
        return [d for d in self.devices if not d.fits]


def expert_devices_away_from(inventory, placement, il: int, home: str) -> set[str]:
    """Devices other than the layer's home that compute some of its routed experts."""
    devices: set[str] = set()
    for t in inventory.layers[il].tensors:
        if t.is_expert_tensor:
            devices.update(d for d, n in placement.device_bytes(t.name).items() if n and d != home)
    return devices


_COMPUTE_CACHE: OrderedDict = OrderedDict()
_COMPUTE_CACHE_SIZE = 64


def compute_bytes_by_device(inventory, placement, rc: RunConfig, devices) -> dict[str, int]:
    """llama.cpp's compute buffer of every device for this placement (memoised: a drag returns
    to the same placements often, and a big model's graph takes a few tenths of a second)."""
    hp = inventory.hparams
    gpus = tuple(d.name for d in devices if d.is_gpu)
    shape = compute_buffers.GraphShape.of(hp, rc, flash_attention_on(rc, bool(gpus)), kv_cells)
    names = [t.name for t in inventory.tensors]
    where = tuple(placement.device_of(n) for n in names) if gpus else ()
    homes = tuple(placement.layer_home_device(il) for il in range(hp.n_layer)) if gpus else ()
    key = (id(inventory), inventory.total_bytes, hp, shape, gpus, where, homes)
    if key in _COMPUTE_CACHE:
        _COMPUTE_CACHE.move_to_end(key)
        return _COMPUTE_CACHE[key]
    by_name = inventory.by_name
    output_device = placement.output_device()

    def device_of(name: str) -> str:
        if name in by_name:
            return placement.device_of(name)
        return output_device if name == "output.weight" else CPU_NAME_FALLBACK

    sizes = compute_buffers.compute_buffer_bytes(
        hp, shape, gpus, device_of=device_of, layer_device=placement.layer_home_device,
        weight_bytes=lambda name: by_name[name].n_bytes if name in by_name else None,
        pipeline_parallel=pipeline_parallel(inventory, placement, rc, gpus, where))
    _COMPUTE_CACHE[key] = sizes
    if len(_COMPUTE_CACHE) > _COMPUTE_CACHE_SIZE:
        _COMPUTE_CACHE.popitem(last=False)
    return sizes


CPU_NAME_FALLBACK = compute_buffers.CPU_NAME


def pipeline_parallel(inventory, placement, rc: RunConfig, gpus: tuple[str, ...], where: tuple[str, ...]) -> bool:
    """llama.cpp's pipeline parallelism: several GPUs holding every layer and the output, split
    by layer, with no tensor moved away from its layer (no -ot)."""
    if len(gpus) < 2 or rc.split_mode != "layer":
        return False
    layer_devices = placement.layer_devices
    if any(d not in gpus for d in layer_devices):
        return False
    n_layer = inventory.n_layer
    for t, device in zip(inventory.tensors, where):
        slot = tensor_slot(t.name, t.layer, n_layer)
        if slot != INPUT_SLOT and device != layer_devices[slot]:
            return False
    return True


def _rough_compute_bytes(inventory, placement, rc: RunConfig, devices) -> dict[str, int]:
    """The per-layer model, for families compute_buffers has no graph of."""
    hp = inventory.hparams
    compute = {d.name: 0 for d in devices}
    flash_attn = flash_attention_on(rc, any(d.is_gpu for d in devices))
    for il in range(hp.n_layer):
        home = placement.layer_home_device(il)
        compute[home] = max(compute[home], layer_compute_bytes(hp, il, rc, flash_attn))
        for device in expert_devices_away_from(inventory, placement, il, home):
            compute[device] = max(compute[device], expert_compute_bytes(hp, il, rc))
    compute[placement.output_device()] += output_compute_bytes(hp, rc)
    return compute


def _checkpoint_bytes(hp: HyperParams | None, placement, rc: RunConfig) -> dict[str, int]:
    """Per device, the app's checkpoint copies of the recurrent layers homed there."""
    by_device: dict[str, int] = {}
    for il in range(hp.n_layer if hp is not None else 0):
        state = sum(recurrent_layer_bytes(hp, il, rc))
        if state:
            home = placement.layer_home_device(il)
            by_device[home] = by_device.get(home, 0) + RECURRENT_CHECKPOINTS * state
    return by_device


def estimate_memory(inventory, placement, rc: RunConfig, devices, options: MemoryOptions = MemoryOptions()
                    ) -> MemoryEstimate:
    """Per-device memory for running `inventory` placed by `placement` with `rc`."""
    hp = inventory.hparams
    weights = placement.weight_bytes()
    kv = {d.name: 0 for d in devices}
    compute = {d.name: 0 for d in devices}
    notes: list[str] = []
    if hp is not None:
        for il in range(hp.n_layer):
            home = placement.layer_home_device(il)
            # the layer's home holds its KV cache or, on a recurrent layer, its recurrent state
            kv[home] += sum(kv_layer_bytes(hp, il, rc)) + sum(recurrent_layer_bytes(hp, il, rc))
        if compute_buffers.has_graph(hp.arch):
            for device, n_bytes in compute_bytes_by_device(inventory, placement, rc, devices).items():
                if device in compute:
                    compute[device] = n_bytes
        else:
            compute = _rough_compute_bytes(inventory, placement, rc, devices)
            notes.append(f"compute buffers of {hp.arch} follow a per-layer rule, not llama.cpp's graph")
    else:
        notes.append("architecture unknown: KV cache and compute buffers are not estimated")
    checkpoints = _checkpoint_bytes(hp, placement, rc) if options.target == "app" else {}
    estimates = []
    for d in devices:
        terms = overhead_terms(hp, rc, d.is_gpu, options)
        if checkpoints.get(d.name):
            terms += (OverheadTerm(f"recurrent-state checkpoints ({RECURRENT_CHECKPOINTS} kept to rewind a chat)",
                                   checkpoints[d.name], False),)
        estimates.append(DeviceEstimate(
            device=d.name, capacity_bytes=d.total_bytes, weights_bytes=weights.get(d.name, 0),
            kv_bytes=kv[d.name], compute_bytes=compute[d.name],
            overhead_bytes=sum(t.n_bytes for t in terms),
            margin_bytes=options.gpu_margin_bytes if d.is_gpu else 0,
            overhead_terms=terms, compute_derived=d.is_gpu))
    return MemoryEstimate(tuple(estimates), tuple(notes))
