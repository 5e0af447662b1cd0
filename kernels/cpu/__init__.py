"""CPU compute kernels (Numba) over weights kept in ggml's block formats.

    matmul(x, w_bytes, ggml_type, n_cols, out=None) -> float32 (n_tokens, n_rows)
        y = x @ W.T, W decoded block by block inside the kernel (never materialised whole).
    dequantize_rows(w_bytes, ggml_type, n_cols, rows=None) -> float32 (len(rows), n_cols)
        Rows of W, bit-exact with gguf.quants.dequantize (embedding lookup, KV cache reads).
    qmatmul(x, w_bytes, ggml_type, n_cols, out=None) -> float32 (n_tokens, n_rows)
        y = x @ W.T by llama.cpp's arithmetic: x quantized to Q8_0 / Q8_K blocks, integer dot
        products per block (types in INTEGER_TYPES). `QuantizedActivations` keeps a quantized x
        for several weights of one input type. integer_path_is_faster(type, n_tokens) says
        where it beats matmul on the same rounded inputs.
    quantize_rows(x_f32, ggml_type, out=None) -> uint8 (n, row_bytes)
        float32 rows to F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/IQ4_NL blocks, byte-exact with
        ggml's reference quantizers (KV cache writes).
    row_bytes(ggml_type, n_cols), block_shape(ggml_type)
        Sizes from gguf.constants.GGML_QUANT_SIZES.

Weights are numpy-ordered, rows first: W of shape (n_rows, n_cols) is a uint8 array
(n_rows, row_bytes(ggml_type, n_cols)), typically a read-only view of a memory-mapped GGUF
tensor. A 3-D routed-expert tensor `ffn_{gate,up,down}_exps` is (n_expert, n_rows, row_bytes)
in the same order, and each expert's matrix is one contiguous block: `w_bytes[e]` (or
`w_bytes[e, r0:r1]` for a range of its rows) is a valid weight for `matmul`, so an expert
matmul needs no entry point of its own.

Threads: the kernels run on Numba's thread pool; `numba.set_num_threads` (per calling
thread) decides how many threads a call uses. Every kernel releases the GIL.

Numba caches compiled kernels next to these sources (cache=True), but it checks only the
file of the function it loads: a kernel compiled against an older version of a function in
another file would be reused. `_drop_stale_numba_cache` below guards against that by
dropping the whole cache whenever any source of this package changes, or the integer
kernels' instruction set (`isa`: OFFLOAD_STUDIO_CPU_ISA) does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _drop_stale_numba_cache() -> None:
    package_dir = Path(__file__).resolve().parent
    cache_dir = package_dir / "__pycache__"
    digest = hashlib.sha256()
    for source in sorted(package_dir.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    digest.update(os.environ.get("OFFLOAD_STUDIO_CPU_ISA", "").encode())
    stamp = cache_dir / "numba-sources.sha256"
    try:
        if stamp.exists() and stamp.read_text() == digest.hexdigest():
            return
        for cached in (*cache_dir.glob("*.nbi"), *cache_dir.glob("*.nbc")):
            cached.unlink(missing_ok=True)
        cache_dir.mkdir(exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # a read-only install: Numba then caches elsewhere, or not at all
        pass


_drop_stale_numba_cache()

from kernels.cpu.decode import dequantize_rows  # noqa: E402
from kernels.cpu.formats import FAST_TYPES, block_shape, row_bytes  # noqa: E402
from kernels.cpu.matmul import matmul  # noqa: E402
from kernels.cpu.qmatmul import INTEGER_TYPES, QuantizedActivations, integer_path_is_faster, qmatmul  # noqa: E402
from kernels.cpu.quantize import QUANTIZE_TYPES, quantize_rows  # noqa: E402

__all__ = [
    "FAST_TYPES",
    "INTEGER_TYPES",
    "integer_path_is_faster",
    "QUANTIZE_TYPES",
    "block_shape",
    "dequantize_rows",
    "matmul",
    "qmatmul",
    "QuantizedActivations",
    "quantize_rows",
    "row_bytes",
]
