"""llama-bench-style speed: prompt processing (pp) and text generation (tg) tokens per second,
optionally side by side with llama.cpp's own llama-bench on the same file and settings.

Tests are llama-bench's: ppN evaluates N prompt tokens into an empty cache in one batch; tgN
generates N tokens one at a time from an empty cache. One warm-up run first (it also compiles
the kernels), then `-r` timed repetitions; the mean and standard deviation are printed.

After a tg test, the decode roofline: per device, the weight bytes one token reads there (for
MoE only the selected experts: engine.plan.active_bytes) against that device's measured copy
bandwidth (the host: a NumPy copy; a CUDA device: a device-to-device copy through its runtime;
both count bytes read plus written). Devices run one after another within a token, so the
token's roofline time is the sum over devices of bytes / bandwidth, and the fraction of the
roofline reached is that time x the measured tokens per second.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass

import numpy as np

from app.commands.common import print_table
from app.commands.model_args import load_model

# llama.cpp flags that llama-bench also takes, passed on to it by --against
SHARED_LLAMA_FLAGS = ("-fa", "--flash-attn", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v",
                      "-ub", "--ubatch-size", "-b", "--batch-size")


HOST_COPY_BYTES = 1 << 29
DEVICE_COPY_BYTES = {"cupy": 1 << 30, "emulated": 1 << 26}


@dataclass(frozen=True)
class DeviceRoofline:
    device: str
    active_bytes: int           # weight bytes one decoded token reads on this device
    copy_bytes_per_s: float     # measured copy bandwidth, bytes read + written per second
    source: str                 # how it was measured: "host copy", "device copy (cupy)", ...

    def roofline_s(self) -> float:
        return self.active_bytes / self.copy_bytes_per_s


@dataclass(frozen=True)
class Speed:
    test: str               # "pp128", "tg32"
    tokens_per_s: float
    stddev: float


def _rate(samples: list[float]) -> tuple[float, float]:
    return float(np.mean(samples)), float(np.std(samples))


def measure_ours(model, n_prompts: list[int], n_gen: int, repetitions: int) -> list[Speed]:
    rng = np.random.default_rng(0)
    n_vocab = model.hparams.n_vocab
    model.eval_logits(rng.integers(0, n_vocab, 8, dtype=np.int32), model.new_cache(), last_only=True)  # warm-up
    results = []
    for n_prompt in n_prompts:
        prompt = rng.integers(0, n_vocab, n_prompt, dtype=np.int32)
        samples = []
        for _ in range(repetitions):
            cache = model.new_cache()
            start = time.perf_counter()
            model.eval_logits(prompt, cache, last_only=True)
            samples.append(n_prompt / (time.perf_counter() - start))
        results.append(Speed(f"pp{n_prompt}", *_rate(samples)))
    if n_gen > 0:
        token = np.array([1], dtype=np.int32)
        samples = []
        for _ in range(repetitions):
            cache = model.new_cache()
            model.eval_logits(token, cache)             # llama-bench's warm-up token
            start = time.perf_counter()
            for _ in range(n_gen):
                model.eval_logits(token, cache)
            samples.append(n_gen / (time.perf_counter() - start))
        results.append(Speed(f"tg{n_gen}", *_rate(samples)))
    return results


def copy_bandwidth_of(backend, host_bytes_per_s: float) -> tuple[float, str]:
    """A device's copy bandwidth: its runtime's device-to-device copy for a CUDA device, the
    host's for the CPU and for simulated GPUs (whose arrays live in host memory)."""
    runtime = getattr(backend, "runtime", None)
    if runtime is None:
        return host_bytes_per_s, "host copy"
    from kernels.cuda.bench import Timer, copy_bandwidth

    return copy_bandwidth(runtime, Timer(runtime), DEVICE_COPY_BYTES.get(runtime.name, 1 << 26)), \
        f"{runtime.name} device copy"


def measure_rooflines(model, placement) -> list[DeviceRoofline]:
    """Each device that a decoded token reads weights on, with its active bytes and bandwidth."""
    from engine.plan.active_bytes import active_bytes_per_token
    from engine.plan.inventory import Inventory
    from kernels.cpu.bench import copy_bandwidth_gb_s

    active = active_bytes_per_token(Inventory.from_model_file(model.file), placement)
    host_bytes_per_s = copy_bandwidth_gb_s(HOST_COPY_BYTES) * 1e9
    rooflines = []
    for device, n_bytes in active.items():
        if n_bytes == 0:
            continue
        backend = model.ops.backends.get(device, model.ops.backends.get("CPU"))
        rooflines.append(DeviceRoofline(device, n_bytes, *copy_bandwidth_of(backend, host_bytes_per_s)))
    return rooflines


def roofline_rows(rooflines: list[DeviceRoofline], tokens_per_s: float) -> list[list[str]]:
    """Per device: active MB per token, copy GB/s, achieved GB/s at the measured speed, the share
    of the roofline; then the whole token (the devices' roofline times added)."""
    rows = []
    for r in rooflines:
        achieved = r.active_bytes * tokens_per_s
        rows.append([r.device, f"{r.active_bytes / 1e6:.2f}", f"{r.copy_bytes_per_s / 1e9:.1f} ({r.source})",
                     f"{achieved / 1e9:.2f}", f"{achieved / r.copy_bytes_per_s:.1%}"])
    token_s = sum(r.roofline_s() for r in rooflines)
    total_bytes = sum(r.active_bytes for r in rooflines)
    rows.append(["token", f"{total_bytes / 1e6:.2f}", f"roofline {1 / token_s:.1f} t/s",
                 f"{total_bytes * tokens_per_s / 1e9:.2f}", f"{token_s * tokens_per_s:.1%}"])
    return rows


def print_rooflines(rooflines: list[DeviceRoofline], speed: Speed) -> None:
    print(f"decode roofline ({speed.test}: {speed.tokens_per_s:.2f} t/s; active weight bytes per token ÷ "
          "measured copy bandwidth)")
    print_table(["device", "active MB/token", "copy GB/s", "achieved GB/s", "of roofline"],
                roofline_rows(rooflines, speed.tokens_per_s))


def llama_bench_command(executable: str, args) -> list[str]:
    command = [executable, "-m", str(args.model), "-p", ",".join(map(str, args.n_prompt)), "-n", str(args.n_gen),
               "-r", str(args.repetitions), "-o", "json"]
    if args.threads:
        command += ["-t", str(args.threads)]
    flags = list(args.llama_args)
    for i, flag in enumerate(flags[:-1]):
        if flag in SHARED_LLAMA_FLAGS:
            command += [flag, flags[i + 1]]
    return command


def find_llama_bench(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"llama-bench not found at {name!r} (give its path to --against)")
    return found


def measure_llama_bench(executable: str, args) -> list[Speed]:
    """llama-bench's own figures for the same tests (its JSON output)."""
    command = llama_bench_command(find_llama_bench(executable), args)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    results = []
    for row in json.loads(done.stdout):
        test = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        results.append(Speed(test, float(row["avg_ts"]), float(row["stddev_ts"])))
    return results


def bench_inference(args) -> int:
    n_ctx = max(512, max(args.n_prompt) + 1, args.n_gen + 2)
    loaded = load_model(args, n_ctx_default=n_ctx)
    threads = args.threads or "all"
    name = loaded.model.file.name
    ours = measure_ours(loaded.model, args.n_prompt, args.n_gen, args.repetitions)
    rooflines = measure_rooflines(loaded.model, loaded.parsed.placement) if args.n_gen > 0 else []
    loaded.model.close()
    if not args.against:
        print_table(["model", "test", "threads", "t/s"],
                    [[name, s.test, threads, f"{s.tokens_per_s:.2f} ± {s.stddev:.2f}"] for s in ours])
        if rooflines:
            print_rooflines(rooflines, ours[-1])
        return 0
    theirs = {s.test: s for s in measure_llama_bench(args.against, args)}
    rows = []
    for s in ours:
        other = theirs.get(s.test)
        rows.append([name, s.test, threads, f"{s.tokens_per_s:.2f} ± {s.stddev:.2f}",
                     f"{other.tokens_per_s:.2f} ± {other.stddev:.2f}" if other else "-",
                     f"{s.tokens_per_s / other.tokens_per_s:.2f}x" if other else "-"])
    print_table(["model", "test", "threads", "offload-studio t/s", "llama.cpp t/s", "ratio"], rows)
    if rooflines:
        print_rooflines(rooflines, ours[-1])
    return 0
