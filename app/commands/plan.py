"""offload-studio plan FILE [llama.cpp flags] [--sim-gpus SPEC]: per-device memory table, the
verdict ("Fits: ..." / "Does not fit: CUDA2 over by 5.6 GiB, ...") and the equivalent llama.cpp
command line.

`--check-against PATH/TO/llama-perplexity` runs llama.cpp's own dry load of the same file with
the same settings and prints its buffers beside ours, component by component."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

from app.commands.common import open_inventory, print_json, print_table
from engine.devices import available_devices, cpu_device, parse_size
from engine.plan.autofit import verdict
from engine.plan.llama_args import emit_llama_args, parse_llama_args
from engine.plan.llama_reference import (DRY_PASS_DONE, PRINTED_MIB, REFUSED, comparable_run_config,
                                         parse_llama_log, perplexity_command)
from engine.plan.memory import TARGETS, MemoryOptions, estimate_memory
from engine.plan.placement import Placement
from engine.units import mib

ACCEPTS_LLAMA_ARGS = True
CHECK_TOLERANCE = 0.05              # compute buffers: within 5 % ...
CHECK_TOLERANCE_BYTES = 64 << 20    # ... and within 64 MiB of llama.cpp's
# llama.cpp's names for host buffers; everything else is a device name (CUDA0, ...)
HOST_BUFFERS = ("CPU", "CPU_Mapped", "CUDA_Host", "CPU_REPACK")


def add_arguments(p) -> None:
    p.add_argument("file", help="GGUF file (any part of a split set)")
    p.add_argument("--sim-gpus", help="simulated GPUs, e.g. 24GiB,24GiB,48GiB (default: the real GPUs)")
    p.add_argument("--margin", default="0", help="safety margin to keep free on each GPU, e.g. 512MiB")
    p.add_argument("--target", choices=TARGETS, default="llama.cpp",
                   help="whose overhead to count: the exported llama.cpp command (default) or this app's engine")
    p.add_argument("--gpu-overhead", help="one fixed per-GPU overhead instead of the named terms, e.g. 450MiB")
    p.add_argument("--check-against", metavar="LLAMA_PERPLEXITY",
                   help="run this llama-perplexity's dry load on the file and print its buffers beside ours "
                        "(all-CPU plan; -c must be given)")
    p.add_argument("--full-load", action="store_true",
                   help="with --check-against: wait for the real load too, for the KV and weight buffers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.epilog = "Any other flags are read as llama.cpp / ik_llama.cpp flags: -ngl, -ts, -ot, --n-cpu-moe, -c, -ctk, ..."


def memory_options(args) -> MemoryOptions:
    return MemoryOptions(target=args.target, gpu_margin_bytes=parse_size(args.margin),
                         gpu_overhead_bytes=parse_size(args.gpu_overhead) if args.gpu_overhead else None)


def plan(args):
    mf, inventory = open_inventory(args.file)
    devices = available_devices(args.sim_gpus)
    parsed = parse_llama_args(args.llama_args, inventory, devices)
    estimate = estimate_memory(inventory, parsed.placement, parsed.run_config, devices, memory_options(args))
    emitted = emit_llama_args(parsed.placement, parsed.run_config, devices)
    return inventory, devices, parsed, estimate, emitted


def run(args) -> int:
    if args.check_against:
        return check_against(args)
    inventory, devices, parsed, estimate, emitted = plan(args)
    if args.json:
        print_json({
            "model": inventory.name, "architecture": inventory.arch,
            "devices": [{"device": d.device, "weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes,
                         "compute_bytes": d.compute_bytes, "compute_derived": d.compute_derived,
                         "overhead_bytes": d.overhead_bytes,
                         "overhead_terms": [{"name": t.name, "bytes": t.n_bytes, "derived": t.derived}
                                            for t in d.overhead_terms],
                         "margin_bytes": d.margin_bytes, "total_bytes": d.total_bytes,
                         "capacity_bytes": d.capacity_bytes, "fits": d.fits} for d in estimate.devices],
            "fits": estimate.fits, "verdict": verdict(estimate),
            "command_line": emitted.text, "exact": emitted.exact, "notes": list(emitted.notes) + list(estimate.notes),
            "flags": [{"flag": f, "status": s, "message": m} for f, s, m in parsed.report],
        })
        return 0 if estimate.fits else 1
    print(f"{inventory.name} ({inventory.arch}), context {parsed.run_config.context_length(inventory.hparams.n_ctx_train) if inventory.hparams else parsed.run_config.n_ctx}, "
          f"KV {parsed.run_config.type_k}/{parsed.run_config.type_v}, ubatch {parsed.run_config.n_ubatch}")
    rows = [[d.device, f"{mib(d.weights_bytes):.0f}", f"{mib(d.kv_bytes):.0f}",
             f"{mib(d.compute_bytes):.0f}" + ("*" if d.compute_derived else ""),
             f"{mib(d.overhead_bytes):.0f}", f"{mib(d.total_bytes):.0f}", f"{mib(d.capacity_bytes):.0f}",
             "yes" if d.fits else f"NO (+{mib(-d.free_bytes):.0f})"] for d in estimate.devices]
    print_table(["device", "weights MiB", "KV MiB", "compute MiB", "overhead MiB", "total MiB", "capacity MiB", "fits"], rows)
    print(verdict(estimate))        # the designer's one line, under the table it sums up
    print(f"overhead ({args.target}):")
    for d in estimate.devices:
        terms = ", ".join(f"{t.name} {mib(t.n_bytes):.2f} MiB" + (" (derived)" if t.derived else "")
                          for t in d.overhead_terms)
        print(f"  {d.device}: {terms or 'none'}")
    if any(d.compute_derived for d in estimate.devices):
        print("* GPU compute buffers are derived from llama.cpp's graph and scheduler rules, not yet measured on a GPU")
    for flag, status, message in parsed.report:
        if status != "applied":
            print(f"{flag}: {status}{' - ' + message if message else ''}")
    for note in list(estimate.notes) + list(emitted.notes):
        print(f"note: {note}")
    print("\nllama.cpp equivalent:" + ("" if emitted.exact else " (nearest: this placement splits experts, which llama.cpp cannot express)"))
    print(f"  {emitted.text}")
    return 0 if estimate.fits else 1


# --- the comparison with llama.cpp ----------------------------------------------------------

def run_llama_dry_load(command: list[str], full_load: bool, timeout_s: float = 900.0) -> str:
    """llama.cpp's log up to the end of its dry pass (or of the real load with full_load)."""
    passes_wanted = 2 if full_load else 1
    lines: list[str] = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    started = time.monotonic()
    seen = 0
    try:
        for line in proc.stdout:
            lines.append(line)
            if REFUSED.search(line):
                break
            if DRY_PASS_DONE.search(line):
                seen += 1
                if seen >= passes_wanted:
                    break
            if time.monotonic() - started > timeout_s:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return "".join(lines)


def within_tolerance(ours: int, theirs: int) -> bool:
    diff = abs(ours - theirs)
    return diff <= CHECK_TOLERANCE_BYTES and diff <= CHECK_TOLERANCE * max(theirs, 1) + PRINTED_MIB * (1 << 20)


def _host(name: str) -> str:
    return "CPU" if name in HOST_BUFFERS else name


@dataclass(frozen=True)
class Comparison:
    """Our all-CPU estimate beside llama.cpp's buffers for the same file and settings."""
    title: str
    command: list[str]
    n_nodes: int
    n_splits: int
    flash_attn: bool | None
    rows: list[tuple[str, int, int]]        # (component, ours, llama.cpp's), bytes

    @property
    def compute_ok(self) -> bool:
        ours, theirs = self.rows[0][1:]
        return within_tolerance(ours, theirs)


def compare_with_llama(path: str, llama_args: list[str], binary: str, options: MemoryOptions,
                       full_load: bool = False) -> Comparison | str:
    """llama.cpp's dry load of `path` beside our estimate; llama.cpp's log when it printed nothing."""
    mf, inventory = open_inventory(path)
    hp = inventory.hparams
    devices = [cpu_device()]
    parsed = parse_llama_args(llama_args, inventory, devices)
    n_ctx = parsed.run_config.context_length(hp.n_ctx_train)
    rc = comparable_run_config(parsed.run_config, n_ctx)
    placement = Placement(inventory, devices, ["CPU"] * (inventory.n_layer + 1))
    ours = estimate_memory(inventory, placement, rc, devices, options)["CPU"]
    with tempfile.TemporaryDirectory() as tmp:
        text_path = os.path.join(tmp, "text.txt")
        with open(text_path, "w") as f:
            f.write("The quick brown fox jumps over the lazy dog. " * 64)
        command = perplexity_command(binary, os.path.abspath(path), text_path, rc, n_ctx)
        log = run_llama_dry_load(command, full_load)
    passes = parse_llama_log(log)
    if not passes:
        return log
    dry = passes[0]
    output = next((t.n_bytes for t in ours.overhead_terms if t.name == "llama.cpp output buffer"), 0)
    rows = [("compute buffer", ours.compute_bytes,
             sum(n for name, n in dry.compute_bytes.items() if _host(name) == "CPU")),
            ("output buffer", output, sum(dry.output_bytes.values()))]
    if len(passes) > 1:
        rows += [("KV cache", ours.kv_bytes, sum(passes[1].kv_bytes.values())),
                 ("weights", ours.weights_bytes, sum(passes[1].model_bytes.values()))]
    title = (f"{inventory.name} ({inventory.arch}): -c {n_ctx} -b {rc.n_batch} -ub {rc.n_ubatch} -fa {rc.flash_attn} "
             f"-ctk {rc.type_k} -ctv {rc.type_v}, all on the CPU")
    return Comparison(title, command, dry.n_nodes, dry.n_splits, dry.flash_attn, rows)


def check_against(args) -> int:
    result = compare_with_llama(args.file, args.llama_args, args.check_against, memory_options(args), args.full_load)
    if isinstance(result, str):
        refusal = [line for line in result.splitlines() if REFUSED.search(line)]
        print("\n".join(refusal) if refusal else result[-4000:])
        print("llama.cpp printed no buffer sizes" + (": it refused these settings" if refusal else " (see its log above)"))
        return 2
    print(result.title)
    print(f"llama.cpp: {' '.join(result.command)}")
    flash = {True: "on", False: "off", None: "as given"}[result.flash_attn]
    print(f"llama.cpp graph: {result.n_nodes} nodes, {result.n_splits} split(s), flash attention {flash}")
    print_table(["component", "ours MiB", "llama.cpp MiB", "difference"],
                [[name, f"{mib(ours):.2f}", f"{mib(theirs):.2f}", _diff(ours, theirs)] for name, ours, theirs in result.rows])
    print("compute buffer " + ("within" if result.compute_ok else "OUTSIDE") + " 5 % and 64 MiB of llama.cpp's")
    return 0 if result.compute_ok else 1


def _diff(ours: int, theirs: int) -> str:
    diff = ours - theirs
    pct = f" ({100 * diff / theirs:+.2f} %)" if theirs else ""
    return f"{mib(diff):+.2f} MiB{pct}"
