r"""Which device holds each tensor, and for routed-expert tensors, each expert.

A placement starts from llama.cpp's own model of a run: each repeating layer, and the output
layer, has a device (what `-ngl`/`-ts` decide, `layer_devices`), the input layer (`token_embd`)
stays on the CPU, and ordered `(regex, device)` rules override single tensors exactly like
`-ot`: regex *search* on the tensor name, first match wins. On top of that the designer moves
tensors or single experts; per-device weight totals are kept up to date on every move, so a
drag can re-estimate memory on each mouse move.

Saved form (`to_dict`): the layer devices and rules it was built from, the tensors moved away
from what those give, and per-expert devices only for tensors split over several devices.

The last section finds rules for a placement (`synthesize_rules`): the tensors a layer split
leaves in the wrong place, covered by few, short regexes (`blk\.[4-6][0-9]\.ffn_.*_exps`).
"""
from __future__ import annotations

import itertools
import re
import weakref
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from engine.devices import Device
from engine.inventory import Inventory, Role

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
    # the KV cache sits with the layer's attention; its largest tensor stands for all of it
    tensors = inventory.layers[il].tensors
    attention = [t for t in tensors if t.role is Role.ATTENTION] or tensors[:1]
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
    compiled = []
    for pattern, device in rules:
        try:
            compiled.append((re.compile(pattern), device))
        except re.error as e:
            raise ValueError(f"invalid tensor pattern {pattern!r}: {e}") from None
    return compiled


def expert_ranges(experts: Iterable[int]) -> str:
    """{0, 1, 2, 7} -> '0-2,7'."""
    out, run = [], []
    for e in sorted(experts):
        if run and e == run[-1] + 1:
            run.append(e)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [e]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


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


# --- rules from a placement: the exceptions to a layer split, as few short regexes -------------

LAYER_NAME_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
OT_OVERHEAD = len("-ot ")
MAX_PINS = 4            # exact rules one broad rule may lean on


@dataclass(frozen=True)
class RuleMacro:
    """A command-line shorthand standing for rules (`--cpu-moe`, `--n-cpu-moe 20`)."""
    text: str               # as written on the command line
    kind_regex: str         # searched in `blk.<il>.<suffix>`: the tensor kinds it moves
    layers: range | None    # None: every layer
    device: str


def range_regex(lo: int, hi: int) -> list[str]:
    """Alternatives that match exactly the decimal numbers lo..hi: (40, 60) -> ['[45][0-9]', '60']."""
    pieces = []
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)
        pieces += _same_width(str(lo), str(top))
        lo = top + 1
    return pieces


def _digit_class(a: int, b: int) -> str:
    return str(a) if a == b else f"[{a}{b}]" if b == a + 1 else f"[{a}-{b}]"


def _same_width(lo: str, hi: str) -> list[str]:
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [_digit_class(int(lo), int(hi))]
    if lo[0] == hi[0]:
        return [lo[0] + p for p in _same_width(lo[1:], hi[1:])]
    rest = len(lo) - 1
    first, last, head, tail = int(lo[0]), int(hi[0]), [], []
    if lo[1:] != "0" * rest:
        head, first = [lo[0] + p for p in _same_width(lo[1:], "9" * rest)], first + 1
    if hi[1:] != "9" * rest:
        tail, last = [hi[0] + p for p in _same_width("0" * rest, hi[1:])], last - 1
    middle = [_digit_class(first, last) + "[0-9]" * rest] if first <= last else []
    return head + middle + tail


def _interval_pieces(lo: int, hi: int | None) -> list[str]:
    return ["[0-9]+"] if hi is None else range_regex(lo, hi)


def layers_regex(intervals: Sequence[tuple[int, int | None]]) -> str:
    pieces = [p for lo, hi in intervals for p in _interval_pieces(lo, hi)]
    return pieces[0] if len(pieces) == 1 else "(" + "|".join(pieces) + ")"


def _run_interval(lo_run: int, hi_run: int, covered: np.ndarray, open_end: bool) -> tuple[int, int | None]:
    """The shortest-written interval inside a run of allowed layers that holds all its covered ones."""
    idx = np.flatnonzero(covered)
    first, last = lo_run + int(idx[0]), lo_run + int(idx[-1])
    his: set[int | None] = {hi_run, last}
    if open_end:    # layers past the last one do not exist, so the interval may run on past it
        his |= {(hi_run // 10 + 1) * 10 - 1, 10 ** len(str(hi_run)) - 1}
        if lo_run == 0:
            his.add(None)
    options = [(lo, hi) for lo in {lo_run, first} for hi in his if hi is not None or lo == 0]
    return min(options, key=lambda o: (len(layers_regex([o])), o[0] != first, o[1] != last,
                                       10 ** 9 if o[1] is None else o[1]))


def _cover_intervals(cover: np.ndarray, forbid: np.ndarray, open_end: bool) -> list[tuple[int, int | None]]:
    n, out, start = len(cover), [], 0
    while start < n:
        if forbid[start]:
            start += 1
            continue
        end = start
        while end + 1 < n and not forbid[end + 1]:
            end += 1
        if cover[start:end + 1].any():
            out.append(_run_interval(start, end, cover[start:end + 1], open_end and end == n - 1))
        start = end + 1
    return out


def _kind_classes(kinds: list[str], global_names: list[str]) -> list[tuple[np.ndarray, str, str | None]]:
    """Groups of per-layer tensor kinds a regex can name: (mask over kinds, fragment after blk.N., bare form)."""
    mids = sorted({m.group(1) for k in kinds if (m := re.match(r"ffn_(\w+?)_exps\.", k))})
    specs = [("", [r"blk\."]), ("ffn_.*_exps", ["exps"])]
    specs += [(f"ffn_({a}|{b})_exps", [f"ffn_({a}|{b})_exps"]) for a, b in itertools.combinations(mids, 2)]
    specs += [("ffn_.*_shexp", ["shexp"]), ("attn_", ["attn_"]), (r"ffn_(up|gate|down)\.", [r"ffn_(up|gate|down)\."]),
              ("ffn_", [])]
    stems = sorted({k.rsplit(".", 1)[0] for k in kinds})
    specs += [(re.escape(s) + r"\.", [re.escape(s), re.escape(s) + r"\."]) for s in stems]
    specs += [(re.escape(k) + "$", [re.escape(k) + "$"]) for k in kinds]
    classes, seen = [], set()
    for anchored, bares in specs:
        mask = np.array([bool(re.match(anchored, k)) for k in kinds])
        if not mask.any() or mask.tobytes() in seen:
            continue
        seen.add(mask.tobytes())
        bare = next((b for b in bares if _bare_matches(b, kinds, global_names, mask)), None)
        classes.append((mask, anchored, bare))
    return classes


def _bare_matches(bare: str, kinds: list[str], global_names: list[str], mask: np.ndarray) -> bool:
    return (all(bool(re.search(bare, "blk.0." + k)) == m for k, m in zip(kinds, mask))
            and not any(re.search(bare, g) for g in global_names))


def _global_rules(global_ids: list[int], names: list[str], targets: list[str], base: list[str]) -> list[Rule]:
    """Short patterns for the tensors outside the layers (`^output` takes output and output_norm)."""
    rules, settled = [], set()
    for i in global_ids:
        if targets[i] == base[i] or i in settled:
            continue
        stem = names[i].rsplit(".", 1)[0]
        candidates = sorted({"^" + re.escape(stem.split("_")[0]), re.escape(stem), "^" + re.escape(stem) + r"\.",
                             "^" + re.escape(names[i]) + "$"}, key=len)
        for pattern in candidates:
            matched = [j for j, other in enumerate(names) if re.search(pattern, other)]
            if all(targets[j] == targets[i] for j in matched):
                break
        settled.update(matched)
        rules.append((pattern, targets[i]))
    return rules


class _Shape:
    """What rule search needs from an inventory, computed once: a (layer x kind) grid of tensors."""

    def __init__(self, placement: Placement):
        layer_ids, kind_names, tensor_ids, self.global_ids = [], [], [], []
        for i, name in enumerate(placement.names):
            m = LAYER_NAME_RE.match(name)
            if m and int(m.group(1)) < placement.n_layer:
                layer_ids.append(int(m.group(1)))
                kind_names.append(m.group(2))
                tensor_ids.append(i)
            else:
                self.global_ids.append(i)
        self.kinds = sorted(set(kind_names))
        kind_id = {k: j for j, k in enumerate(self.kinds)}
        self.cells = (np.array(layer_ids, dtype=int), np.array([kind_id[k] for k in kind_names], dtype=int))
        self.tensor_ids = np.array(tensor_ids, dtype=int)
        self.global_names = [placement.names[i] for i in self.global_ids]
        self.classes = _kind_classes(self.kinds, self.global_names)
        self.open_end = not any(n.startswith("blk.") for n in self.global_names)
        self.pin_fragment = [_pin_fragment(k, self.kinds) for k in self.kinds]
        self.macro_masks: dict[str, np.ndarray] = {}

    def macro_mask(self, kind_regex: str) -> np.ndarray:
        if kind_regex not in self.macro_masks:
            self.macro_masks[kind_regex] = np.array([bool(re.search(kind_regex, "blk.0." + k)) for k in self.kinds],
                                                    dtype=bool)
        return self.macro_masks[kind_regex]


def _pin_fragment(kind: str, kinds: list[str]) -> str:
    """The shortest of stem, stem + dot, full suffix that names this kind alone within a layer."""
    stem = kind.rsplit(".", 1)[0]
    for fragment in (re.escape(stem), re.escape(stem) + r"\."):
        if [k for k in kinds if re.match(fragment, k)] == [kind]:
            return fragment
    return re.escape(kind)


_SHAPES: "weakref.WeakKeyDictionary[Inventory, _Shape]" = weakref.WeakKeyDictionary()


@dataclass
class _Candidate:
    score: tuple[float, int]
    device: int
    rule: Rule | None
    macro: RuleMacro | None
    layers: np.ndarray
    mask: np.ndarray
    pins: list[tuple[int, int]]


class _Search:
    """Greedy set cover of the tensors to move: each round takes the candidate that moves the
    most tensors per character of command line."""

    def __init__(self, placement: Placement, shape: _Shape, targets: list[str], base: list[str]):
        self.placement, self.shape = placement, shape
        dev_ids = np.array([placement.device_id(targets[i]) for i in shape.tensor_ids], dtype=int)
        self.target = np.full((placement.n_layer, len(shape.kinds)), -1)
        self.target[shape.cells] = dev_ids
        self.todo = np.zeros(self.target.shape, dtype=bool)     # tensors not yet where they should be
        self.todo[shape.cells] = [targets[i] != base[i] for i in shape.tensor_ids]
        self.pinned = np.zeros(self.target.shape, dtype=bool)   # held by an exact rule ahead of all others
        self.memo: dict[tuple, tuple[bytes, list]] = {}

    def pin_rule(self, cell: tuple[int, int]) -> Rule:
        il, k = cell
        return rf"blk\.{il}\.{self.shape.pin_fragment[k]}", self.placement.device_names[self.target[il, k]]

    def run(self, macros: Sequence[RuleMacro], have_rules: bool) -> list[_Candidate]:
        exceptions, chosen = self.todo.copy(), []
        while self.todo.any():
            best = self.best_candidate(macros, have_rules or bool(chosen))
            self.todo[np.ix_(best.layers, best.mask)] = False
            for cell in best.pins:
                self.pinned[cell], self.todo[cell] = True, False
            chosen.append(best)
        return _prune(chosen, exceptions, self.target)

    def best_candidate(self, macros: Sequence[RuleMacro], have_rules: bool) -> _Candidate:
        best = None
        present = self.target >= 0
        for d in np.unique(self.target[self.todo]):
            device = self.placement.device_names[d]
            todo = self.todo & (self.target == d)
            wrong = present & (self.target != d) & ~self.pinned
            rule_cost = len(device) + 2 + (0 if have_rules else OT_OVERHEAD)
            for c, with_pins in itertools.product(range(len(self.shape.classes)), (False, True)):
                for pattern, layers, pins, pin_cost in self.class_options(d, c, with_pins, todo, wrong):
                    best = self.better(best, todo, _Candidate((0, 0), d, (pattern, device), None, layers,
                                                              self.shape.classes[c][0], pins),
                                       len(pattern) + rule_cost + pin_cost)
            for macro in macros:
                best = self.macro_option(best, macro, d, device, todo, wrong)
        return best

    def class_options(self, d, c, with_pins, todo, wrong) -> list:
        mask, anchored, bare = self.shape.classes[c]
        key = (d, c, with_pins)
        inputs = todo[:, mask].tobytes() + wrong[:, mask].tobytes()
        if key in self.memo and self.memo[key][0] == inputs:
            return self.memo[key][1]
        options = []
        for pattern, layers in _class_rules(todo, wrong, mask, anchored, bare, self.shape.open_end, with_pins):
            pins = [tuple(int(x) for x in cell) for cell in np.argwhere(wrong & layers[:, None] & mask[None, :])]
            if len(pins) <= MAX_PINS:
                options.append((pattern, layers, pins, sum(len(p) + len(dv) + 2 for p, dv in map(self.pin_rule, pins))))
        self.memo[key] = (inputs, options)
        return options

    def macro_option(self, best, macro: RuleMacro, d: int, device: str, todo, wrong):
        mask = self.shape.macro_mask(macro.kind_regex)
        if macro.device != device or not mask.any():
            return best
        layers = np.zeros(len(todo), dtype=bool)
        layers[macro.layers if macro.layers is not None else slice(None)] = True
        if wrong[np.ix_(layers, mask)].any():
            return best
        return self.better(best, todo, _Candidate((0, 0), d, None, macro, layers, mask, []), len(macro.text) + 1)

    def better(self, best: _Candidate | None, todo: np.ndarray, candidate: _Candidate, cost: int):
        covered = int(todo[np.ix_(candidate.layers, candidate.mask)].sum()) + sum(
            int(self.todo[cell]) for cell in candidate.pins)
        if covered == 0:
            return best
        candidate.score = (covered / cost, covered)
        return candidate if best is None or candidate.score > best.score else best


def synthesize_rules(placement: Placement, targets: list[str], base: list[str],
                     macros: Sequence[RuleMacro] = ()) -> tuple[list[Rule], list[RuleMacro]]:
    """Rules (and shorthands) that move each tensor from `base` to `targets`, in little text.

    A rule only matches tensors that belong on its device, or tensors "pinned" by an exact rule
    that comes first (the carve-out users write as a narrow rule ahead of `exps=CPU`). After the
    greedy cover, rules the later ones made redundant are dropped.
    """
    shape = _SHAPES.get(placement.inventory)
    if shape is None:
        shape = _SHAPES[placement.inventory] = _Shape(placement)
    rules = _global_rules(shape.global_ids, placement.names, targets, base)
    search = _Search(placement, shape, targets, base)
    if not search.todo.any():
        return rules, []
    chosen, pin_cells = search.run(macros, bool(rules))
    pins = [search.pin_rule(cell) for cell in pin_cells]
    return pins + rules + [c.rule for c in chosen if c.rule], [c.macro for c in chosen if c.macro]


def _class_rules(todo, wrong, mask, anchored, bare, open_end: bool, with_pins: bool) -> list[tuple[str, np.ndarray]]:
    """(pattern, layers it covers) for one kind class; `with_pins` lets it cover wrong layers too."""
    n_layer = len(todo)
    need, forbid = todo[:, mask].any(1), wrong[:, mask].any(1)
    if with_pins:
        spanned = np.flatnonzero(need)
        if not forbid.any() or not len(spanned) or \
                wrong[spanned[0]:spanned[-1] + 1][:, mask].sum() > MAX_PINS:
            return []       # without pins it is the same and cheaper, or it needs too many
        forbid = np.zeros(n_layer, dtype=bool)
    if not (need & ~forbid).any():
        return []
    intervals = _cover_intervals(need & ~forbid, forbid, open_end)
    layers = np.zeros(n_layer, dtype=bool)
    for lo, hi in intervals:
        layers[lo:(n_layer if hi is None else hi + 1)] = True
    options = [(rf"blk\.{layers_regex(intervals)}\." + anchored, layers)]
    if bare and not forbid.any():
        options.append((bare, np.ones(n_layer, dtype=bool)))
    return options


def _prune(chosen: list[_Candidate], exceptions: np.ndarray, target: np.ndarray):
    """Drop rules whose moves the others also make, then pins no rule needs any more."""
    pinned = np.zeros(target.shape, dtype=bool)
    for c in chosen:
        for cell in c.pins:
            pinned[cell] = True
    nothing = np.zeros(target.shape, dtype=bool)
    moves = {id(c): _matches(c, target) & (target == c.device) & ~pinned for c in chosen}
    kept = list(chosen)
    for c in reversed(chosen):
        others = np.logical_or.reduce([moves[id(o)] for o in kept if o is not c] + [nothing])
        if not (moves[id(c)] & exceptions & ~others).any():
            kept.remove(c)
    wrong = np.logical_or.reduce([_matches(c, target) & (target != c.device) for c in kept] + [nothing])
    moved = np.logical_or.reduce([moves[id(c)] for c in kept] + [nothing])
    pin_cells = sorted({cell for c in chosen for cell in c.pins if wrong[cell] or exceptions[cell] and not moved[cell]})
    return kept, pin_cells


def _matches(c: _Candidate, target: np.ndarray) -> np.ndarray:
    matched = np.zeros(target.shape, dtype=bool)
    matched[np.ix_(c.layers, c.mask)] = True
    return matched & (target >= 0)
