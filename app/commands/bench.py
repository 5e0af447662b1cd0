"""offload-studio bench: llama-bench-style prompt/generation speed, or planner timings.

    offload-studio bench -m MODEL.gguf -p 128,512 -n 32 [-t THREADS] [llama.cpp placement flags]
        [--against PATH/TO/llama-bench]     llama.cpp's own bench right after ours, and the ratios
    (with -n: the decode roofline per device: active weight bytes per token against the device's
    measured copy bandwidth; see app.commands.inference_bench)
    offload-studio bench -m MODEL.gguf --planner [--sim-gpus SPEC] [llama.cpp placement flags]
"""
from __future__ import annotations

import argparse
import statistics
import time

from app.commands.common import open_inventory, print_table
from app.commands.model_args import add_model_arguments


ACCEPTS_LLAMA_ARGS = True


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("-p", "--n-prompt", type=counts, default=[128], help="prompt tokens to evaluate (128,512: each)")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="tokens to generate")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="repetitions per test")
    p.add_argument("--against", metavar="LLAMA_BENCH",
                   help="llama.cpp's llama-bench (a path, or a name on PATH): run it on the same file and "
                        "settings after ours and print both and the ratio")
    p.add_argument("--planner", action="store_true", help="time the memory planner instead of inference")


def counts(text: str) -> list[int]:
    """'128,512' -> [128, 512], as llama-bench takes its -p."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, not {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive token counts, not {text!r}")
    return values


def timed(fn, repetitions: int) -> tuple[float, object]:
    """Median wall time in seconds of `repetitions` calls, and the last result."""
    times, result = [], None
    for _ in range(repetitions):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_planner(args) -> int:
    from engine.devices import available_devices
    from engine.plan.llama_args import parse_llama_args
    from engine.plan.memory import estimate_memory
    from engine.plan.placement import TensorRef

    open_s, (mf, inventory) = timed(lambda: open_inventory(args.model), 1)
    devices = available_devices(args.sim_gpus or "24GiB,24GiB,24GiB,48GiB")
    parse_s, parsed = timed(lambda: parse_llama_args(args.llama_args or ["-ngl", "all"], inventory, devices), 5)
    placement, rc = parsed.placement, parsed.run_config
    full_s, _ = timed(lambda: estimate_memory(inventory, placement, rc, devices), 20)
    expert_tensor = next((t for t in inventory.tensors if t.n_experts), None)
    other = [d.name for d in devices]
    rows = [["open file + inventory", f"{open_s * 1e3:.1f}"],
            ["parse flags + build placement", f"{parse_s * 1e3:.2f}"],
            ["full estimate", f"{full_s * 1e3:.3f}"]]

    def move_and_estimate(ref):
        current = placement.device_of(ref.name)
        target = other[(other.index(current) + 1) % len(other)]
        placement.assign(ref, target)
        return estimate_memory(inventory, placement, rc, devices)

    if expert_tensor is not None:
        one_expert = TensorRef(expert_tensor.name, frozenset({0}))
        rows.append(["move one expert + re-estimate", f"{timed(lambda: move_and_estimate(one_expert), 50)[0] * 1e3:.3f}"])
    one_tensor = TensorRef(inventory.layers[-1].tensors[0].name)
    rows.append(["move one tensor + re-estimate", f"{timed(lambda: move_and_estimate(one_tensor), 50)[0] * 1e3:.3f}"])
    print(f"{inventory.name}: {inventory.n_layer} layers, {inventory.n_expert} experts, "
          f"{len(inventory.tensors)} tensors, devices {', '.join(d.name for d in devices)}")
    print_table(["planner step", "median ms"], rows)
    return 0


def run(args) -> int:
    if args.planner:
        return bench_planner(args)
    from app.commands.inference_bench import bench_inference
    return bench_inference(args)
