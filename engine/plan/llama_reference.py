"""llama.cpp's own memory figures for a model and run settings: the command that makes it print
them, and the reader of what it prints.

`llama-perplexity` with `--fit on` first loads the model without allocating anything (no weights
read, no cache or compute memory taken) to size every buffer, and prints the sizes as it goes
(`sched_reserve: CPU compute buffer size = ...`, `graph: nodes = ...`). That dry pass takes
seconds even for a sparse DeepSeek-V3-shaped file, so the caller can stop llama.cpp once it has
printed them (`DRY_PASS_DONE`); the real load that follows is only needed for KV and weight
buffers (`--full-load` in `offload-studio plan --check-against`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from engine.run_config import RunConfig

MIB = 1 << 20
DRY_PASS_DONE = re.compile(r"sched_reserve: graph: nodes = \d+")
# llama.cpp refused the settings (its dry pass reports it and the real load would fail too)
REFUSED = re.compile(r"common_fit_params: encountered an error|llama_init_from_model: .*(?:not support|failed)|"
                     r"error loading model|failed to load model")
_COMPUTE = re.compile(r"sched_reserve:\s+(\S+) compute buffer size =\s+([\d.]+) MiB")
_NODES = re.compile(r"sched_reserve: graph: nodes = (\d+)(?: / \d+)?, splits = (\d+)")
_OUTPUT = re.compile(r"llama_context:\s+(\S+)\s+output buffer size =\s+([\d.]+) MiB")
_KV = re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB")
_MODEL = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_FLASH = re.compile(r"resolve_fused_ops: Flash Attention (enabled|not supported)")
PRINTED_MIB = 0.005         # llama.cpp prints MiB with two decimals


@dataclass(frozen=True)
class LlamaPass:
    """The buffers of one load (the dry pass or the real one), in bytes, by buffer type."""
    compute_bytes: dict[str, int] = field(default_factory=dict)
    output_bytes: dict[str, int] = field(default_factory=dict)
    kv_bytes: dict[str, int] = field(default_factory=dict)
    model_bytes: dict[str, int] = field(default_factory=dict)
    n_nodes: int = 0
    n_splits: int = 0
    flash_attn: bool | None = None


def _mib_bytes(text: str) -> int:
    return round(float(text) * MIB)


def _add(table: dict[str, int], key: str, n_bytes: int) -> None:
    table[key] = table.get(key, 0) + n_bytes


def parse_llama_log(text: str) -> list[LlamaPass]:
    """Each load's figures, in order: with --fit the first is the dry pass."""
    passes: list[dict] = []
    current: dict = {}

    def start_if_needed():
        if not current:
            current.update(compute={}, output={}, kv={}, model={}, nodes=0, splits=0, flash=None)

    for line in text.splitlines():
        if m := _MODEL.search(line):
            start_if_needed()
            _add(current["model"], m.group(1), _mib_bytes(m.group(2)))
        elif m := _OUTPUT.search(line):
            start_if_needed()
            _add(current["output"], m.group(1), _mib_bytes(m.group(2)))
        elif m := _KV.search(line):
            start_if_needed()
            _add(current["kv"], m.group(1), _mib_bytes(m.group(2)))
        elif m := _FLASH.search(line):
            start_if_needed()
            current["flash"] = m.group(1) == "enabled"
        elif m := _COMPUTE.search(line):
            start_if_needed()
            current["compute"][m.group(1)] = _mib_bytes(m.group(2))
        elif m := _NODES.search(line):
            start_if_needed()
            current["nodes"], current["splits"] = int(m.group(1)), int(m.group(2))
            passes.append(dict(current))
            current.clear()
    return [LlamaPass(p["compute"], p["output"], p["kv"], p["model"], p["nodes"], p["splits"], p["flash"])
            for p in passes]


def perplexity_command(binary: str, model_path: str, text_path: str, rc: RunConfig, n_ctx: int) -> list[str]:
    """llama-perplexity with the run settings of `rc`. The tool runs batch / context sequences in
    parallel, so the batch is held to the context: one sequence, as the plan assumes."""
    n_batch = min(rc.n_batch, n_ctx)
    return [binary, "-m", model_path, "-f", text_path, "-c", str(n_ctx), "-b", str(n_batch),
            "-ub", str(min(rc.n_ubatch, n_batch)), "-fa", rc.flash_attn, "-ctk", rc.type_k, "-ctv", rc.type_v,
            "-t", "2", "-v", "-nr", "--no-warmup", "--chunks", "1", "--fit", "on"]


def comparable_run_config(rc: RunConfig, n_ctx: int) -> RunConfig:
    """The settings llama-perplexity really runs with `perplexity_command`."""
    n_batch = min(rc.n_batch, n_ctx)
    return rc.replace(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(rc.n_ubatch, n_batch), n_seq=1)
