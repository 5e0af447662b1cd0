"""offload-studio inspect FILE: metadata, quant mix, per-layer sizes and the tensor table."""
from __future__ import annotations

from collections import Counter

from app.commands.common import open_inventory, print_json, print_table
from engine.units import format_bytes

LONG_ARRAY = 16     # arrays longer than this (vocabularies) are summarised


def add_arguments(p) -> None:
    p.add_argument("file", help="GGUF file (any part of a split set)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensors", action="store_true", help="list every tensor")


def summarise(value):
    if isinstance(value, list) and len(value) > LONG_ARRAY:
        return f"[{len(value)} items: {', '.join(map(repr, value[:3]))}, ...]"
    return value


def quant_mix(inventory) -> dict[str, dict[str, int]]:
    counts, sizes = Counter(), Counter()
    for t in inventory.tensors:
        counts[t.type_name] += 1
        sizes[t.type_name] += t.n_bytes
    return {name: {"tensors": counts[name], "bytes": sizes[name]} for name in sorted(sizes, key=sizes.get, reverse=True)}


def layer_rows(inventory) -> list[dict]:
    rows = []
    for layer in inventory.layers:
        experts = [t for t in layer.tensors if t.is_expert_tensor]
        rows.append({"layer": layer.index, "bytes": layer.n_bytes, "groups": layer.group_bytes(),
                     "expert_bytes": sum(t.expert_bytes for t in experts)})
    return rows


def report(mf, inventory) -> dict:
    return {
        "file": [str(p) for p in mf.paths],
        "architecture": inventory.arch,
        "name": inventory.name,
        "file_bytes": mf.file_bytes,
        "tensor_bytes": inventory.total_bytes,
        "notes": inventory.notes,
        "metadata": {k: summarise(v) for k, v in mf.metadata.items()},
        "quant_mix": quant_mix(inventory),
        "layers": layer_rows(inventory),
        "tensors": [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.n_bytes,
                     "file": mf.tensors[t.name].file_index, "offset": mf.tensors[t.name].offset,
                     **({"experts": t.n_experts, "expert_bytes": t.expert_bytes} if t.n_experts else {})}
                    for t in inventory.tensors],
    }


def run(args) -> int:
    mf, inventory = open_inventory(args.file)
    data = report(mf, inventory)
    if args.json:
        print_json(data)
        return 0
    print(f"{inventory.name} ({inventory.arch}), {len(inventory.tensors)} tensors, "
          f"{format_bytes(inventory.total_bytes)} of weights in {len(mf.paths)} file(s)")
    for note in inventory.notes:
        print(f"note: {note}")
    print("\nmetadata:")
    for key, value in data["metadata"].items():
        print(f"  {key} = {value}")
    print("\nquant mix:")
    print_table(["type", "tensors", "bytes"],
                [[name, v["tensors"], format_bytes(v["bytes"])] for name, v in data["quant_mix"].items()])
    groups = inventory.groups()
    print("\nper layer:")
    print_table(["layer", *groups, "one expert", "total"],
                [[r["layer"], *(format_bytes(r["groups"].get(g, 0)) for g in groups),
                  format_bytes(r["expert_bytes"]) if r["expert_bytes"] else "-", format_bytes(r["bytes"])]
                 for r in data["layers"]])
    if args.tensors:
        print("\ntensors:")
        print_table(["name", "type", "shape", "bytes", "file", "offset"],
                    [[t["name"], t["type"], "x".join(map(str, t["shape"])), format_bytes(t["bytes"]), t["file"],
                      t["offset"]] for t in data["tensors"]])
    return 0
