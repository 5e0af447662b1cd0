"""Timing of the CPU matmuls on synthetic weights, and this machine's memory bandwidth.

    python -m kernels.cpu.bench        prints the figures for Gemma 3 270M's shapes: the float
                                       path (matmul) and the integer path (qmatmul), and a copy
                                       benchmark, the roofline a decode step streams against
"""

from __future__ import annotations

import time

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QType

from kernels.cpu.formats import as_ggml_type
from kernels.cpu.matmul import matmul
from kernels.cpu.qmatmul import qmatmul
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
) -> float:
    """Median seconds of one matmul of (n_tokens, n_cols) activations with an (n_rows, n_cols)
    weight of ggml_type, on Numba's current thread count, after one untimed warm-up call;
    integer: through qmatmul (activation quantization included), else the float path."""
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
    return float(np.median(seconds))


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
# embedding), its FFN matrices, and a Q6_K output matrix of a model with n_embd 768.
GEMMA3_270M_CASES = [
    ("Q8_0", 262144, 640, 1),
    ("Q6_K", 262144, 768, 1),
    ("Q4_K", 640, 2048, 1),
    ("Q6_K", 640, 2048, 1),
    ("Q5_0", 2048, 640, 1),
    ("Q4_K", 640, 2048, 512),
    ("Q5_0", 2048, 640, 512),
]


def main() -> None:
    import numba

    print(f"numba threads: {numba.get_num_threads()}; memory copy {copy_bandwidth_gb_s():.1f} GB/s (read + write)")
    for type_name, n_rows, n_cols, n_tokens in GEMMA3_270M_CASES:
        weight_bytes = synthetic_weight(QType[type_name], 1, n_cols).nbytes * n_rows
        flops = 2.0 * n_rows * n_cols * n_tokens
        for integer in (False, True):
            seconds = bench_matmul(QType[type_name], n_rows, n_cols, n_tokens, integer=integer)
            print(f"{type_name:5s} {n_rows:7d} x {n_cols:5d}, {n_tokens:4d} tokens, "
                  f"{'integer' if integer else 'float  '}: {seconds * 1e3:8.3f} ms  "
                  f"({flops / seconds / 1e9:6.1f} GFLOP/s, weights at {weight_bytes / seconds / 1e9:5.1f} GB/s)")


if __name__ == "__main__":
    main()
