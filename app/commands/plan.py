"""offload-studio plan FILE [llama.cpp flags] [--sim-gpus SPEC]: per-device memory table and
the equivalent llama.cpp command line."""
from __future__ import annotations


from app.commands.common import open_inventory, print_json, print_table
from engine.devices import available_devices
from engine.plan.llama_args import emit_llama_args, parse_llama_args
from engine.plan.memory import MemoryOptions, estimate_memory
from engine.devices import parse_size
from engine.units import mib


ACCEPTS_LLAMA_ARGS = True


def add_arguments(p) -> None:
    p.add_argument("file", help="GGUF file (any part of a split set)")
    p.add_argument("--sim-gpus", help="simulated GPUs, e.g. 24GiB,24GiB,48GiB (default: the real GPUs)")
    p.add_argument("--margin", default="0", help="safety margin to keep free on each GPU, e.g. 512MiB")
    p.add_argument("--gpu-overhead", default="450MiB", help="fixed per-GPU overhead (CUDA context)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.epilog = "Any other flags are read as llama.cpp / ik_llama.cpp flags: -ngl, -ts, -ot, --n-cpu-moe, -c, -ctk, ..."


def plan(args):
    mf, inventory = open_inventory(args.file)
    devices = available_devices(args.sim_gpus)
    parsed = parse_llama_args(args.llama_args, inventory, devices)
    options = MemoryOptions(gpu_overhead_bytes=parse_size(args.gpu_overhead), gpu_margin_bytes=parse_size(args.margin))
    estimate = estimate_memory(inventory, parsed.placement, parsed.run_config, devices, options)
    emitted = emit_llama_args(parsed.placement, parsed.run_config, devices)
    return inventory, devices, parsed, estimate, emitted


def run(args) -> int:
    inventory, devices, parsed, estimate, emitted = plan(args)
    if args.json:
        print_json({
            "model": inventory.name, "architecture": inventory.arch,
            "devices": [{"device": d.device, "weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes,
                         "compute_bytes": d.compute_bytes, "overhead_bytes": d.overhead_bytes,
                         "margin_bytes": d.margin_bytes, "total_bytes": d.total_bytes,
                         "capacity_bytes": d.capacity_bytes, "fits": d.fits} for d in estimate.devices],
            "fits": estimate.fits,
            "command_line": emitted.text, "exact": emitted.exact, "notes": list(emitted.notes) + list(estimate.notes),
            "flags": [{"flag": f, "status": s, "message": m} for f, s, m in parsed.report],
        })
        return 0 if estimate.fits else 1
    print(f"{inventory.name} ({inventory.arch}), context {parsed.run_config.context_length(inventory.hparams.n_ctx_train) if inventory.hparams else parsed.run_config.n_ctx}, "
          f"KV {parsed.run_config.type_k}/{parsed.run_config.type_v}, ubatch {parsed.run_config.n_ubatch}")
    rows = [[d.device, f"{mib(d.weights_bytes):.0f}", f"{mib(d.kv_bytes):.0f}", f"{mib(d.compute_bytes):.0f}",
             f"{mib(d.overhead_bytes):.0f}", f"{mib(d.total_bytes):.0f}", f"{mib(d.capacity_bytes):.0f}",
             "yes" if d.fits else f"NO (+{mib(-d.free_bytes):.0f})"] for d in estimate.devices]
    print_table(["device", "weights MiB", "KV MiB", "compute MiB", "overhead MiB", "total MiB", "capacity MiB", "fits"], rows)
    for flag, status, message in parsed.report:
        if status != "applied":
            print(f"{flag}: {status}{' - ' + message if message else ''}")
    for note in list(estimate.notes) + list(emitted.notes):
        print(f"note: {note}")
    print("\nllama.cpp equivalent:" + ("" if emitted.exact else " (nearest: this placement splits experts, which llama.cpp cannot express)"))
    print(f"  {emitted.text}")
    return 0 if estimate.fits else 1
