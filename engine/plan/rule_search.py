r"""Rules for a placement: the tensors a layer split leaves in the wrong place, as few, short regexes.

`synthesize_rules` covers them with `-ot`-style rules (`blk\.[4-6][0-9]\.ffn_.*_exps`) and
command-line shorthands (`RuleMacro`: `--cpu-moe`, `--n-cpu-moe 20`); engine.plan.llama_args uses it to
write a placement as llama.cpp arguments.

It lives apart from engine.plan.placement because a placement never needs it. It reads placements
but imports engine.plan.placement only for type annotations, so the import points one way.
"""
from __future__ import annotations

import itertools
import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from engine.plan.inventory import Inventory
    from engine.plan.placement import Placement, Rule

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
