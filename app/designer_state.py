"""The designer's controller: one model's placement, run settings and devices, the undo stack of
moves, the memory estimate, and the llama.cpp command line kept in step with them.

No widgets here. Views bind the Qt models of `app/models/designer.py` and call these methods;
every change comes back out as a signal:

    placement_changed(moved)     list[Moved] for a move or its undo; None when the whole placement changed
    estimate_changed(estimate)   after every change, synchronously (it costs about a millisecond)
    preview_changed(estimate)    while a drag hovers a device: the estimate if it were dropped; None after
    command_line_changed(cl)     CommandLine, a moment after the last change (emission is the slow part)
    verdict_changed(text, fits)  the one-line verdict for the plan as it stands, after every change

A pasted command line starts from llama.cpp's (or ik_llama.cpp's) defaults, as the tool would
run it; the line shown is complete (`-m`, settings, `--override-kv`), so copying it runs this plan.

The last plan of each model is remembered under the user's config folder, keyed by the model
file's name and size, and comes back when that model is opened again.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from platformdirs import user_config_dir
from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtGui import QUndoCommand, QUndoStack

from engine.plan.autofit import DEFAULT_GPU_MARGIN_BYTES, AutoFitOptions, auto_fit, verdict
from engine.synth.default_model import APP_NAME
from engine.devices import Device
from engine.plan.inventory import Inventory
from engine.plan.llama_args import DIALECTS, LLAMA_CPP, emit_llama_args, parse_llama_args
from engine.plan.memory import MemoryEstimate, MemoryOptions, estimate_memory, hybrid_kv_cache_note
from engine.plan.placement import Moved, Placement, TensorRef
from engine.plan.plan_file import MissingDeviceError, Plan, PlanFileError, read_plan, write_plan
from engine.run_config import RunConfig

log = logging.getLogger(__name__)

SYNC_DELAY_MS = 60          # the command line follows a burst of moves once, not on every one
CPU = "CPU"


@dataclass(frozen=True)
class CommandLine:
    text: str
    exact: bool                 # False: the plan splits experts, which llama.cpp cannot express
    notes: tuple[str, ...]


def model_key(path: str | Path) -> str:
    """A file name for a model's remembered plan: its file name and size."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{path.name}-{size}")


def default_state_dir() -> Path:
    return Path(user_config_dir(APP_NAME)) / "placements"


def next_gpu_name(devices: Sequence[Device]) -> str:
    taken = {d.name for d in devices}
    return next(f"CUDA{i}" for i in range(len(devices) + 1) if f"CUDA{i}" not in taken)


def remap_placement(placement: Placement, inventory: Inventory, devices: Sequence[Device]) -> Placement:
    """The same plan over another device list; whatever sat on a device that is gone goes to the CPU."""
    names = {d.name for d in devices}
    cpu = CPU if CPU in names else devices[0].name

    def keep(device: str) -> str:
        return device if device in names else cpu

    data = placement.to_dict()
    data["layer_devices"] = [keep(d) for d in data["layer_devices"]]
    data["rules"] = [[p, keep(d)] for p, d in data["rules"]]
    data["exceptions"] = {n: keep(d) for n, d in data["exceptions"].items()}
    experts: dict[str, dict[str, str]] = {}
    for name, by_device in data["experts"].items():
        merged: dict[str, list[str]] = {}
        for device, ranges in by_device.items():
            merged.setdefault(keep(device), []).append(ranges)
        experts[name] = {d: ",".join(r) for d, r in merged.items()}
    data["experts"] = experts
    return Placement.from_dict(inventory, devices, data)


def _weight_delta(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(max(after[d] - before.get(d, 0), 0) for d in after)


class MoveCommand(QUndoCommand):
    """Moves already applied to the placement; undo sends each piece back where it came from."""

    def __init__(self, state: DesignerState, moved: list[Moved], text: str):
        super().__init__(text)
        self.state = state
        self.moved = moved
        self._applied = True

    def redo(self) -> None:
        if self._applied:       # QUndoStack.push calls redo; the moves are already made
            self._applied = False
            return
        for m in self.moved:
            self.state.placement.assign(m.ref, m.to_device)
        self.state._placement_edited(self.moved)

    def undo(self) -> None:
        for m in reversed(self.moved):
            self.state.placement.assign(m.ref, m.from_device)
        self.state._placement_edited([Moved(m.ref, m.to_device, m.from_device) for m in reversed(self.moved)])


@dataclass(frozen=True)
class Snapshot:
    placement: Placement
    run_config: RunConfig
    explanation: str


class SnapshotCommand(QUndoCommand):
    """A change of the whole plan (auto-fit, a command line, a loaded file, a run setting)."""

    def __init__(self, state: DesignerState, before: Snapshot, after: Snapshot, text: str):
        super().__init__(text)
        self.state, self.before, self.after = state, before, after

    def redo(self) -> None:
        self.state._restore(self.after)

    def undo(self) -> None:
        self.state._restore(self.before)


class DesignerState(QObject):
    model_changed = Signal()                # a new model or device list: models reset, views rebuild
    placement_changed = Signal(object)      # list[Moved], or None when everything may have changed
    estimate_changed = Signal(object)       # MemoryEstimate
    preview_changed = Signal(object)        # MemoryEstimate of a hovering drag, or None
    run_config_changed = Signal(object)     # RunConfig
    command_line_changed = Signal(object)   # CommandLine
    command_error = Signal(str)             # a command line that could not be read; the plan is unchanged
    explanation_changed = Signal(str)       # auto-fit's one line ("" when the plan was edited since)
    devices_changed = Signal(object)        # list[Device]
    verdict_changed = Signal(str, bool)     # "Fits: ..." / "Does not fit: CUDA2 over by 5.6 GiB", fits
    message = Signal(str)                   # a notice for the user (a plan restored, a plan not loadable)

    def __init__(self, state_dir: Path | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.inventory: Inventory | None = None
        self.devices: list[Device] = []
        self.placement: Placement | None = None
        self.run_config = RunConfig()
        self.memory_options = MemoryOptions(gpu_margin_bytes=DEFAULT_GPU_MARGIN_BYTES)
        self.allow_expert_split = False
        self.estimate: MemoryEstimate | None = None
        self.command_line = CommandLine("", True, ())
        self.explanation = ""
        self.model_key: str | None = None
        self.model_path: str | None = None          # -m of the emitted line
        self.override_kv: tuple[str, ...] = ()      # --override-kv the open model was opened with
        self.dialect = LLAMA_CPP                    # or "ik_llama.cpp"
        self.verdict = ""
        self.placement_was_restored = False
        self.undo_stack = QUndoStack(self)
        self._sync_timer = QTimer(self, singleShot=True, interval=SYNC_DELAY_MS)
        self._sync_timer.timeout.connect(self.sync_command_line)

    # --- opening -------------------------------------------------------------------------------

    def set_model(self, inventory: Inventory | None, devices: Sequence[Device], model_key: str | None = None,
                  model_path: str | Path | None = None, override_kv: Sequence[str] = ()) -> None:
        """Show `inventory` on `devices`: the remembered plan for `model_key` if there is one, else auto-fit."""
        self._sync_timer.stop()
        self.inventory, self.devices, self.model_key = inventory, list(devices), model_key
        self.model_path = str(model_path) if model_path else None
        self.override_kv = tuple(str(o) for o in override_kv)
        self.undo_stack.clear()
        self.placement, self.estimate, self.explanation = None, None, ""
        self.command_line = CommandLine("", True, ())
        if inventory is not None:
            if not self._restore_remembered():
                self._fit_silently()
            self._recompute()
        self.model_changed.emit()
        self.devices_changed.emit(self.devices)
        self._after_whole_change()
        if inventory is not None:
            self.sync_command_line()

    def set_devices(self, devices: Sequence[Device]) -> None:
        """Plan for another device list: refit an untouched plan, else keep it and send the orphans to the CPU."""
        devices = list(devices)
        if devices == self.devices:
            return
        untouched = self.undo_stack.count() == 0
        removed = {d.name for d in self.devices} - {d.name for d in devices}
        self.devices = devices
        if self.inventory is not None:
            if untouched and not self.placement_was_restored:
                if not self._restore_remembered():      # its GPUs may only now have been found
                    self._fit_silently()
            else:
                self.placement = remap_placement(self.placement, self.inventory, devices)
            if removed:         # undo steps may name the devices that are gone
                self.undo_stack.clear()
            self._recompute()
        self.model_changed.emit()
        self.devices_changed.emit(self.devices)
        self._after_whole_change()

    def add_simulated_gpu(self, capacity_bytes: int) -> Device:
        if capacity_bytes <= 0:
            raise ValueError("a GPU needs a capacity above zero")
        device = Device(next_gpu_name(self.devices), "gpu", int(capacity_bytes), "simulated", simulated=True)
        self.set_devices([*self.devices, device])
        return device

    def remove_device(self, name: str) -> None:
        if name == CPU:
            raise ValueError("the CPU cannot be removed")
        self.set_devices([d for d in self.devices if d.name != name])

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    @property
    def gpus(self) -> list[Device]:
        return [d for d in self.devices if d.is_gpu]

    # --- moving --------------------------------------------------------------------------------

    def move(self, refs: Iterable[TensorRef], device: str, text: str | None = None) -> int:
        """Move tensors or experts to `device` as one undo step; returns the bytes that changed device."""
        if self.placement is None:
            return 0
        refs = list(refs)
        self.placement.device_id(device)        # an unknown device raises before anything moves
        before = self.placement.weight_bytes()
        moved = [m for ref in refs for m in self.placement.assign(ref, device)]
        if not moved:
            return 0
        moved_bytes = _weight_delta(before, self.placement.weight_bytes())
        self.undo_stack.push(MoveCommand(self, moved, text or _move_text(refs, device)))
        self._placement_edited(moved)
        return moved_bytes

    def preview(self, refs: Iterable[TensorRef] | None, device: str | None = None) -> MemoryEstimate | None:
        """The estimate if `refs` went to `device` (a drag hovering a lane); None clears the preview."""
        if refs is None or self.placement is None:
            self.preview_changed.emit(None)
            return None
        trial = self.placement.copy()
        for ref in refs:
            trial.assign(ref, device)
        estimate = estimate_memory(self.inventory, trial, self.run_config, self.devices, self.memory_options)
        self.preview_changed.emit(estimate)
        return estimate

    def _placement_edited(self, moved: list[Moved]) -> None:
        self._set_explanation("")
        self._recompute()
        self.placement_changed.emit(moved)
        self._sync_timer.start()

    # --- whole-plan changes --------------------------------------------------------------------

    def auto_fit(self) -> str:
        """Replace the plan with auto-fit's (one undo step); returns its explanation."""
        if self.inventory is None:
            return ""
        result = auto_fit(self.inventory, self.devices, self.run_config,
                          AutoFitOptions(self.memory_options, self.allow_expert_split))
        self._push_snapshot(Snapshot(result.placement, self.run_config, result.explanation), "Auto-fit")
        return result.explanation

    def set_run_config(self, run_config: RunConfig) -> None:
        """New run settings as one undo step (they change the KV cache and compute buffers)."""
        if run_config == self.run_config:
            return
        if self.inventory is None:
            self.run_config = run_config
            self.run_config_changed.emit(run_config)
            return
        self._push_snapshot(Snapshot(self.placement.copy(), run_config, self.explanation), "Change run settings")

    def set_gpu_margin(self, margin_bytes: int) -> None:
        self.memory_options = dataclasses.replace(self.memory_options, gpu_margin_bytes=max(int(margin_bytes), 0))
        self._recompute()

    def set_allow_expert_split(self, allowed: bool) -> None:
        self.allow_expert_split = bool(allowed)

    def apply_command_line(self, text: str) -> bool:
        """Read a llama.cpp command line into the plan; on an error the plan stays as it was."""
        if self.inventory is None:
            return False
        text = text.replace("\\\r\n", " ").replace("\\\n", " ")     # shell line continuations
        # the tool's defaults, not the settings before: the line means what it means to llama.cpp
        base = DIALECTS[self.dialect].replace(activations=self.run_config.activations)
        try:
            parsed = parse_llama_args(text, self.inventory, self.devices, base=base, dialect=self.dialect)
        except ValueError as e:
            self.command_error.emit(str(e))
            return False
        ignored = [f"{flag}: {message}" for flag, status, message in parsed.report
                   if status in ("ignored", "default") and message != "program name"]
        if parsed.override_kv != self.override_kv:
            ignored.append("--override-kv differs from the open model's overrides; the Inspector's model "
                           "options reopen the model with them" if parsed.override_kv or self.override_kv else "")
        self._push_snapshot(Snapshot(parsed.placement, parsed.run_config, ""), "Apply command line")
        self.sync_command_line(extra_notes=[n for n in ignored if n])
        return True

    def set_dialect(self, dialect: str) -> None:
        """Write (and read) the line for llama.cpp or ik_llama.cpp."""
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; choose one of {', '.join(DIALECTS)}")
        if dialect != self.dialect:
            self.dialect = dialect
            self.sync_command_line()

    def _push_snapshot(self, after: Snapshot, text: str) -> None:
        before = Snapshot(self.placement.copy(), self.run_config, self.explanation)
        self.undo_stack.push(SnapshotCommand(self, before, after, text))

    def _restore(self, snapshot: Snapshot) -> None:
        run_config_changed = snapshot.run_config != self.run_config
        self.placement = snapshot.placement.copy()
        if self.placement.device_names != tuple(d.name for d in self.devices):
            self.placement = remap_placement(self.placement, self.inventory, self.devices)
        self.run_config = snapshot.run_config
        self._set_explanation(snapshot.explanation)
        self._recompute()
        if run_config_changed:
            self.run_config_changed.emit(self.run_config)
        self.placement_changed.emit(None)
        self._sync_timer.start()

    def _fit_silently(self) -> None:
        result = auto_fit(self.inventory, self.devices, self.run_config,
                          AutoFitOptions(self.memory_options, self.allow_expert_split))
        self.placement = result.placement
        self.placement_was_restored = False
        self._set_explanation(result.explanation)

    def _after_whole_change(self) -> None:
        self.run_config_changed.emit(self.run_config)
        self.placement_changed.emit(None)
        if self.estimate is not None:
            self.estimate_changed.emit(self.estimate)
        self._sync_timer.start()

    def _set_explanation(self, text: str) -> None:
        if text != self.explanation:
            self.explanation = text
            self.explanation_changed.emit(text)

    # --- derived state -------------------------------------------------------------------------

    def _recompute(self) -> None:
        if self.inventory is None or self.placement is None:
            return
        self.estimate = estimate_memory(self.inventory, self.placement, self.run_config, self.devices,
                                        self.memory_options)
        self.estimate_changed.emit(self.estimate)
        self.verdict = verdict(self.estimate)
        self.verdict_changed.emit(self.verdict, self.estimate.fits)

    @property
    def fits(self) -> bool:
        return self.estimate is not None and self.estimate.fits

    def refusal(self) -> str:
        """Why the plan may not run, with the ways out; "" when it fits."""
        if self.estimate is None or self.estimate.fits:
            return ""
        context = f"{self.run_config.n_ctx:,} tokens" if self.run_config.n_ctx else "the model's own"
        return (f"{self.verdict} Loading it would run out of memory. Ways out: Auto-fit in the Designer, "
                f"a smaller context (now {context}), a smaller KV cache type, or a smaller quant of the model.")

    def sync_command_line(self, extra_notes: Sequence[str] = ()) -> CommandLine:
        """Emit the command line for the current plan now (normally a moment after the last change)."""
        self._sync_timer.stop()
        if self.placement is None:
            return self.command_line
        emitted = emit_llama_args(self.placement, self.run_config, self.devices, model_path=self.model_path,
                                  override_kv=self.override_kv, dialect=self.dialect)
        # a per-expert split is ours only: say so first, with what llama.cpp gets instead
        notes = [("ours only: " + n if n.startswith("llama.cpp cannot split") else n) for n in emitted.notes]
        notes = sorted(notes, key=lambda n: not n.startswith("ours only")) + list(extra_notes)
        hybrid_note = hybrid_kv_cache_note(self.inventory.hparams if self.inventory else None, self.run_config)
        notes += [hybrid_note] if hybrid_note else []
        self.command_line = CommandLine(emitted.text, emitted.exact, tuple(notes))
        self.command_line_changed.emit(self.command_line)
        if self.undo_stack.count():     # the user's plan, not the auto-fit that opening made
            self._remember()
        return self.command_line

    # --- saving --------------------------------------------------------------------------------

    def plan(self) -> Plan:
        return Plan(self.placement, self.run_config, list(self.devices), self.memory_options.gpu_margin_bytes,
                    self.allow_expert_split)

    def save_plan(self, path: str | Path) -> None:
        write_plan(path, self.plan(), self.inventory.name if self.inventory else "")

    def load_plan(self, path: str | Path) -> None:
        """Load a saved plan as one undo step; raises PlanFileError (or OSError) and changes nothing on failure."""
        plan = read_plan(path, self.inventory, self.devices)
        self._adopt_options(plan)
        if plan.devices != self.devices:
            self.devices = plan.devices
            self.model_changed.emit()
            self.devices_changed.emit(self.devices)
        self._push_snapshot(Snapshot(plan.placement, plan.run_config, ""), f"Load {Path(path).name}")

    def _adopt_options(self, plan: Plan) -> None:
        self.memory_options = dataclasses.replace(self.memory_options, gpu_margin_bytes=plan.gpu_margin_bytes)
        self.allow_expert_split = plan.allow_expert_split

    def remembered_path(self) -> Path | None:
        return self.state_dir / f"{self.model_key}.json" if self.model_key else None

    def _remember(self) -> None:
        path = self.remembered_path()
        if path is None or self.placement is None:
            return
        try:
            self.save_plan(path)
        except OSError as e:    # a read-only config folder must not break the designer
            log.warning("could not remember the plan in %s: %s", path, e)

    def _restore_remembered(self) -> bool:
        self.placement_was_restored = False
        path = self.remembered_path()
        if path is None or not path.is_file():
            return False
        try:
            plan = read_plan(path, self.inventory, self.devices)
        except MissingDeviceError:
            return False        # quietly: the GPUs may not have been found yet
        except (OSError, PlanFileError) as e:
            self.message.emit(f"The last plan for this model could not be restored ({e}); auto-fit instead.")
            return False
        self._adopt_options(plan)
        self.placement, self.run_config, self.devices = plan.placement, plan.run_config, plan.devices
        self.placement_was_restored = True
        return True


def _move_text(refs: list[TensorRef], device: str) -> str:
    if len(refs) == 1:
        ref = refs[0]
        what = ref.name if ref.experts is None else f"{len(ref.experts)} experts of {ref.name}"
    else:
        what = f"{len(refs)} tensors"
    return f"Move {what} to {device}"
