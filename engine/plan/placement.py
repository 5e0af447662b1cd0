r"""Which device holds each tensor, and for routed-expert tensors, each expert.

A placement starts from llama.cpp's own model of a run: each repeating layer, and the output
layer, has a device (what `-ngl`/`-ts` decide, `layer_devices`), the input layer (`token_embd`)
stays on the CPU, and ordered `(regex, device)` rules override single tensors exactly like
`-ot`: regex *search* on the tensor name, first match wins. On top of that the designer moves
tensors or single experts; per-device weight totals are kept up to date on every move, so a
drag can re-estimate memory on each mouse move.

Saved form (`to_dict`): the layer devices and rules it was built from, the tensors moved away
from what those give, and per-expert devices only for tensors split over several devices.

The rules that express a placement (`synthesize_rules`: the tensors a layer split leaves in the
wrong place, as few, short regexes) are engine.plan.rule_search's business.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

from engine.devices import Device
from engine.plan.inventory import Inventory, Role
from engine.plan.tensor_patterns import compile_pattern
from engine.units import format_ranges

INPUT_PREFIXES = ("token_embd", "pos_embd", "token_types")      # llama.cpp's input layer
OUTPUT_PREFIXES = ("output", "cls")                             # llama.cpp's output layer
SPLIT = -1              # marks a tensor whose experts are on several devices
INPUT_SLOT = -1
FORMAT = "offload-studio-placement"

Rule = tuple[str, str]  # (regex searched in the tensor name, device name)


@dataclass(frozen=True)
class TensorRef:
    """A tensor, optionally narrowed to some of its experts: the unit of placement."""
    name: str
    experts: frozenset[int] | None = None


class Moved(NamedTuple):
    """One piece that changed device; undo assigns `ref` back to `from_device`."""
    ref: TensorRef
    from_device: str
    to_device: str


class _Layout:
    """What a placement needs from an inventory, computed once per inventory."""

    def __init__(self, inventory: Inventory):
        n_layer = inventory.n_layer
        tensors = inventory.tensors
        self.n_layer = n_layer
        self.names = [t.name for t in tensors]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.n_bytes = [t.n_bytes for t in tensors]
        self.n_experts = [t.n_experts for t in tensors]
        self.expert_bytes = [t.expert_bytes if t.n_experts else 0 for t in tensors]
        # a remainder the experts do not divide evenly goes with expert 0
        self.expert_rem = [t.n_bytes - t.expert_bytes * t.n_experts if t.n_experts else 0 for t in tensors]
        self.slots = [tensor_slot(t.name, t.layer, n_layer) for t in tensors]
        self.home = [_home_tensor(self, inventory, il) for il in range(n_layer)]

    def bytes_of(self, i: int, experts: Iterable[int]) -> int:
        experts = list(experts)
        return self.expert_bytes[i] * len(experts) + (self.expert_rem[i] if 0 in experts else 0)


def tensor_slot(name: str, layer: int | None, n_layer: int) -> int:
    """llama.cpp's layer for a tensor: INPUT_SLOT, a repeating layer, or n_layer for the output."""
    if layer is not None:
        return min(layer, n_layer)
    if name.startswith(INPUT_PREFIXES):
        return INPUT_SLOT
    if name.startswith(OUTPUT_PREFIXES):
        return n_layer
    return 0    # e.g. rope_freqs: llama.cpp creates it with layer 0 and loads it there


def _home_tensor(layout: _Layout, inventory: Inventory, il: int) -> int:
    # the KV cache (or a DeltaNet layer's recurrent state) sits with the layer's attention (or
    # recurrent mixer); its largest tensor stands for all of it
    tensors = inventory.layers[il].tensors
    attention = [t for t in tensors if t.role in (Role.ATTENTION, Role.RECURRENT)] or tensors[:1]
    if not attention:
        return -1
    return layout.index[max(attention, key=lambda t: t.n_bytes).name]


_LAYOUTS: "weakref.WeakKeyDictionary[Inventory, _Layout]" = weakref.WeakKeyDictionary()


def _layout(inventory: Inventory) -> _Layout:
    layout = _LAYOUTS.get(inventory)
    if layout is None:
        layout = _LAYOUTS[inventory] = _Layout(inventory)
    return layout


def compile_rules(rules: Sequence[Rule]) -> list[tuple[re.Pattern, str]]:
    # RE2 where it can: a backtracking pattern would make matching every tensor name hang
    return [(compile_pattern(pattern), device) for pattern, device in rules]


def expert_ranges(experts: Iterable[int]) -> str:
    """{0, 1, 2, 7} -> '0-2,7'."""
    return format_ranges(experts)


def parse_expert_ranges(text: str) -> list[int]:
    experts = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        experts.extend(range(int(lo), int(hi or lo) + 1))
    return experts


def named_device(name: str) -> Device:
    """A device known only by its buffer name: the CPU, or a simulated GPU of unknown size."""
    return Device(name, "cpu", 0) if name == "CPU" else Device(name, "gpu", 0, "simulated", simulated=True)


class Placement:
    """Device of every tensor (and expert) of an inventory, over a list of devices."""

    def __init__(self, inventory: Inventory, devices: Sequence, layer_devices: Sequence[str] | None = None,
                 rules: Sequence[Rule] = ()):
        self.inventory = inventory
        self.devices = tuple(d if isinstance(d, Device) else named_device(d) for d in devices)
        self.device_names = tuple(d.name for d in self.devices)
        if not self.device_names:
            raise ValueError("a placement needs at least one device")
        self._dev_index = {name: i for i, name in enumerate(self.device_names)}
        self._layout = _layout(inventory)
        n_layer = self._layout.n_layer
        self.input_device = "CPU" if "CPU" in self._dev_index else self.device_names[0]
        if layer_devices is None:
            layer_devices = [self.input_device] * (n_layer + 1)
        if len(layer_devices) != n_layer + 1:
            raise ValueError(f"layer_devices needs {n_layer + 1} entries ({n_layer} layers and the output layer), "
                             f"got {len(layer_devices)}")
        self.layer_devices = tuple(layer_devices)
        self.rules = tuple((str(p), str(d)) for p, d in rules)
        for device in set(self.layer_devices) | {d for _, d in self.rules}:
            self.device_id(device)
        self._base = self._rule_devices()
        self._dev = list(self._base)
        self._experts: dict[int, list[int]] = {}
        self._weight = [0] * len(self.device_names)
        for i, d in enumerate(self._dev):
            self._weight[d] += self._layout.n_bytes[i]

    @classmethod
    def from_rules(cls, inventory: Inventory, devices: Sequence, layer_devices: Sequence[str],
                   rules: Sequence[Rule]) -> Placement:
        """llama.cpp's placement: layer devices, then `-ot`-style rules (first match wins)."""
        return cls(inventory, devices, layer_devices, rules)

    def _rule_devices(self) -> list[int]:
        compiled = [(p, self._dev_index[d]) for p, d in compile_rules(self.rules)]
        layer_ids = [self._dev_index[d] for d in self.layer_devices]
        input_id = self._dev_index[self.input_device]
        base = []
        for name, slot in zip(self._layout.names, self._layout.slots):
            device = input_id if slot == INPUT_SLOT else layer_ids[slot]
            for pattern, rule_device in compiled:
                if pattern.search(name):
                    device = rule_device
                    break
            base.append(device)
        return base

    # --- reading ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return self._layout.names

    @property
    def n_layer(self) -> int:
        return self._layout.n_layer

    @property
    def slots(self) -> list[int]:
        """Per tensor, in inventory order: INPUT_SLOT, its layer, or n_layer for the output layer."""
        return self._layout.slots

    def device_id(self, device: str) -> int:
        try:
            return self._dev_index[device]
        except KeyError:
            raise ValueError(f"unknown device {device!r}; available: {', '.join(self.device_names)}") from None

    def _tensor_id(self, name: str) -> int:
        try:
            return self._layout.index[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.inventory.name or 'this model'}") from None

    def device_of(self, name: str) -> str:
        """The tensor's device; for a tensor split over devices, the one holding most of its bytes."""
        i = self._tensor_id(name)
        d = self._dev[i]
        return self.device_names[d] if d != SPLIT else self._majority_device(i)

    def expert_devices(self, name: str) -> tuple[str, ...]:
        i = self._tensor_id(name)
        n = self._layout.n_experts[i]
        if self._dev[i] != SPLIT:
            return (self.device_names[self._dev[i]],) * n
        names = self.device_names
        return tuple(names[d] for d in self._experts[i])

    def is_split(self, name: str) -> bool:
        return self._dev[self._tensor_id(name)] == SPLIT

    def split_tensors(self) -> list[str]:
        return [self._layout.names[i] for i in sorted(self._experts)]

    def device_bytes(self, name: str) -> dict[str, int]:
        """Bytes of one tensor on each device that holds part of it."""
        i = self._tensor_id(name)
        if self._dev[i] != SPLIT:
            return {self.device_names[self._dev[i]]: self._layout.n_bytes[i]}
        by_device: dict[int, list[int]] = {}
        for e, d in enumerate(self._experts[i]):
            by_device.setdefault(d, []).append(e)
        return {self.device_names[d]: self._layout.bytes_of(i, es) for d, es in sorted(by_device.items())}

    def _majority_device(self, i: int) -> str:
        sizes = self.device_bytes(self._layout.names[i])
        return max(sizes, key=lambda d: (sizes[d], -self._dev_index[d]))

    def weight_bytes(self) -> dict[str, int]:
        return dict(zip(self.device_names, self._weight))

    def layer_home_device(self, il: int) -> str:
        """Device of the layer's attention: where llama.cpp keeps that layer's KV cache."""
        home = self._layout.home[il]
        return self.layer_devices[il] if home < 0 else self.device_of(self._layout.names[home])

    def output_device(self) -> str:
        for name in ("output.weight", "output_norm.weight"):
            if name in self._layout.index:
                return self.device_of(name)
        return self.layer_devices[-1]

    def tensor_devices(self) -> dict[str, str | tuple[str, ...]]:
        """Every tensor's device; a tuple of per-expert devices for split tensors."""
        return {name: self.expert_devices(name) if d == SPLIT else self.device_names[d]
                for name, d in zip(self._layout.names, self._dev)}

    # --- moving ----------------------------------------------------------------------------

    def assign(self, ref: TensorRef, device: str) -> list[Moved]:
        """Move a tensor or some of its experts; returns what moved, for undo."""
        i = self._tensor_id(ref.name)
        d = self.device_id(device)
        n = self._layout.n_experts[i]
        if ref.experts is not None and n == 0:
            raise ValueError(f"{ref.name} has no experts")
        if ref.experts is None:
            return self._assign_whole(i, d)
        bad = [e for e in ref.experts if not 0 <= e < n]
        if bad:
            raise ValueError(f"{ref.name} has experts 0..{n - 1}; got {sorted(bad)[:5]}")
        return self._assign_experts(i, ref.experts, d)

    def _assign_whole(self, i: int, d: int) -> list[Moved]:
        old = self._dev[i]
        if old == d:
            return []
        if old == SPLIT:
            return self._assign_experts(i, range(self._layout.n_experts[i]), d)
        self._weight[old] -= self._layout.n_bytes[i]
        self._weight[d] += self._layout.n_bytes[i]
        self._dev[i] = d
        return [Moved(TensorRef(self._layout.names[i]), self.device_names[old], self.device_names[d])]

    def _assign_experts(self, i: int, experts: Iterable[int], d: int) -> list[Moved]:
        per_expert = self._experts.get(i) or [self._dev[i]] * self._layout.n_experts[i]
        moved_from: dict[int, list[int]] = {}
        for e in experts:
            if per_expert[e] != d:
                moved_from.setdefault(per_expert[e], []).append(e)
                per_expert[e] = d
        name = self._layout.names[i]
        changes = []
        for old, es in sorted(moved_from.items()):
            moved_bytes = self._layout.bytes_of(i, es)
            self._weight[old] -= moved_bytes
            self._weight[d] += moved_bytes
            changes.append(Moved(TensorRef(name, frozenset(es)), self.device_names[old], self.device_names[d]))
        if per_expert.count(per_expert[0]) == len(per_expert):
            self._experts.pop(i, None)
            self._dev[i] = per_expert[0]
        else:
            self._experts[i] = per_expert
            self._dev[i] = SPLIT
        return changes

    # --- copies, comparison, saving --------------------------------------------------------

    def copy(self) -> Placement:
        other = object.__new__(Placement)
        other.__dict__.update(self.__dict__)
        other._dev = list(self._dev)
        other._experts = {i: list(es) for i, es in self._experts.items()}
        other._weight = list(self._weight)
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (self._layout.names == other._layout.names and self.device_names == other.device_names
                and self._dev == other._dev and self._experts == other._experts)

    __hash__ = None     # mutable

    def __repr__(self) -> str:
        sizes = ", ".join(f"{d}={b / (1 << 30):.2f}GiB" for d, b in self.weight_bytes().items())
        return f"Placement({self.inventory.name or self.inventory.arch}: {sizes}, {len(self._experts)} split)"

    def to_dict(self) -> dict:
        names, dev_names = self._layout.names, self.device_names
        exceptions = {names[i]: dev_names[d] for i, d in enumerate(self._dev) if d not in (SPLIT, self._base[i])}
        experts = {}
        for i, per_expert in sorted(self._experts.items()):
            by_device: dict[str, list[int]] = {}
            for e, d in enumerate(per_expert):
                by_device.setdefault(dev_names[d], []).append(e)
            experts[names[i]] = {dev: expert_ranges(es) for dev, es in by_device.items()}
        return {"format": FORMAT, "version": 1, "model": self.inventory.name, "devices": list(dev_names),
                "layer_devices": list(self.layer_devices), "rules": [list(r) for r in self.rules],
                "exceptions": exceptions, "experts": experts}

    @classmethod
    def from_dict(cls, inventory: Inventory, devices: Sequence, data: dict) -> Placement:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a saved placement (format {data.get('format')!r}, expected {FORMAT!r})")
        placement = cls(inventory, devices, data["layer_devices"], [tuple(r) for r in data.get("rules", [])])
        for name, device in data.get("exceptions", {}).items():
            placement.assign(TensorRef(name), device)
        for name, by_device in data.get("experts", {}).items():
            for device, ranges in by_device.items():
                placement.assign(TensorRef(name, frozenset(parse_expert_ranges(ranges))), device)
        return placement
