"""What the designer's three Qt models share: their roles, the drag payload and the cell texts.

The models (`device_lanes.DeviceLaneModel`, `layer_grid.LayerGridModel`,
`expert_strip.ExpertStripModel`) read an `engine.plan.placement.Placement` and a
`MemoryEstimate`; they never move anything themselves. A move reaches them as
`tensors_moved(moved)` and comes out as one `dataChanged` over the cells it touched, never a
reset. Drags carry `TensorRef`s in `MIME_TYPE`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from PySide6.QtCore import QByteArray, QMimeData, QModelIndex, QPersistentModelIndex, Qt

from engine.plan.placement import TensorRef, expert_ranges
from engine.units import format_bytes


DevicesRole = Qt.UserRole + 20      # dict[str, int]: bytes of the cell (or tile) on each device, largest first
SplitRole = Qt.UserRole + 21        # bool: a tensor in the cell has its experts on several devices (ours only)
ExpertCountRole = Qt.UserRole + 22  # int: experts of the cell's routed-expert tensors (0: none)
ColorRole = Qt.UserRole + 23        # QColor of the (majority) device
HeatRole = Qt.UserRole + 24         # float 0..1: how often the router picked this expert, if known
FitsRole = Qt.UserRole + 25         # bool: the device's estimate fits its capacity
RefsRole = Qt.UserRole + 26         # list[TensorRef]: what moving this cell moves

MIME_TYPE = "application/x-offload-studio-tensor-refs"

ALIGN_CENTER = int(Qt.AlignCenter)
ALIGN_RIGHT = int(Qt.AlignRight | Qt.AlignVCenter)

GROUP_LABELS = {"attention": "attn_*", "norm": "*_norm", "router": "ffn_gate_inp", "ffn": "ffn (dense)",
                "shared_expert": "ffn_*_shexp", "recurrent": "ssm_* (\u0394)", "other": "other"}
GROUP_HELP = {"attention": "Attention weights; the layer's KV cache sits with them",
              "norm": "Norm weights", "router": "Expert router (gate) and its bias",
              "ffn": "Dense feed-forward network", "shared_expert": "Shared expert, used by every token",
              "recurrent": "Gated DeltaNet mixer (attn_qkv, attn_gate, ssm_*); the layer's recurrent state "
                           "sits with it",
              "other": "Other tensors"}

Index = QModelIndex | QPersistentModelIndex


def short_bytes(n_bytes: int) -> str:
    """Cell text: three significant figures at most ('7.0 GiB', '126 MiB', '28 KiB')."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1000 or unit == "TiB":
            return f"{value:.0f} {unit}" if value >= 100 or unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def exact_bytes(n_bytes: int) -> str:
    return f"{n_bytes:,} B ({format_bytes(n_bytes)})"


def group_label(group: str) -> str:
    return GROUP_LABELS.get(group, group)


def encode_refs(refs: Iterable[TensorRef]) -> QMimeData:
    items = [[r.name, sorted(r.experts) if r.experts is not None else None] for r in refs]
    mime = QMimeData()
    mime.setData(MIME_TYPE, QByteArray(json.dumps(items).encode()))
    mime.setText("\n".join(r.name + (f" [{expert_ranges(r.experts)}]" if r.experts is not None else "")
                           for r in refs))
    return mime


def decode_refs(mime: QMimeData) -> list[TensorRef]:
    if not mime.hasFormat(MIME_TYPE):
        return []
    items = json.loads(bytes(mime.data(MIME_TYPE)).decode())
    return [TensorRef(name, frozenset(experts) if experts is not None else None) for name, experts in items]


def sorted_devices(by_device: dict[str, int]) -> dict[str, int]:
    return dict(sorted(by_device.items(), key=lambda kv: -kv[1]))


def experts_by_device(devices: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e, d in enumerate(devices):
        out.setdefault(d, []).append(e)
    return out
