"""The saved form of a plan: placement, run settings, devices and auto-fit options as JSON.

    {"format": "offload-studio-plan", "version": 1, "model": name,
     "devices": [{"name", "kind", "total_bytes", "simulated"}...],
     "placement": Placement.to_dict(), "run_config": {...},
     "gpu_margin_bytes": int, "allow_expert_split": bool}

A plan may name simulated GPUs the session does not have yet (they are recreated) but never a
real GPU the machine lacks (`MissingDeviceError`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.devices import Device
from engine.files import write_json_atomic
from engine.plan.inventory import Inventory
from engine.plan.placement import Placement
from engine.run_config import RunConfig

PLAN_FORMAT = "offload-studio-plan"
PLAN_VERSION = 1


class PlanFileError(ValueError):
    """A plan file that is not one, or whose contents do not fit the model."""


class MissingDeviceError(PlanFileError):
    """A saved plan names a real GPU this machine does not have (or has not found yet)."""


@dataclass(frozen=True)
class Plan:
    placement: Placement
    run_config: RunConfig
    devices: list[Device]
    gpu_margin_bytes: int = 0
    allow_expert_split: bool = False


def plan_to_dict(plan: Plan, model_name: str = "") -> dict:
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": model_name,
            "devices": [{"name": d.name, "kind": d.kind, "total_bytes": d.total_bytes, "simulated": d.simulated}
                        for d in plan.devices],
            "placement": plan.placement.to_dict(), "run_config": dataclasses.asdict(plan.run_config),
            "gpu_margin_bytes": plan.gpu_margin_bytes, "allow_expert_split": plan.allow_expert_split}


def plan_from_dict(data: object, inventory: Inventory, devices: list[Device]) -> Plan:
    """A saved plan over `inventory`, on `devices` plus any simulated GPUs it used."""
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanFileError("not an Offload Studio plan")
    if data.get("version") != PLAN_VERSION:
        raise PlanFileError(f"plan format version {str(data.get('version'))[:20]!r} is not one this version reads")
    try:
        saved = [d for d in data.get("devices", []) if isinstance(d, dict)]
        have = {d.name for d in devices}
        missing = [d for d in saved if d.get("name") not in have]
        real_missing = [str(d["name"])[:40] for d in missing if not d.get("simulated")]
        if real_missing:
            raise MissingDeviceError(f"the plan uses {', '.join(real_missing)}, which this machine does not have")
        devices = list(devices) + [Device(str(d["name"]), "gpu", int(d["total_bytes"]), "simulated", simulated=True)
                                   for d in missing]
        placement = Placement.from_dict(inventory, devices, data["placement"])
        fields = {f.name for f in dataclasses.fields(RunConfig)}
        saved_config = data.get("run_config", {})
        if not isinstance(saved_config, dict):
            raise PlanFileError("run_config is not a table")
        run_config = RunConfig(**{k: v for k, v in saved_config.items() if k in fields})
        return Plan(placement, run_config, devices, int(data.get("gpu_margin_bytes", 0)),
                    bool(data.get("allow_expert_split", False)))
    except PlanFileError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise PlanFileError(f"the plan does not fit this model: {str(e)[:200]}") from None


def write_plan(path: str | os.PathLike, plan: Plan, model_name: str = "") -> None:
    write_json_atomic(path, plan_to_dict(plan, model_name))


def read_plan(path: str | os.PathLike, inventory: Inventory, devices: list[Device]) -> Plan:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PlanFileError(f"{Path(path).name} is not a readable plan ({type(e).__name__})") from None
    return plan_from_dict(data, inventory, devices)
