#!/usr/bin/env bash
# One prepared check of the CUDA backend on a machine with an NVIDIA GPU and no network.
#
#   tools/gpu_check.sh OUTDIR [WHEELS_DIR]
#
# The machine is expected to have Python 3.12 with CuPy for CUDA 13 (cupy-cuda13x), NumPy, Numba,
# jinja2, tokenizers, psutil and nvidia-ml-py. Whatever else the project needs comes from WHEELS_DIR
# (made beforehand on a machine with network, for the GPU box's Python):
#
#   pip download -d wheels --only-binary=:all: --python-version 3.12 \
#       gguf platformdirs google-re2 array-api-compat array-api-strict pytest
#
# Steps (each with its own time limit; the limits add up to 7.5 minutes, so the run stays under 8):
#   1. environment: a venv over the system packages, the wheels installed, the GPU described;
#   2. the `gpu` tests: every kernel on CuPy, the backend conformance suite on CUDA, llama.cpp
#      fixture parity (check 1) fully on the GPU and hybrid (routed experts on the CPU), and for the
#      hybrid DeltaNet models (qwen35*, qwen3next) fully on the GPU and split with the CPU;
#   3. the decode step as a CUDA graph: the model's captured step against direct launches of it,
#      the eager CUDA path and the CPU (llama, qwen3moe, gemma3 fixtures);
#      then the decode roofline bench (kernels/cuda/bench.py) on Qwen3-30B-A3B's shapes;
#   4. `offload-studio bench` on a synthetic Qwen3-30B-A3B Q4_K_M (6 of its 48 layers, each
#      layer at full size) fully on the GPU with CUDA graphs and without (--no-cuda-graphs), and
#      hybrid (-ot exps=CPU), with pynvml's memory after the run against the planner's estimate;
#   5. the bandwidth figures (each device's copy bandwidth, active bytes per token, the share of
#      the roofline reached) gathered from steps 3 and 4 into bandwidth.txt and the summary.
# Everything lands in OUTDIR: summary.txt first, one log per step beside it.
set -u
if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [WHEELS_DIR]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
WHEELS=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }

step() {    # step NAME TIMEOUT_S COMMAND...: run, log to OUTDIR/NAME.log, record the verdict
    local name=$1 limit=$2
    shift 2
    say "step $name (limit ${limit}s): $*"
    ( cd "$REPO" && timeout "$limit" "$@" ) > "$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then say "  $name: ok"; elif [ $rc -eq 124 ]; then say "  $name: TIMED OUT"; else say "  $name: FAILED (exit $rc)"; fi
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
    return $rc
}

# 1. environment ---------------------------------------------------------------------------------
say "offload-studio GPU check, commit $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -z "${GPU_CHECK_NO_VENV:-}" ]; then      # GPU_CHECK_NO_VENV=1: use the current environment as it is
    "$PY" -m venv --system-site-packages "$OUT/venv" >> "$OUT/setup.log" 2>&1 || { say "cannot make a venv"; exit 1; }
    # shellcheck disable=SC1091
    . "$OUT/venv/bin/activate"
fi
if [ -n "$WHEELS" ]; then
    pip install --no-index --find-links "$WHEELS" gguf platformdirs google-re2 array-api-compat array-api-strict \
        pytest >> "$OUT/setup.log" 2>&1 || say "  some wheels did not install (see setup.log)"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OFFLOAD_STUDIO_CUDA_EMU_CACHE="$OUT/emu-cache"
export CUPY_CACHE_DIR="$OUT/cupy-cache"
export QT_QPA_PLATFORM=offscreen
# the multi-GPU test maps its CUDA1 onto GPU 0 itself; a second real GPU is used when present
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 4)"
step env 20 python -c "
import cupy, numpy, sys
print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__)
print('cupy.is_available', cupy.is_available(), 'devices', cupy.cuda.runtime.getDeviceCount())
print('cuda runtime', cupy.cuda.runtime.runtimeGetVersion(), 'driver', cupy.cuda.runtime.driverGetVersion())
import gguf, array_api_strict, re2; print('gguf', gguf.__name__, 'ok')
" || say "  the environment is incomplete: later steps may fail for that reason"

# 2. the gpu tests ---------------------------------------------------------------------------------
step gpu-tests 110 python -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
    tests/kernels/cuda tests/engine/backends/test_conformance.py tests/engine/backends/test_cuda.py \
    tests/engine/arch/test_qwen35.py tests/engine/arch/test_delta_net_mixer.py

# 3. the decode step as a CUDA graph, and the decode roofline -------------------------------------
step graph-decode 60 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/backends/test_cuda_graph_decode.py \
    tests/engine/backends/test_cuda_graph.py
step roofline 35 python -m kernels.cuda.bench --layers 48 --reps 20

# 4. model bench: synthetic Qwen3-30B-A3B, all on the GPU and hybrid --------------------------------
LAYERS=${GPU_CHECK_LAYERS:-6}
MODEL="$OUT/qwen3-30b-a3b-${LAYERS}L-Q4_K_M.gguf"
if step synth 75 python -m app.cli synth --preset qwen3-30b-a3b --quant Q4_K_M --layers "$LAYERS" -o "$MODEL"; then
    step bench-gpu 40 python -m app.cli bench -m "$MODEL" -p 512 -n 32 -r 2 -ngl 99
    step bench-gpu-no-graphs 35 python -m app.cli bench -m "$MODEL" -p 512 -n 32 -r 2 -ngl 99 --no-cuda-graphs
    step bench-hybrid 40 python -m app.cli bench -m "$MODEL" -p 512 -n 32 -r 2 -ngl 99 -ot exps=CPU
    step memory 35 python - "$MODEL" <<'PY'
# pynvml's used memory on CUDA0 after loading and after a 2048-token prefill, against the planner
import sys

import numpy as np
import pynvml

from engine.devices import available_devices
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.llama_args import parse_llama_args
from engine.plan.memory import estimate_memory
from engine.run.model import Model

mf = ModelFile(sys.argv[1])
inventory = Inventory.from_model_file(mf)
devices = available_devices()
parsed = parse_llama_args(["-ngl", "99", "-c", "4096", "-ub", "512"], inventory, devices)
estimate = estimate_memory(inventory, parsed.placement, parsed.run_config, devices)
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
baseline = used()
model = Model.load(mf, parsed.run_config, placement=parsed.placement)
loaded = used()
cache = model.new_cache()
tokens = np.random.default_rng(0).integers(3, inventory.hparams.n_vocab, 2048).astype(np.int32)
for start in range(0, len(tokens), 512):
    model.eval_logits(tokens[start:start + 512], cache)
ran = used()
d = estimate["CUDA0"]
print(f"planner CUDA0: weights {d.weights_bytes / 2**20:.0f} MiB, kv {d.kv_bytes / 2**20:.0f} MiB, "
      f"compute {d.compute_bytes / 2**20:.0f} MiB, overhead {d.overhead_bytes / 2**20:.0f} MiB, "
      f"total {d.total_bytes / 2**20:.0f} MiB")
print(f"measured CUDA0 (pynvml, over the {baseline / 2**20:.0f} MiB in use before): after load "
      f"{(loaded - baseline) / 2**20:.0f} MiB, after a 2048-token prefill {(ran - baseline) / 2**20:.0f} MiB")
print(f"measured / planned: {(ran - baseline) / d.total_bytes:.3f}")
PY
fi
rm -f "$MODEL"

# 5. bandwidth figures: the copy bandwidths and the roofline shares the benches measured ------------
{
    echo "kernels.cuda.bench --layers 48 (matvecs of one Qwen3-30B-A3B token):"
    grep -E "copy bandwidth|one token over|CUDA graph" "$OUT/roofline.log" 2>/dev/null
    for run in bench-gpu bench-gpu-no-graphs bench-hybrid; do
        case $run in
            bench-hybrid) flags="-ngl 99 -ot exps=CPU" ;;
            bench-gpu-no-graphs) flags="-ngl 99 --no-cuda-graphs" ;;
            *) flags="-ngl 99" ;;
        esac
        echo "offload-studio $run ($flags):"
        sed -n '/^decode roofline/,$p' "$OUT/$run.log" 2>/dev/null
    done
} > "$OUT/bandwidth.txt"
say "bandwidth figures (bandwidth.txt):"
sed 's/^/    /' "$OUT/bandwidth.txt" >> "$SUMMARY"
say "done in $(( $(date +%s) - START ))s; logs in $OUT"
