"""Per-device memory estimate: weights + KV cache + compute buffers + fixed overhead.

A pure function of (inventory, placement, run config, devices), cheap enough to run on every
mouse move of a drag: the placement keeps its per-device weight totals up to date as tensors
move, and everything else here is O(n_layer).

The KV cache is sized exactly as llama.cpp sizes it (`llama_kv_cache` / `llama_kv_cache_iswa`);
`kv_layer_bytes` is the one function the engine's cache allocator uses too.

Compute buffers are a model of what llama.cpp's graph allocator reserves for the worst-case
ubatch (see docs/memory-model.md): the largest simultaneously-live activations of one layer
(attention scores without flash attention, the FFN or the selected experts' intermediates),
the residual stream, and on the device holding the output matrix, the logits of one ubatch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.gguf import ggml_types
from engine.arch.base import AttentionKind, HyperParams
from engine.run_config import RunConfig

MIB = 1 << 20
GPU_CONTEXT_BYTES = 450 * MIB       # CUDA context + cuBLAS workspace per GPU
CPU_BASELINE_BYTES = 400 * MIB      # the process itself: Python, NumPy, Qt
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


def kv_row_bytes(type_name: str, n_values: int) -> int:
    if n_values == 0:
        return 0
    row = ggml_types.row_bytes(ggml_types.type_id_by_name(type_name), n_values)
    if row is None:
        raise ValueError(f"KV cache type {type_name} needs rows that are a multiple of its block size; "
                         f"this model caches {n_values} values per token: use f16 or q8_0")
    return row


def kv_layer_bytes(hp: HyperParams, il: int, rc: RunConfig) -> tuple[int, int]:
    """(K bytes, V bytes) of layer il's cache."""
    cells = kv_cells(hp, il, rc)
    return (kv_row_bytes(rc.type_k, hp.n_embd_k_gqa(il)) * cells,
            kv_row_bytes(rc.type_v, hp.n_embd_v_gqa(il)) * cells)


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


def recurrent_state_bytes(hp: HyperParams, rc: RunConfig) -> int:
    """llama.cpp's `RS buffer size` over all layers."""
    return sum(sum(recurrent_layer_bytes(hp, il, rc)) for il in range(hp.n_layer))


def flash_attention_on(rc: RunConfig, has_gpu: bool) -> bool:
    # llama.cpp's "auto" turns flash attention on where the backend supports it (all CUDA GPUs)
    return rc.flash_attn == "on" or (rc.flash_attn == "auto" and has_gpu)


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
    gpu_overhead_bytes: int = GPU_CONTEXT_BYTES
    gpu_margin_bytes: int = 0           # the user's safety margin per GPU
    cpu_baseline_bytes: int = CPU_BASELINE_BYTES


@dataclass(frozen=True)
class DeviceEstimate:
    device: str
    capacity_bytes: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    margin_bytes: int

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


def estimate_memory(inventory, placement, rc: RunConfig, devices, options: MemoryOptions = MemoryOptions()
                    ) -> MemoryEstimate:
    """Per-device memory for running `inventory` placed by `placement` with `rc`."""
    hp = inventory.hparams
    weights = placement.weight_bytes()
    kv = {d.name: 0 for d in devices}
    compute = {d.name: 0 for d in devices}
    notes: list[str] = []
    if hp is not None:
        flash_attn = flash_attention_on(rc, any(d.is_gpu for d in devices))
        for il in range(hp.n_layer):
            home = placement.layer_home_device(il)
            # the layer's home holds its KV cache or, on a recurrent layer, its recurrent state
            kv[home] += sum(kv_layer_bytes(hp, il, rc)) + sum(recurrent_layer_bytes(hp, il, rc))
            compute[home] = max(compute[home], layer_compute_bytes(hp, il, rc, flash_attn))
            for device in expert_devices_away_from(inventory, placement, il, home):
                compute[device] = max(compute[device], expert_compute_bytes(hp, il, rc))
        output_device = placement.device_of("output.weight") if "output.weight" in inventory.by_name \
            else placement.device_of("token_embd.weight")
        compute[output_device] += output_compute_bytes(hp, rc)
    else:
        notes.append("architecture unknown: KV cache and compute buffers are not estimated")
    return MemoryEstimate(tuple(
        DeviceEstimate(
            device=d.name, capacity_bytes=d.total_bytes, weights_bytes=weights.get(d.name, 0),
            kv_bytes=kv[d.name], compute_bytes=compute[d.name],
            overhead_bytes=options.gpu_overhead_bytes if d.is_gpu else options.cpu_baseline_bytes,
            margin_bytes=options.gpu_margin_bytes if d.is_gpu else 0)
        for d in devices), tuple(notes))
