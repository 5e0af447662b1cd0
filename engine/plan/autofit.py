"""Auto-fit: the placement that runs fastest within each GPU's memory, and one line saying why.

What earns GPU memory first, in order:

1. per layer, everything but the routed experts — attention (with its KV cache, which never
   leaves it), norms, router, shared experts, dense FFN — for all layers, and the output layer;
2. routed experts, layer by layer from the first MoE layer (`ffn_gate_exps` and `ffn_up_exps`
   of a layer travel together, `ffn_down_exps` on its own), so the last layers spill first;
3. optionally, single experts of the first tensors that did not fit whole (a per-expert split,
   which llama.cpp cannot express: off unless asked for).

Layers go to GPUs in order, each GPU taking a contiguous run as `-ngl`/`-ts` would, and a
layer's experts sit on its own GPU when they can; space a whole expert tensor cannot use is
filled by a later, smaller one (in the Q4_K_M mix some `ffn_down_exps` are Q4_K, some Q6_K).
Before any expert, each GPU keeps the CUDA context, the user's margin and the largest compute
buffer the estimate may charge it. When even (1) does not fit, whole layers go to the CPU, the
first layers first, exactly as lowering `-ngl` does (llama.cpp offloads the last layers), so the
plan stays one short command line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from engine.plan.inventory import Inventory, Role
from engine.plan import compute_buffers
from engine.plan.memory import (MemoryEstimate, MemoryOptions, estimate_memory, expert_compute_bytes,
                                flash_attention_on, kv_cells, kv_layer_bytes, layer_compute_bytes,
                                output_compute_bytes, overhead_terms)
from engine.plan.placement import INPUT_SLOT, Placement, TensorRef, tensor_slot
from engine.run_config import RunConfig
from engine.units import format_bytes, format_ranges

# What auto-fit leaves free on each GPU unless the user says otherwise, on top of the CUDA
# context and cuBLAS workspace the estimate already charges: the allocator's slack and what the
# desktop and other programs hold. llama.cpp's own --fit keeps the same by default (-fitt 1024).
DEFAULT_GPU_MARGIN_BYTES = 1024 << 20

# expert groups that must share a device: llama.cpp fuses gate and up in one matmul pass
PAIRED_GROUPS = ("ffn_gate_exps", "ffn_up_exps")
CPU_NAME = "CPU"


@dataclass(frozen=True)
class AutoFitOptions:
    memory: MemoryOptions = MemoryOptions()
    allow_expert_split: bool = False    # per-expert splits: ours only, llama.cpp cannot express them


@dataclass(frozen=True)
class AutoFitResult:
    placement: Placement
    explanation: str
    estimate: MemoryEstimate


@dataclass
class _Unit:
    """Routed-expert tensors of one layer that move together."""
    slot: int
    names: tuple[str, ...]
    n_bytes: int
    n_experts: int
    expert_bytes: int                   # one expert across all `names`
    gpu: int = -1                       # whole on this GPU; -1: not on a GPU
    split: dict[int, range] = field(default_factory=dict)     # GPU -> experts there (per-expert split)


@dataclass
class _Slot:
    """A llama.cpp layer slot: a repeating layer, or n_layer for the output layer."""
    index: int
    dense_bytes: int                    # weights that are not routed experts, plus the KV cache
    units: list[_Unit]


@dataclass
class _Plan:
    first_gpu_slot: int                 # slots before it are on the CPU (what -ngl decides)
    homes: dict[int, int]               # slot -> GPU holding its dense part
    free: list[int]                     # per GPU, bytes still free


def auto_fit(inventory: Inventory, devices: Sequence, run_config: RunConfig,
             options: AutoFitOptions = AutoFitOptions()) -> AutoFitResult:
    """A placement of `inventory` on `devices` that fits every GPU and keeps the fastest parts there."""
    gpus = [d for d in devices if d.is_gpu]
    cpu = CPU_NAME if any(d.name == CPU_NAME for d in devices) else devices[0].name
    slots = _slots(inventory, run_config)
    compute_bytes = _compute_reserve(inventory, run_config, gpus, cpu)
    overhead = sum(t.n_bytes for t in overhead_terms(inventory.hparams, run_config, True, options.memory))
    budgets = [max(d.total_bytes - overhead - options.memory.gpu_margin_bytes - reserve, 0)
               for d, reserve in zip(gpus, compute_bytes)]
    min_slot = 0
    while True:
        plan, units = _best_plan(slots, budgets, min_slot)
        if options.allow_expert_split:
            _split_experts([u for u in units if u.slot >= plan.first_gpu_slot], plan.free)
        placement = _placement(inventory, devices, gpus, cpu, slots, plan, units)
        estimate = estimate_memory(inventory, placement, run_config, devices, options.memory)
        if _gpus_fit(estimate, gpus) or plan.first_gpu_slot > len(slots) - 1:
            break
        min_slot = plan.first_gpu_slot + 1      # a safety net: the budgets are meant to make this unreachable
    return AutoFitResult(placement, explain(inventory, placement, estimate, devices, plan.first_gpu_slot), estimate)


# --- what there is to place -----------------------------------------------------------------

def _slots(inventory: Inventory, rc: RunConfig) -> list[_Slot]:
    n_layer = inventory.n_layer
    hp = inventory.hparams
    dense = [0] * (n_layer + 1)
    expert_tensors: list[list] = [[] for _ in range(n_layer + 1)]
    for t in inventory.tensors:
        slot = tensor_slot(t.name, t.layer, n_layer)
        if slot == INPUT_SLOT:
            continue                    # llama.cpp keeps the input layer on the CPU
        if t.role is Role.ROUTED_EXPERTS and t.n_experts:
            expert_tensors[slot].append(t)
        else:
            dense[slot] += t.n_bytes
    if hp is not None:
        for il in range(n_layer):
            dense[il] += sum(kv_layer_bytes(hp, il, rc))
        if "output.weight" in inventory.by_name and not compute_buffers.has_graph(hp.arch):
            dense[n_layer] += output_compute_bytes(hp, rc)     # the rough rule's logits (the graph's are in the reserve)
    return [_Slot(s, dense[s], _units(s, expert_tensors[s])) for s in range(n_layer + 1)]


def _units(slot: int, tensors: list) -> list[_Unit]:
    by_key: dict[str, list] = {}
    for t in tensors:
        by_key.setdefault("ffn_gate_up" if t.group in PAIRED_GROUPS else t.group, []).append(t)
    return [_Unit(slot, tuple(t.name for t in ts), sum(t.n_bytes for t in ts), ts[0].n_experts,
                  sum(t.expert_bytes for t in ts)) for ts in by_key.values()]


def _compute_reserve(inventory: Inventory, rc: RunConfig, gpus: Sequence, cpu: str) -> list[int]:
    """The compute buffer to keep free on each GPU: the larger of llama.cpp's for the whole model
    on that GPU and, for a MoE model, its share with the layers spread over the GPUs by capacity
    and the routed experts on the CPU (llama.cpp offloads their matmuls to the first GPU, a
    weight at a time, each copy and the activations it reads in that GPU's compute buffer)."""
    hp = inventory.hparams
    if hp is None or not gpus:
        return [0] * len(gpus)
    if not compute_buffers.has_graph(hp.arch):
        return [_rough_compute_reserve(hp, rc)] * len(gpus)
    shape = compute_buffers.GraphShape.of(hp, rc, flash_attention_on(rc, True), kv_cells)
    by_name = inventory.by_name
    names = [g.name for g in gpus]
    n_layer = inventory.n_layer

    def weight_bytes(name: str) -> int | None:
        return by_name[name].n_bytes if name in by_name else None

    def buffers(homes: list[str], experts_on_cpu: bool) -> dict[str, int]:
        def device_of(name: str) -> str:
            t = by_name.get(name)
            if name.startswith("token_embd") or (experts_on_cpu and t is not None and t.role is Role.ROUTED_EXPERTS):
                return cpu
            return homes[tensor_slot(name, t.layer if t is not None else None, n_layer)] if t is not None else homes[-1]
        return compute_buffers.compute_buffer_bytes(hp, shape, names, device_of=device_of,
                                                    layer_device=lambda il: homes[il], weight_bytes=weight_bytes)

    whole = buffers([names[0]] * (n_layer + 1), False).get(names[0], 0)
    reserves = [whole] * len(names)
    if hp.n_expert:
        spread = buffers(_spread_layers(n_layer + 1, gpus), True)
        reserves = [max(r, spread.get(name, 0)) for r, name in zip(reserves, names)]
    return reserves


def _spread_layers(n_slots: int, gpus: Sequence) -> list[str]:
    """Contiguous runs of slots over the GPUs in proportion to their memory, as -ts would."""
    total = sum(g.total_bytes for g in gpus)
    homes, edge = [], 0.0
    for g in gpus:
        edge += n_slots * g.total_bytes / total
        homes += [g.name] * (round(edge) - len(homes))
    return homes + [gpus[-1].name] * (n_slots - len(homes))


def _rough_compute_reserve(hp, rc: RunConfig) -> int:
    flash_attn = flash_attention_on(rc, True)
    compute = 0
    for il in range(hp.n_layer):
        compute = max(compute, layer_compute_bytes(hp, il, rc, flash_attn))
        if hp.n_expert and hp.is_moe_layer(il):
            compute = max(compute, expert_compute_bytes(hp, il, rc))
    return compute


# --- packing ---------------------------------------------------------------------------------

def _best_plan(slots: list[_Slot], budgets: list[int], min_slot: int) -> tuple[_Plan, list[_Unit]]:
    """The fewest CPU layers, then the longest run of expert units (in priority order) that packs."""
    units = [u for s in slots for u in s.units]
    for u in units:
        u.gpu, u.split = -1, {}
    first = min_slot
    while first < len(slots) and _pack(slots, budgets, first, []) is None:
        first += 1
    if first == len(slots):
        return _Plan(first, {}, list(budgets)), units
    gpu_units = [u for u in units if u.slot >= first]
    lo, hi = 0, len(gpu_units)          # the longest packing prefix: packing more never packs better
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _pack(slots, budgets, first, gpu_units[:mid]) is None:
            hi = mid - 1
        else:
            lo = mid
    plan = _pack(slots, budgets, first, gpu_units[:lo])
    _fill_holes(gpu_units[lo:], plan)
    return plan, units


def _pack(slots: list[_Slot], budgets: list[int], first: int, planned: list[_Unit]) -> _Plan | None:
    """Slots from `first` on go to GPUs in order; each slot's planned units follow it. None: no fit."""
    for u in planned:
        u.gpu = -1
    on_gpu = {id(u) for u in planned}
    free, g, homes = list(budgets), 0, {}
    for slot in slots[first:]:
        while g < len(free) and free[g] < slot.dense_bytes:
            g += 1
        if g == len(free):
            return None
        free[g] -= slot.dense_bytes
        homes[slot.index] = g
        for u in slot.units:
            if id(u) not in on_gpu:
                continue
            while g < len(free) and free[g] < u.n_bytes:
                g += 1
            if g == len(free):
                return None
            free[g] -= u.n_bytes
            u.gpu = g
    return _Plan(first, homes, free)


def _fill_holes(rest: list[_Unit], plan: _Plan) -> None:
    """Units past the packed run, into what the packing left free: their own GPU first, else the roomiest."""
    for u in rest:
        u.gpu = -1
        home = plan.homes.get(u.slot, -1)
        fits = [g for g, free in enumerate(plan.free) if free >= u.n_bytes]
        if not fits:
            continue
        u.gpu = home if home in fits else max(fits, key=lambda g: plan.free[g])
        plan.free[u.gpu] -= u.n_bytes


def _split_experts(units: list[_Unit], free: list[int]) -> None:
    """Single experts of the first units left on the CPU, into the space whole units left free."""
    for u in units:
        if u.gpu >= 0 or not u.expert_bytes:
            continue
        start = 0
        for g in sorted(range(len(free)), key=lambda g: -free[g]):
            count = min(free[g] // u.expert_bytes, u.n_experts - start)
            if count > 0:
                u.split[g] = range(start, start + count)
                free[g] -= count * u.expert_bytes
                start += count
        if start < u.n_experts:
            return                      # later units would only find crumbs


# --- building the placement ------------------------------------------------------------------

def _placement(inventory: Inventory, devices: Sequence, gpus: list, cpu: str, slots: list[_Slot],
               plan: _Plan, units: list[_Unit]) -> Placement:
    layer_devices = [gpus[plan.homes[s.index]].name if s.index in plan.homes else cpu for s in slots]
    placement = Placement(inventory, devices, layer_devices)
    for u in units:
        target = gpus[u.gpu].name if u.gpu >= 0 else cpu
        for name in u.names:
            placement.assign(TensorRef(name), target)
            for g, experts in u.split.items():
                placement.assign(TensorRef(name, frozenset(experts)), gpus[g].name)
    return placement


def _gpus_fit(estimate: MemoryEstimate, gpus: list) -> bool:
    names = {d.name for d in gpus}
    return all(d.fits for d in estimate.devices if d.device in names)


# --- the one-line explanation ----------------------------------------------------------------

def layer_ranges(layers: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> '3–5, 9'."""
    return format_ranges(layers, dash="–", sep=", ")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def explain(inventory: Inventory, placement: Placement, estimate: MemoryEstimate, devices: Sequence,
            first_gpu_slot: int) -> str:
    """One line: where the dense part, the KV cache and the routed experts ended up, and what is left."""
    gpus = [d for d in devices if d.is_gpu]
    if not gpus:
        return "No GPU: everything on the CPU."
    n_layer = inventory.n_layer
    used = sorted({placement.layer_devices[s] for s in range(first_gpu_slot, n_layer + 1)} & {d.name for d in gpus})
    if first_gpu_slot > n_layer:
        parts = ["Nothing fits on the GPUs (each needs room for its CUDA context and compute buffers): "
                 "everything on the CPU"]
    elif first_gpu_slot == n_layer:
        parts = [f"Only the output layer fits on {used[0]}; all layers on the CPU"]
    elif first_gpu_slot > 0:
        parts = [f"Layers {first_gpu_slot}–{n_layer - 1} and the output on {_plural(len(used), 'GPU')}; "
                 f"layers {layer_ranges(range(first_gpu_slot))} entirely on the CPU (-ngl {n_layer + 1 - first_gpu_slot})"]
    else:
        parts = [f"All attention, KV and dense weights on {_plural(len(used), 'GPU')}"]
    experts = _expert_summary(inventory, placement, {d.name for d in gpus}) if first_gpu_slot <= n_layer else ""
    if experts:
        parts.append(experts)
    fitting = [d for d in estimate.devices if d.device in {g.name for g in gpus}]
    for d in fitting:
        if not d.fits:      # what is left is the compute buffer, which weights on the CPU do not shrink
            parts.append(f"{d.device} is {format_bytes(-d.free_bytes)} short even so: llama.cpp's compute buffer "
                         f"there ({format_bytes(d.compute_bytes)}) holds a copy of each CPU weight whose matmul it "
                         f"offloads; a ubatch under 32 tokens or --no-op-offload avoids that")
    roomiest = max(fitting, key=lambda d: d.free_bytes)
    if roomiest.free_bytes >= 0:
        parts.append(f"{format_bytes(roomiest.free_bytes)} free on {roomiest.device}")
    cpu = [d for d in estimate.devices if d.device not in {g.name for g in gpus}]
    if cpu and not cpu[0].fits:
        parts.append(f"the CPU needs {format_bytes(-cpu[0].free_bytes)} more than its RAM")
    return "; ".join(parts) + "."


def _expert_summary(inventory: Inventory, placement: Placement, gpu_names: set[str]) -> str:
    on_gpu, total, full, partial, cpu_only = 0, 0, [], [], []
    for layer in inventory.layers:
        layer_total = layer_gpu = 0
        for t in layer.tensors:
            if t.role is Role.ROUTED_EXPERTS and t.n_experts:
                layer_total += t.n_bytes
                layer_gpu += sum(n for d, n in placement.device_bytes(t.name).items() if d in gpu_names)
        if not layer_total:
            continue
        total += layer_total
        on_gpu += layer_gpu
        (full if layer_gpu == layer_total else cpu_only if layer_gpu == 0 else partial).append(layer.index)
    if not total:
        return ""
    if not partial and not cpu_only:
        return "all routed experts on GPUs"
    if not partial and not full:
        return "routed experts on the CPU"
    pieces = []
    if full:
        pieces.append(f"{layer_ranges(full)} on GPUs")
    if partial:
        pieces.append(f"{layer_ranges(partial)} partly")
    if cpu_only:
        pieces.append(f"{layer_ranges(cpu_only)} on CPU")
    pieces[0] = f"routed experts of layer{'s' if len(full) + len(partial) + len(cpu_only) > 1 else ''} " + pieces[0]
    return ", ".join(pieces) + f" ({100 * on_gpu / total:.0f}% of expert bytes on GPU)"


def verdict(estimate: MemoryEstimate) -> str:
    """One line for the plan as it stands: "Fits: ..." or "Does not fit: CUDA2 over by 5.6 GiB, ..."."""
    over = [d for d in estimate.devices if not d.fits]
    if over:
        return "Does not fit: " + ", ".join(f"{d.device} over by {format_bytes(-d.free_bytes)}" for d in over) + "."
    tightest = min(estimate.devices, key=lambda d: d.free_bytes)
    return f"Fits: every device within its memory; least room on {tightest.device}, {format_bytes(tightest.free_bytes)} free."
