"""Timing of the CPU matmuls on synthetic weights, and this machine's memory bandwidth.

    python -m kernels.cpu.bench        prints, on 1 thread and on Numba's thread count, the
                                       figures for Gemma 3 270M's shapes and a one-token product
                                       of every integer type: the float path (matmul), the
                                       integer path (qmatmul), and a read of the same bytes (the
                                       roofline a decode step streams against); and a copy
                                       benchmark
"""

from __future__ import annotations

import time

import numba
import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QType

from kernels.cpu.formats import as_ggml_type
from kernels.cpu.matmul import matmul
from kernels.cpu.qmatmul import INTEGER_TYPES, Q8_K_INPUT_TYPES, qmatmul
from kernels.cpu.quantize import QUANTIZE_TYPES, quantize_rows

# Byte offsets of float16 scale fields in a block: random bytes there could be NaN, infinite
# or subnormal, and subnormal arithmetic would distort the timing.
_F16_SCALE_OFFSETS = {
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,),
    "IQ3_S": (0,), "IQ1_S": (0,),
}


def synthetic_weight(ggml_type: int | QType, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """Plausible weight bytes (n_rows, row_bytes): quantized normal data where quantize_rows
    supports the type, else random blocks with small float16 scales."""
    qtype = as_ggml_type(ggml_type)
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZE_TYPES:
        rows_per_step = max(1, (1 << 22) // n_cols)  # bounded scratch for huge matrices
        parts = []
        for r0 in range(0, n_rows, rows_per_step):
            values = rng.standard_normal((min(rows_per_step, n_rows - r0), n_cols), dtype=np.float32)
            parts.append(quantize_rows(values * np.float32(0.05), qtype))
        return np.concatenate(parts)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_rows, n_cols // block_size, type_size), dtype=np.uint8)
    for offset in _F16_SCALE_OFFSETS.get(qtype.name, ()):
        scales = rng.uniform(1e-3, 1e-2, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(n_rows, -1)


def bench_matmul(
    ggml_type: int | QType,
    n_rows: int,
    n_cols: int,
    n_tokens: int,
    repeats: int = 10,
    integer: bool = False,
    w: np.ndarray | None = None,
) -> float:
    """Least seconds of one matmul of (n_tokens, n_cols) activations with an (n_rows, n_cols)
    weight of ggml_type (w, or synthetic_weight's), on Numba's current thread count, after one
    untimed warm-up call; integer: through qmatmul (activation quantization included), else the
    float path. The least, not the median: on a shared machine the median of a sub-millisecond
    product on the thread pool can be a scheduler time slice."""
    if w is None:
        w = synthetic_weight(ggml_type, n_rows, n_cols)
    x = np.random.default_rng(1).standard_normal((n_tokens, n_cols), dtype=np.float32)
    out = np.empty((n_tokens, n_rows), dtype=np.float32)
    product = qmatmul if integer else matmul
    product(x, w, ggml_type, n_cols, out=out)
    seconds = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        product(x, w, ggml_type, n_cols, out=out)
        seconds.append(time.perf_counter() - start)
    return min(seconds)


@numba.njit(cache=True, nogil=True, parallel=True)
def _read_words(words, n_parts, out):
    """XOR of every 64-bit word, in n_parts contiguous parts over the thread pool: a pure read."""
    per_part = words.shape[0] // n_parts
    for part in numba.prange(n_parts):
        acc = np.uint64(0)
        for k in range(part * per_part, (part + 1) * per_part):
            acc ^= words[k]
        out[part] = acc


def read_seconds(w: np.ndarray, repeats: int = 10) -> float:
    """Best time to read the bytes of w once on Numba's current thread count (whole 64-byte
    lines; a tail under 64 bytes per part is left out), the decode roofline for w."""
    n_parts = numba.get_num_threads()
    flat = np.ascontiguousarray(w).reshape(-1)
    words = flat[: flat.nbytes // (64 * n_parts) * 64 * n_parts].view(np.uint64)
    out = np.empty(n_parts, dtype=np.uint64)
    _read_words(words, n_parts, out)
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        _read_words(words, n_parts, out)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth_gb_s(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Best read + write rate of a large memory copy (bytes read plus bytes written per second),
    a memory roofline (one thread: numpy copies on the calling thread)."""
    source = np.ones(n_bytes, dtype=np.uint8)
    target = np.empty_like(source)
    np.copyto(target, source)       # fault the pages in first
    best = min(_timed_copy(source, target) for _ in range(max(1, repeats)))
    return 2 * n_bytes / best / 1e9


def _timed_copy(source: np.ndarray, target: np.ndarray) -> float:
    start = time.perf_counter()
    np.copyto(target, source)
    return time.perf_counter() - start


# (type, n_rows, n_cols, n_tokens): Gemma 3 270M Q4_K_M's output matrix (a tied Q8_0
# embedding), Qwen3-30B-A3B Q4_K_M's Q6_K output matrix, and Gemma's FFN matrices.
GEMMA3_270M_CASES = [
    ("Q8_0", 262144, 640, 1),
    ("Q6_K", 151936, 2048, 1),
    ("Q4_K", 640, 2048, 1),
    ("Q6_K", 640, 2048, 1),
    ("Q5_0", 2048, 640, 1),
    ("Q4_K", 640, 2048, 512),
    ("Q5_0", 2048, 640, 512),
]
# one token through every other integer type, in Gemma's FFN shapes
DECODE_CASES = [
    (qtype.name, 640, 2048, 1) if qtype in Q8_K_INPUT_TYPES else (qtype.name, 2048, 640, 1)
    for qtype in sorted(INTEGER_TYPES) if qtype.name not in ("Q4_K", "Q6_K", "Q5_0")
]


def print_case(w: np.ndarray, type_name: str, n_rows: int, n_cols: int, n_tokens: int) -> None:
    flops = 2.0 * n_rows * n_cols * n_tokens
    repeats = 10 if w.nbytes > (1 << 26) else 100
    line = f"{type_name:6s} {n_rows:6d} x {n_cols:4d}, {n_tokens:3d} tokens:"
    for integer in (False, True):
        seconds = bench_matmul(QType[type_name], n_rows, n_cols, n_tokens, repeats, integer, w)
        line += (f"  {'integer' if integer else 'float'} {seconds * 1e3:8.3f} ms "
                 f"({flops / seconds / 1e9:5.1f} GFLOP/s, {w.nbytes / seconds / 1e9:5.1f} GB/s)")
    if n_tokens == 1:
        line += f"  read {w.nbytes / read_seconds(w, repeats) / 1e9:5.1f} GB/s"
    print(line, flush=True)


def main() -> None:
    print(f"memory copy {copy_bandwidth_gb_s():.1f} GB/s (read + write)")
    cases = GEMMA3_270M_CASES + DECODE_CASES
    weights = [synthetic_weight(QType[case[0]], case[1], case[2]) for case in cases]
    for n_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(n_threads)
        print(f"{n_threads} thread(s)")
        for w, case in zip(weights, cases):
            print_case(w, *case)


if __name__ == "__main__":
    main()
