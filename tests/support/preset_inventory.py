"""Inventories of real model shapes without a file, for planner tests: a fixed, realistic type
per tensor (Q4_K where rows allow it, else Q8_0; F32 for 1-D tensors) so tests can work sizes out
by hand."""
import functools

from engine import arch
from engine.gguf import ggml_types
from engine.plan.inventory import Inventory, InventoryTensor, Role, group_of, layer_of, role_of
from engine.synth.presets import preset


def tensor_type(shape):
    if len(shape) == 1:
        return "F32"
    return "Q4_K" if shape[-1] % 256 == 0 else "Q8_0"


@functools.lru_cache(maxsize=None)
def make_inventory(preset_name):
    md = preset(preset_name)
    family = arch.family(md["general.architecture"])
    hp = family.hyperparams(md)
    tensors = []
    for spec in family.tensor_specs(hp):
        type_name = tensor_type(spec.shape)
        n_rows = 1
        for dim in spec.shape[:-1]:
            n_rows *= dim
        n_bytes = ggml_types.row_bytes(ggml_types.type_id_by_name(type_name), spec.shape[-1]) * n_rows
        role = role_of(spec.name)
        n_experts = spec.shape[0] if role is Role.ROUTED_EXPERTS else 0
        tensors.append(InventoryTensor(spec.name, layer_of(spec.name), role, group_of(spec.name, role), type_name,
                                       spec.shape, n_bytes, n_experts, n_bytes // n_experts if n_experts else 0))
    return Inventory(hp.arch, md["general.name"], tensors, hp, [])
