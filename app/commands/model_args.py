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
from engine.run.model import Model
from engine.text.tokenizer import Tokenizer

ACCEPTS_LLAMA_ARGS = True


def add_model_arguments(p) -> None:
    p.add_argument("-m", "--model", required=True, help="GGUF file")
    p.add_argument("--sim-gpus", help="simulated GPUs, e.g. 24GiB,24GiB (run on the CPU backend)")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("-okv", "--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="override a metadata value, e.g. llama4.expert_used_count=int:2 (repeatable)")
    p.epilog = ("Other flags are read as llama.cpp placement and run flags: -ngl, -ts, -ot, --n-cpu-moe, "
                "-c, -ctk/-ctv, -ub, -b, -fa.")


@dataclass
class LoadedModel:
    model: Model
    tokenizer: Tokenizer
    parsed: ParsedArgs


def load_model(args, n_ctx_default: int | None = None) -> LoadedModel:
    mf = ModelFile(args.model)
    if args.override_kv:
        from engine.arch.overrides import apply_overrides, parse_override_kv
        mf.metadata = apply_overrides(mf.metadata, [parse_override_kv(text) for text in args.override_kv])
    inventory = Inventory.from_model_file(mf)
    devices = available_devices(args.sim_gpus)
    llama_args = list(args.llama_args)
    if n_ctx_default and not any(a in ("-c", "--ctx-size") for a in llama_args):
        llama_args += ["-c", str(n_ctx_default)]
    parsed = parse_llama_args(llama_args, inventory, devices)
    for flag, status, message in parsed.report:
        if status == "ignored":
            print(f"note: {flag} ignored{': ' + message if message else ''}", file=sys.stderr)
    run_config = parsed.run_config.replace(n_threads=args.threads)
    model = Model.load(mf, run_config, placement=parsed.placement)
    return LoadedModel(model, Tokenizer.from_metadata(mf.metadata), parsed)
