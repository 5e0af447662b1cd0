"""The weight bytes one decoded token reads on each device: the numerator of the decode roofline.

A token reads every dense matrix once, one row of the token embedding, and of each routed-expert
tensor only its n_expert_used selected experts. Which experts are selected depends on the router,
so an expert tensor split over devices counts the expectation under uniform routing: each expert
is read with probability n_expert_used / n_expert, i.e. that share of the bytes each device holds.
A tied output head (no output.weight) reads the whole token embedding on the output device.
"""
from __future__ import annotations

from engine.plan.inventory import Inventory, Role
from engine.plan.placement import Placement


def active_bytes_per_token(inventory: Inventory, placement: Placement) -> dict[str, int]:
    """Device name -> weight bytes one decode token reads there (every device of the placement)."""
    per_device = {name: 0 for name in placement.device_names}
    n_used = inventory.hparams.n_expert_used
    tied = not any(t.name == "output.weight" for t in inventory.tensors)
    for t in inventory.tensors:
        for device, n_bytes in placement.device_bytes(t.name).items():
            per_device[device] += _bytes_read(t, n_bytes, n_used)
        if t.role is Role.EMBEDDING and tied:
            per_device[placement.output_device()] += t.n_bytes
    return per_device


def _bytes_read(t, held_bytes: int, n_expert_used: int) -> int:
    """Of held_bytes of tensor t on one device, what one token reads."""
    if t.is_expert_tensor:
        return held_bytes * min(n_expert_used, t.n_experts) // t.n_experts
    if t.role is Role.EMBEDDING:
        return t.n_bytes // t.shape[0]                  # one row (n_vocab, n_embd) per token
    return held_bytes
