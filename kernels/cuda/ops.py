"""Thin launchers of the CUDA kernels: each checks shapes, dtypes, contiguity and alignment, picks
the grid, and launches on a runtime (`runtime.CupyRuntime` or `runtime.EmulatedRuntime`).

Arrays are the runtime's device arrays (cupy.ndarray or EmuArray); shapes are NumPy order.
Weights are uint8 (n_rows, row_bytes) in their GGUF encoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_DECODE_TOKENS = 8
Q8_1_BLOCK_BYTES = 40           # block_q8_1 in quant.cuh: float d, float s, int8 qs[32]


@dataclass(frozen=True)
class QuantFormat:
    name: str
    ggml_type: int
    block_values: int           # values per block (QK)
    block_bytes: int

    @property
    def is_float(self) -> bool:
        return self.name in ("F32", "F16", "BF16")


FORMATS = {f.name: f for f in (
    QuantFormat("F32", 0, 1, 4), QuantFormat("F16", 1, 1, 2), QuantFormat("BF16", 30, 1, 2),
    QuantFormat("Q4_0", 2, 32, 18), QuantFormat("Q4_1", 3, 32, 20), QuantFormat("Q5_0", 6, 32, 22),
    QuantFormat("Q5_1", 7, 32, 24), QuantFormat("Q8_0", 8, 32, 34), QuantFormat("Q2_K", 10, 256, 84),
    QuantFormat("Q3_K", 11, 256, 110), QuantFormat("Q4_K", 12, 256, 144), QuantFormat("Q5_K", 13, 256, 176),
    QuantFormat("Q6_K", 14, 256, 210), QuantFormat("IQ4_NL", 20, 32, 18), QuantFormat("IQ4_XS", 23, 256, 136),
)}
FORMATS_BY_TYPE = {f.ggml_type: f for f in FORMATS.values()}


class KernelArgumentError(ValueError):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KernelArgumentError(message)


def _contiguous(a, what: str) -> None:
    _require(bool(a.flags["C_CONTIGUOUS"]), f"{what} must be C-contiguous")


def _dtype(a, dtype, what: str) -> None:
    _require(a.dtype == np.dtype(dtype), f"{what} must be {np.dtype(dtype)}, got {a.dtype}")


def _pointer(a) -> int:
    return a.ptr if hasattr(a, "ptr") else a.data.ptr


def _aligned(a, alignment: int, what: str) -> None:
    _require(_pointer(a) % alignment == 0, f"{what} must be {alignment}-byte aligned")


def _i32(v) -> np.int32:
    return np.int32(v)


def _f32(v) -> np.float32:
    return np.float32(v)


def _launch(rt, source: str, kernel: str, grid, block, args, shared_bytes: int = 0) -> None:
    """Launch with the source's full list of template instances, so each source builds once."""
    rt.launch(source, kernel, grid, block, args, shared_bytes, name_expressions=NAME_EXPRESSIONS.get(source, ()))


# ---- matmul for decode -------------------------------------------------------------------------

def matvec_name(fmt: QuantFormat) -> str:
    kernel = "mul_mat_vec_f" if fmt.is_float else "mul_mat_vec_q"
    return f"{kernel}<{fmt.ggml_type}>"


def all_matvec_names() -> tuple[str, ...]:
    return tuple(matvec_name(f) for f in FORMATS.values())


def quantize_q8_1(rt, x):
    """x: (n_tokens, n_cols) f32, n_cols % 32 == 0 -> (n_tokens, n_cols / 32 * 40) uint8 q8_1 blocks."""
    _dtype(x, np.float32, "x")
    _contiguous(x, "x")
    n_tokens, n_cols = x.shape
    _require(n_cols % 32 == 0, f"q8_1 needs a multiple of 32 columns, got {n_cols}")
    n_blocks = n_tokens * n_cols // 32
    y = rt.alloc((n_tokens, n_cols // 32 * Q8_1_BLOCK_BYTES), np.uint8)
    _launch(rt, "matvec.cu", "quantize_q8_1", -(-n_blocks // 8), 256, (x, y, _i32(n_blocks)))
    return y


def matvec(rt, x, weight, type_name: str, n_cols: int, out=None):
    """x @ W.T for 1 to 8 tokens: x (n_tokens, n_cols) f32, weight (n_rows, row_bytes) uint8 -> (n_tokens, n_rows) f32."""
    fmt = FORMATS.get(type_name)
    _require(fmt is not None, f"no CUDA matvec for {type_name} (have {', '.join(FORMATS)})")
    _dtype(x, np.float32, "x")
    _dtype(weight, np.uint8, "weight")
    _contiguous(x, "x")
    _contiguous(weight, "weight")
    n_tokens = x.shape[0]
    _require(x.ndim == 2 and x.shape[1] == n_cols, f"x must be (n_tokens, {n_cols}), got {x.shape}")
    _require(1 <= n_tokens <= MAX_DECODE_TOKENS, f"matvec takes 1 to {MAX_DECODE_TOKENS} tokens, got {n_tokens}")
    _require(n_cols % fmt.block_values == 0, f"{type_name} rows need a multiple of {fmt.block_values} columns")
    n_rows, row_bytes = weight.shape
    _require(row_bytes == n_cols // fmt.block_values * fmt.block_bytes,
             f"{type_name} rows of {n_cols} values are {n_cols // fmt.block_values * fmt.block_bytes} bytes, got {row_bytes}")
    _aligned(weight, 4 if fmt.name == "F32" else 2, "weight")
    if out is None:
        out = rt.alloc((n_tokens, n_rows), np.float32)
    _require(out.shape == (n_tokens, n_rows) and out.dtype == np.float32, f"out must be f32 {(n_tokens, n_rows)}")
    if fmt.is_float:
        activations = x
    else:
        _require(n_cols % 32 == 0, "quantized rows are whole 32-value units")
        activations = quantize_q8_1(rt, x)
    _launch(rt, "matvec.cu", matvec_name(fmt), -(-n_rows // 4), 128,
            (weight, activations, out, _i32(n_rows), _i32(n_cols), _i32(row_bytes), _i32(n_tokens), _i32(n_rows)))
    return out


# ---- rows: embedding lookup and dequantization ---------------------------------------------------

def _weight_format(weight, type_name: str, n_cols: int) -> QuantFormat:
    fmt = FORMATS.get(type_name)
    _require(fmt is not None, f"no CUDA kernels for {type_name} (have {', '.join(FORMATS)})")
    _dtype(weight, np.uint8, "weight")
    _contiguous(weight, "weight")
    _require(n_cols % fmt.block_values == 0, f"{type_name} rows need a multiple of {fmt.block_values} columns")
    expected = n_cols // fmt.block_values * fmt.block_bytes
    _require(weight.shape[-1] == expected, f"{type_name} rows of {n_cols} values are {expected} bytes, got {weight.shape[-1]}")
    _aligned(weight, 4 if fmt.name == "F32" else 2, "weight")
    return fmt


def get_rows(rt, table, ids, type_name: str, n_cols: int):
    """Rows `ids` (device int64 (n,)) of a (n_rows, row_bytes) table as float32 (n, n_cols)."""
    fmt = _weight_format(table, type_name, n_cols)
    _dtype(ids, np.int64, "ids")
    _contiguous(ids, "ids")
    out = rt.alloc((ids.shape[0], n_cols), np.float32)
    if ids.shape[0]:
        _launch(rt, "rows.cu", f"get_rows<{fmt.ggml_type}>", (ids.shape[0], -(-n_cols // 256)), 256,
                (table, ids, out, _i32(n_cols), _i32(table.shape[-1])))
    return out


def dequantize_rows(rt, weight, type_name: str, n_cols: int, out=None):
    """A (n_rows, row_bytes) weight tile decoded to float32 (n_rows, n_cols)."""
    fmt = _weight_format(weight, type_name, n_cols)
    n_rows = weight.shape[0]
    if out is None:
        out = rt.alloc((n_rows, n_cols), np.float32)
    _require(out.shape == (n_rows, n_cols) and out.dtype == np.float32, f"out must be f32 {(n_rows, n_cols)}")
    if n_rows:
        _launch(rt, "rows.cu", f"dequantize_rows<{fmt.ggml_type}>", (n_rows, -(-n_cols // 256)), 256,
                (weight, out, _i32(n_cols), _i32(weight.shape[-1])))
    return out


def matmul_prefill(rt, x, weight, type_name: str, n_cols: int, tile_rows: int = 4096):
    """x (n_tokens, n_cols) @ W.T for many tokens: weight tiles decoded to float32 on the device
    and multiplied by cuBLAS (CuPy), or by NumPy on the emulator."""
    _dtype(x, np.float32, "x")
    n_rows = weight.shape[0]
    parts = []
    for r0 in range(0, n_rows, tile_rows):
        tile = dequantize_rows(rt, weight[r0:r0 + tile_rows], type_name, n_cols)
        parts.append(rt.gemm_nt(x, tile))
    return parts[0] if len(parts) == 1 else rt.concat(parts, axis=1)


# Template instances each source is built with (CuPy name_expressions; the emulator's entry points)
NAME_EXPRESSIONS = {
    "matvec.cu": all_matvec_names(),
    "rows.cu": tuple(f"{kernel}<{f.ggml_type}>" for kernel in ("get_rows", "dequantize_rows") for f in FORMATS.values()),
}
