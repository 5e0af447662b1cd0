"""What the designer shows: every tensor of a model grouped by layer and role, with exact bytes
and, for routed-expert tensors, the bytes of one expert.

Roles come from GGUF tensor names alone, so a model of an architecture we cannot run still
gets a full inventory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable

from engine import arch as arch_registry
from engine.arch.base import HyperParamError, HyperParams
from engine.arch.plausible import checked_hyperparams, layer_count_of_tensors
from engine.gguf.model_file import ModelFile, ModelFileError, TensorInfo

LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.(weight|bias|scale))?$")


class Role(Enum):
    EMBEDDING = "embedding"
    OUTPUT = "output"
    OUTPUT_NORM = "output_norm"
    ATTENTION = "attention"
    NORM = "norm"
    ROUTER = "router"
    DENSE_FFN = "ffn"
    SHARED_EXPERT = "shared_expert"
    ROUTED_EXPERTS = "routed_experts"
    RECURRENT = "recurrent"     # a Gated DeltaNet mixer (ssm_*, and its layer's attn_qkv / attn_gate)
    OTHER = "other"


def role_of(name: str) -> Role:
    """The role of a tensor, from its GGUF name (`blk.3.ffn_up_exps.weight` -> ROUTED_EXPERTS)."""
    if name.startswith("token_embd"):
        return Role.EMBEDDING
    if name.startswith("output_norm"):
        return Role.OUTPUT_NORM
    if name.startswith("output"):
        return Role.OUTPUT
    m = LAYER_RE.match(name)
    if not m:
        return Role.OTHER
    base = m.group(2)
    if base.endswith("_exps"):
        return Role.ROUTED_EXPERTS
    if base.endswith("_shexp") or base == "ffn_gate_inp_shexp":
        return Role.SHARED_EXPERT
    if base in ("ffn_gate_inp", "exp_probs_b"):
        return Role.ROUTER
    if base.startswith("ssm_"):
        return Role.RECURRENT
    if base.endswith("_norm") or base.startswith("layer_output_norm"):
        return Role.NORM
    if base.startswith("attn_"):
        return Role.ATTENTION
    if base.startswith("ffn_"):
        return Role.DENSE_FFN
    return Role.OTHER


def group_of(name: str, role: Role) -> str:
    """The designer column a tensor belongs to: one per role, one per routed-expert tensor."""
    if role is Role.ROUTED_EXPERTS:
        m = LAYER_RE.match(name)
        return m.group(2)
    return role.value


def layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class InventoryTensor:
    name: str
    layer: int | None
    role: Role
    group: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int
    n_experts: int = 0
    expert_bytes: int = 0

    @property
    def is_expert_tensor(self) -> bool:
        return self.n_experts > 0


@dataclass
class LayerInventory:
    index: int
    tensors: list[InventoryTensor] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def group_bytes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for t in self.tensors:
            sizes[t.group] = sizes.get(t.group, 0) + t.n_bytes
        return sizes


GROUP_ORDER = [Role.ATTENTION.value, Role.RECURRENT.value, Role.NORM.value, Role.ROUTER.value, Role.DENSE_FFN.value,
               Role.SHARED_EXPERT.value, "ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps",
               "ffn_down_exps", Role.OTHER.value]


class Inventory:
    """All tensors of a model, by layer and group; `hparams` is None when the architecture is unknown."""

    def __init__(self, arch: str, name: str, tensors: Iterable[InventoryTensor],
                 hparams: HyperParams | None, notes: list[str]):
        self.arch = arch
        self.name = name
        self.tensors = list(tensors)
        self.by_name = {t.name: t for t in self.tensors}
        self.hparams = hparams
        self.notes = notes
        n_layer = hparams.n_layer if hparams else 1 + max((t.layer for t in self.tensors if t.layer is not None),
                                                          default=-1)
        self.layers = [LayerInventory(i) for i in range(n_layer)]
        self.globals: list[InventoryTensor] = []
        for t in self.tensors:
            if t.layer is None or t.layer >= n_layer:
                self.globals.append(t)
            else:
                self.layers[t.layer].tensors.append(t)

    @classmethod
    def from_model_file(cls, mf: ModelFile) -> Inventory:
        notes: list[str] = []
        hparams = None
        if layer_count_of_tensors(mf.tensors) > len(mf.tensors):     # blk.1000000000.x: nothing to size from
            raise ModelFileError(mf.path, f"tensor names go up to blk.{layer_count_of_tensors(mf.tensors) - 1}, "
                                          f"but the file holds only {len(mf.tensors)} tensors")
        if not arch_registry.is_supported(mf.architecture):
            notes.append(f"architecture {mf.architecture!r} cannot run here (supported: "
                         f"{', '.join(sorted(arch_registry.ARCHITECTURES))}); sizes and placement still work")
        else:
            try:
                hparams = checked_hyperparams(arch_registry.family(mf.architecture), mf.metadata,
                                              {name: t.shape for name, t in mf.tensors.items()})
            except (HyperParamError, ValueError, TypeError) as e:
                notes.append(f"cannot read {mf.architecture} hyperparameters: {e}")
        for tensor_name, reason in list(mf.unsupported_types().items())[:1]:
            notes.append(f"{tensor_name} {reason}")
        recurrent = {il for il in range(hparams.n_layer) if hparams.is_recurrent(il)} if hparams else set()
        return cls(mf.architecture, mf.name, (inventory_tensor(t, recurrent) for t in mf.tensors.values()),
                   hparams, notes)

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_expert(self) -> int:
        return max((t.n_experts for t in self.tensors), default=0)

    @property
    def runnable(self) -> bool:
        return self.hparams is not None and not any("cannot run" in n or "only ik_llama" in n for n in self.notes)

    def groups(self) -> list[str]:
        """The designer's columns present in this model, in display order."""
        present = {t.group for layer in self.layers for t in layer.tensors}
        return [g for g in GROUP_ORDER if g in present] + sorted(present - set(GROUP_ORDER))


def inventory_tensor(t: TensorInfo, recurrent_layers: set[int] = frozenset()) -> InventoryTensor:
    role = role_of(t.name)
    if role is Role.ATTENTION and layer_of(t.name) in recurrent_layers:
        role = Role.RECURRENT       # a DeltaNet layer's attn_qkv and attn_gate feed its recurrence
    n_experts = t.n_experts if role is Role.ROUTED_EXPERTS else 0
    return InventoryTensor(
        name=t.name, layer=layer_of(t.name), role=role, group=group_of(t.name, role),
        type_name=t.type_name, shape=t.shape, n_bytes=max(t.n_bytes, 0),
        n_experts=n_experts, expert_bytes=t.n_bytes // n_experts if n_experts and t.n_bytes > 0 else 0)
