"""Options every command that runs a model shares, and loading the model they describe.

All of them accept llama.cpp's placement and run flags (-ngl, -ts, -ot, -c, -ctk, -ub, ...) and
--sim-gpus; the flags are parsed into a placement exactly as `offload-studio plan` does.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from engine.devices import available_devices
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.llama_args import ParsedArgs, parse_llama_args
from engine.plan.memory import estimate_memory
from engine.run.model import Model
from engine.text.tokenizer import Tokenizer
from engine.units import format_bytes

ACCEPTS_LLAMA_ARGS = True


def add_model_arguments(p) -> None:
    p.add_argument("-m", "--model", required=True, help="GGUF file")
    p.add_argument("--sim-gpus", help="simulated GPUs, e.g. 24GiB,24GiB (run on the CPU backend)")
    p.add_argument("--emulate-cuda", metavar="SIZES",
                   help="emulated GPUs, e.g. 24GiB,24GiB: the CUDA backend's kernels run on the CPU (slow; for "
                        "checking that a plan runs and what it computes)")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("-okv", "--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="override a metadata value, e.g. llama4.expert_used_count=int:2 (repeatable)")
    p.add_argument("--ignore-fit", action="store_true",
                   help="load even when the memory estimate says a GPU is over its memory")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="launch every CUDA kernel of a decode step directly instead of replaying it as a CUDA graph "
                        "(as llama.cpp's GGML_CUDA_DISABLE_GRAPHS=1, which is honoured too)")
    p.epilog = ("Other flags are read as llama.cpp placement and run flags: -ngl, -ts, -ot, --n-cpu-moe, "
                "-c, -ctk/-ctv, -ub, -b, -fa.")


@dataclass
class LoadedModel:
    model: Model
    tokenizer: Tokenizer
    parsed: ParsedArgs


def check_cache_fits(inventory: Inventory, parsed: ParsedArgs, run_config, devices) -> None:
    """Refuse, with the planner's figures, a context whose KV cache and compute buffers alone
    exceed a device, before anything is allocated (weights are memory-mapped, so they may
    exceed RAM and still run)."""
    estimate = estimate_memory(inventory, parsed.placement, run_config, devices)
    for d in estimate.devices:
        if d.kv_bytes + d.compute_bytes > d.capacity_bytes > 0:
            raise ValueError(f"context {run_config.context_length(inventory.hparams.n_ctx_train)} needs "
                             f"{format_bytes(d.kv_bytes)} of KV cache and {format_bytes(d.compute_bytes)} of "
                             f"compute buffers on {d.device}, which has {format_bytes(d.capacity_bytes)}: "
                             "lower -c or quantize the cache (-ctk/-ctv q8_0)")


def check_gpus_fit(inventory: Inventory, parsed: ParsedArgs, run_config, devices, ignore_fit: bool) -> None:
    """Refuse a plan that overfills a GPU (weights there are copied, not paged in), with the verdict
    and the ways out; CPU weights run from the memory map, so RAM past its size is only noted."""
    from engine.plan.autofit import verdict
    estimate = estimate_memory(inventory, parsed.placement, run_config, devices)   # no margin: what it needs
    gpus_over = [d for d in estimate.overfull() if any(g.name == d.device and g.is_gpu for g in devices)]
    if gpus_over and not ignore_fit:
        raise ValueError(f"{verdict(estimate)} Nothing was loaded. Ways out: fewer layers on the GPUs (-ngl), "
                         "experts on the CPU (--n-cpu-moe, -ot exps=CPU), a smaller -c or KV cache type, "
                         "`offload-studio plan` to see each device, or --ignore-fit to load it anyway")
    if not estimate.fits and not gpus_over:
        print(f"note: {verdict(estimate)} The CPU's weights run from the memory map, paged in from disk.",
              file=sys.stderr)


def load_model(args, n_ctx_default: int | None = None) -> LoadedModel:
    mf = ModelFile(args.model)
    if args.override_kv:
        from engine.arch.overrides import apply_overrides, parse_override_kv
        mf.metadata = apply_overrides(mf.metadata, [parse_override_kv(text) for text in args.override_kv])
    inventory = Inventory.from_model_file(mf)
    devices = available_devices(args.sim_gpus, args.emulate_cuda)
    llama_args = list(args.llama_args)
    if n_ctx_default and not any(a in ("-c", "--ctx-size") for a in llama_args):
        llama_args += ["-c", str(n_ctx_default)]
    parsed = parse_llama_args(llama_args, inventory, devices)
    for flag, status, message in parsed.report:
        if status == "ignored":
            print(f"note: {flag} ignored{': ' + message if message else ''}", file=sys.stderr)
    run_config = parsed.run_config.replace(n_threads=args.threads, cuda_graphs=not args.no_cuda_graphs)
    check_cache_fits(inventory, parsed, run_config, devices)
    check_gpus_fit(inventory, parsed, run_config, devices, getattr(args, "ignore_fit", False))
    model = Model.load(mf, run_config, placement=parsed.placement)
    return LoadedModel(model, Tokenizer.from_metadata(mf.metadata), parsed)
