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

def matvec_name(fmt: QuantFormat, exact: bool = False) -> str:
    kernel = "mul_mat_vec_f" if fmt.is_float or exact else "mul_mat_vec_q"
    return f"{kernel}<{fmt.ggml_type}>"


def all_matvec_names() -> tuple[str, ...]:
    names = (matvec_name(f, exact) for f in FORMATS.values() for exact in (False, True))
    return tuple(dict.fromkeys(name for base in names for name in (base, base.replace("_vec_", "_vec_id_"))))


def quantize_q8_1(rt, x, out=None):
    """x: (n_tokens, n_cols) f32, n_cols % 32 == 0 -> (n_tokens, n_cols / 32 * 40) uint8 q8_1 blocks."""
    _dtype(x, np.float32, "x")
    _contiguous(x, "x")
    n_tokens, n_cols = x.shape
    _require(n_cols % 32 == 0, f"q8_1 needs a multiple of 32 columns, got {n_cols}")
    n_blocks = n_tokens * n_cols // 32
    y = rt.alloc((n_tokens, n_cols // 32 * Q8_1_BLOCK_BYTES), np.uint8) if out is None else out
    _require(y.shape == (n_tokens, n_cols // 32 * Q8_1_BLOCK_BYTES) and y.dtype == np.uint8, "q8_1 out has the wrong shape")
    _launch(rt, "matvec.cu", "quantize_q8_1", -(-n_blocks // 8), 256, (x, y, _i32(n_blocks)))
    return y


def matvec(rt, x, weight, type_name: str, n_cols: int, out=None, exact: bool = False, q8_scratch=None):
    """x @ W.T for 1 to 8 tokens: x (n_tokens, n_cols) f32, weight (n_rows, row_bytes) uint8 -> (n_tokens, n_rows) f32.

    Quantized weights take q8_1-rounded activations and integer dot products (llama.cpp's CUDA
    path) unless `exact`, which multiplies the decoded weights with x as it is. With `out` and
    `q8_scratch` given nothing is allocated (a launch sequence that can be captured in a CUDA graph)."""
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
    if fmt.is_float or exact:
        activations = x
    else:
        _require(n_cols % 32 == 0, "quantized rows are whole 32-value units")
        activations = quantize_q8_1(rt, x, q8_scratch)
    _launch(rt, "matvec.cu", matvec_name(fmt, exact), -(-n_rows // 4), 128,
            (weight, activations, out, _i32(n_rows), _i32(n_cols), _i32(row_bytes), _i32(n_tokens), _i32(n_rows)))
    return out


def expert_matvec(rt, x, weight, ids, type_name: str, n_cols: int, exact: bool = False):
    """One token through the experts `ids` (device int64 (k,)) of weight (n_expert, n_rows,
    row_bytes) uint8 -> (k, n_rows) f32, slot s through expert ids[s]; x is (1, n_cols), shared by
    the slots, or (k, n_cols), one row per slot. Nothing is read back to the host: the router's
    choice stays on the device (a decode step captured as a CUDA graph)."""
    fmt = FORMATS.get(type_name)
    _require(fmt is not None, f"no CUDA matvec for {type_name} (have {', '.join(FORMATS)})")
    _float_array(x, "x")
    _dtype(weight, np.uint8, "weight")
    _contiguous(weight, "weight")
    _dtype(ids, np.int64, "ids")
    _contiguous(ids, "ids")
    _require(weight.ndim == 3, f"weight must be (n_expert, n_rows, row_bytes), got {weight.shape}")
    n_expert, n_rows, row_bytes = weight.shape
    k = ids.shape[0]
    _require(ids.shape == (k,) and 0 < k <= n_expert, f"ids must be (k,) with 0 < k <= {n_expert}, got {ids.shape}")
    _require(x.ndim == 2 and x.shape[0] in (1, k) and x.shape[1] == n_cols, f"x must be (1 or {k}, {n_cols}), got {x.shape}")
    _require(n_cols % fmt.block_values == 0 and row_bytes == n_cols // fmt.block_values * fmt.block_bytes,
             f"{type_name} rows of {n_cols} values are {n_cols // fmt.block_values * fmt.block_bytes} bytes, got {row_bytes}")
    _aligned(weight, 4 if fmt.name == "F32" else 2, "weight")
    out = rt.alloc((k, n_rows), np.float32)
    per_slot = x.shape[0] == k and k > 1
    if fmt.is_float or exact:
        activations, stride = x, n_cols if per_slot else 0
    else:
        _require(n_cols % 32 == 0, "quantized rows are whole 32-value units")
        activations, stride = quantize_q8_1(rt, x), n_cols // 32 if per_slot else 0
    _launch(rt, "matvec.cu", matvec_name(fmt, exact).replace("_vec_", "_vec_id_"), (-(-n_rows // 4), k), 128,
            (weight, ids, activations, out, _i32(n_rows), _i32(n_cols), _i32(row_bytes), _i32(stride)))
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


# ---- the KV cache and attention --------------------------------------------------------------------

CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
               "iq4_nl": 20}
STORED_ON_DEVICE = ("f32", "f16", "q8_0")      # cache types the store kernels write; others come quantized
MASK_KINDS = {"full": 0, "sliding": 1, "chunked": 2}
MAX_HEAD_DIM = 576              # attention.cu
MAX_TILE_HEAD_DIM = 256         # the tiled prefill kernel's shared-memory tiles
TILE_ROWS = 16                  # query rows per block of the tiled kernel
CELLS_PER_SPLIT = 256           # flash-decoding: keys per thread block when few queries attend
MAX_SPLITS = 64


def cache_row_bytes(type_name: str, n_values: int) -> int:
    _require(type_name in CACHE_TYPES, f"no CUDA KV cache of type {type_name} (have {', '.join(CACHE_TYPES)})")
    fmt = FORMATS_BY_TYPE[CACHE_TYPES[type_name]]
    _require(n_values % fmt.block_values == 0,
             f"a {type_name} cache needs rows that are a multiple of {fmt.block_values} values, got {n_values}")
    return n_values // fmt.block_values * fmt.block_bytes


def store_rows(rt, rows, cache, cells, type_name: str) -> None:
    """rows (T, n_values) f32 written, in the cache type, to rows `cells` (device int64 (T,)) of
    cache (n_cells, row_bytes) uint8."""
    _dtype(rows, np.float32, "rows")
    _contiguous(rows, "rows")
    _dtype(cache, np.uint8, "cache")
    _dtype(cells, np.int64, "cells")
    n_tokens, n_values = rows.shape
    row_bytes = cache_row_bytes(type_name, n_values)
    _require(cache.shape[1] == row_bytes, f"cache rows of {n_values} {type_name} values are {row_bytes} bytes")
    _require(cells.shape == (n_tokens,), "one cell per row")
    _require(type_name in STORED_ON_DEVICE, f"{type_name} rows are quantized on the host: use scatter_rows")
    if n_tokens:
        _launch(rt, "attention.cu", f"store_rows_{type_name}", (n_tokens, -(-n_values // 256)), 256,
                (rows, cache, cells, _i32(n_values), _i32(row_bytes)))


def scatter_rows(rt, rows, cache, cells) -> None:
    """Encoded rows (T, row_bytes) uint8 copied to rows `cells` of cache (n_cells, row_bytes)."""
    _dtype(rows, np.uint8, "rows")
    _dtype(cache, np.uint8, "cache")
    _contiguous(rows, "rows")
    _require(rows.shape[1] == cache.shape[1] and cells.shape == (rows.shape[0],), "rows do not fit the cache")
    if rows.shape[0]:
        _launch(rt, "attention.cu", "scatter_rows", (rows.shape[0], -(-rows.shape[1] // 256)), 256,
                (rows, cache, cells, _i32(rows.shape[1])))


def store_positions(rt, cell_pos, cells, positions) -> None:
    _dtype(cell_pos, np.int64, "cell_pos")
    _dtype(positions, np.int64, "positions")
    n = cells.shape[0]
    if n:
        _launch(rt, "attention.cu", "store_positions", -(-n // 128), 128, (cell_pos, cells, positions, _i32(n)))


def forget_cells(rt, cell_pos, n_past: int) -> None:
    n = cell_pos.shape[0]
    _launch(rt, "attention.cu", "forget_cells", -(-n // 256), 256, (cell_pos, _i32(n), np.int64(n_past)))


def attention(rt, q, k_cache, v_cache, cell_pos, q_pos, n_filled: int, n_head_kv: int, type_k: str,
              type_v: str, kq_scale: float, kind: str = "full", window: int = 0, v_from_k: int = 0,
              cells_per_split: int | None = None, tiled: bool | None = None):
    """softmax(kq_scale * q K^T + mask) V over the first n_filled cells -> (T, n_head * d_v).

    q (T, n_head, d_k) f32; k_cache (n_cells, n_head_kv * d_k) and v_cache (n_cells, n_head_kv *
    d_v) as uint8 rows of their cache types; v_cache None: V is the first v_from_k values of each
    key (MLA). cell_pos (n_cells,) int64, -1 for empty cells; q_pos (T,) int64.

    Few queries (decode) split the cache over blocks (flash-decoding); many queries (prefill)
    take the tiled kernel, where a block's query rows share each decoded key/value tile; `tiled`
    forces the choice."""
    _dtype(q, np.float32, "q")
    _contiguous(q, "q")
    n_tokens, n_head, d_k = q.shape
    _require(n_head % n_head_kv == 0, f"{n_head} query heads do not group over {n_head_kv} kv heads")
    _require(kind in MASK_KINDS, f"mask kind must be one of {', '.join(MASK_KINDS)}")
    _require(kind == "full" or window > 0, f"a {kind} mask needs a window")
    _require(k_cache.shape[1] == cache_row_bytes(type_k, n_head_kv * d_k), "k_cache rows do not match q's head size")
    _dtype(cell_pos, np.int64, "cell_pos")
    _dtype(q_pos, np.int64, "q_pos")
    _require(q_pos.shape == (n_tokens,), "one position per query")
    _require(0 < n_filled <= min(k_cache.shape[0], cell_pos.shape[0]), f"n_filled {n_filled} outside the cache")
    if v_cache is None:
        _require(0 < v_from_k <= d_k and n_head_kv == 1, "V from K needs one kv head and 0 < v_from_k <= d_k")
        v_cache, type_v, d_v, v_head_stride = k_cache, type_k, v_from_k, d_k
    else:
        d_v = _row_values(type_v, v_cache.shape[1]) // n_head_kv
        _require(v_cache.shape[1] == cache_row_bytes(type_v, n_head_kv * d_v), "v_cache rows are not whole heads")
        v_head_stride = d_v
    _require(max(d_k, d_v) <= MAX_HEAD_DIM, f"head sizes above {MAX_HEAD_DIM} are not supported")
    if tiled is None:
        tiled = n_tokens > MAX_DECODE_TOKENS and cells_per_split is None and v_head_stride == d_v
    if tiled:
        _require(max(d_k, d_v) <= MAX_TILE_HEAD_DIM and v_head_stride == d_v,
                 f"the tiled kernel takes head sizes up to {MAX_TILE_HEAD_DIM} with separate values")
        return _attention_tiled(rt, q, k_cache, v_cache, cell_pos, q_pos, n_filled, n_head_kv, d_v, type_k, type_v,
                                kq_scale, kind, window)
    if cells_per_split is None:
        few_queries = n_tokens <= MAX_DECODE_TOKENS
        cells_per_split = max(CELLS_PER_SPLIT, -(-n_filled // MAX_SPLITS)) if few_queries else n_filled
    n_splits = -(-n_filled // cells_per_split)
    part_acc = rt.alloc((n_tokens, n_head, n_splits, d_v), np.float32)
    part_ml = rt.alloc((n_tokens, n_head, n_splits, 2), np.float32)
    name = f"attention_split<{CACHE_TYPES[type_k]},{CACHE_TYPES[type_v]}>"
    rt.launch("attention.cu", name, (n_splits, n_head, n_tokens), 128,
            (q, k_cache, v_cache, cell_pos, q_pos, part_acc, part_ml, _i32(n_filled), _i32(n_head), _i32(n_head_kv),
             _i32(d_k), _i32(d_v), _i32(k_cache.shape[1]), _i32(v_cache.shape[1]), _i32(v_head_stride),
             _i32(MASK_KINDS[kind]), _i32(window), _i32(cells_per_split), _i32(n_splits), _f32(kq_scale)),
              name_expressions=_attention_instances(type_k, type_v))
    out = rt.alloc((n_tokens, n_head * d_v), np.float32)
    _launch(rt, "attention.cu", "attention_combine", (n_head, n_tokens), 128,
            (part_acc, part_ml, out, _i32(n_head), _i32(n_splits), _i32(d_v)))
    return out


def _attention_tiled(rt, q, k_cache, v_cache, cell_pos, q_pos, n_filled, n_head_kv, d_v, type_k, type_v, kq_scale,
                     kind, window):
    n_tokens, n_head, d_k = q.shape
    out = rt.alloc((n_tokens, n_head * d_v), np.float32)
    rows = n_tokens * (n_head // n_head_kv)
    name = f"attention_tiled<{CACHE_TYPES[type_k]},{CACHE_TYPES[type_v]}>"
    rt.launch("attention.cu", name, (-(-rows // TILE_ROWS), n_head_kv), 256,
              (q, k_cache, v_cache, cell_pos, q_pos, out, _i32(n_tokens), _i32(n_filled), _i32(n_head),
               _i32(n_head_kv), _i32(d_k), _i32(d_v), _i32(k_cache.shape[1]), _i32(v_cache.shape[1]),
               _i32(MASK_KINDS[kind]), _i32(window), _f32(kq_scale)), name_expressions=_attention_instances(type_k, type_v))
    return out


def _attention_instances(type_k: str, type_v: str) -> tuple[str, ...]:
    """Both attention kernels of one cache-type pair: one module per pair, built when first used
    (there are 81 pairs)."""
    pair = f"{CACHE_TYPES[type_k]},{CACHE_TYPES[type_v]}"
    return (f"attention_split<{pair}>", f"attention_tiled<{pair}>")


def _row_values(type_name: str, row_bytes: int) -> int:
    fmt = FORMATS_BY_TYPE[CACHE_TYPES[type_name]]
    return row_bytes // fmt.block_bytes * fmt.block_values


# ---- row and element-wise ops ------------------------------------------------------------------------

def _float_array(a, what: str) -> None:
    _dtype(a, np.float32, what)
    _contiguous(a, what)


def rms_norm(rt, x, weight, eps: float):
    """x (..., n) / sqrt(mean(x^2) + eps), times weight (n,) when given."""
    _float_array(x, "x")
    n = x.shape[-1]
    if weight is not None:
        _float_array(weight, "weight")
        _require(weight.shape == (n,), f"weight must be ({n},)")
    out = rt.alloc(x.shape, np.float32)
    n_rows = x.size // n
    if n_rows:
        _launch(rt, "elementwise.cu", "rms_norm", n_rows, 256,
                (x, x if weight is None else weight, out, _i32(n), _f32(eps), _i32(weight is not None)))
    return out


def softmax(rt, x, scale: float = 1.0):
    """softmax(scale * x) over the last axis."""
    _float_array(x, "x")
    out = rt.alloc(x.shape, np.float32)
    n = x.shape[-1]
    if x.size:
        _launch(rt, "elementwise.cu", "softmax_rows", x.size // n, 256, (x, out, _i32(n), _f32(scale)))
    return out


def rope_cos_sin(rt, positions, n_dims: int, base: float, freq_scale: float = 1.0, ext_factor: float = 0.0,
                 attn_factor: float = 1.0, corr_dims: tuple[float, float] = (0.0, 0.0), freq_factors=None):
    """cos and sin (n_tokens, n_dims / 2) for positions (n_tokens,) int64, YaRN and frequency
    factors included (corr_dims from ggml_rope_yarn_corr_dims, computed on the host)."""
    _dtype(positions, np.int64, "positions")
    _require(n_dims % 2 == 0, "rope rotates pairs: n_dims must be even")
    n_tokens, half = positions.shape[0], n_dims // 2
    if freq_factors is not None:
        _float_array(freq_factors, "freq_factors")
        _require(freq_factors.shape[0] >= half, f"need {half} frequency factors")
    cos, sin = rt.alloc((n_tokens, half), np.float32), rt.alloc((n_tokens, half), np.float32)
    if n_tokens:
        _launch(rt, "elementwise.cu", "rope_cos_sin", -(-n_tokens * half // 256), 256,
                (positions, cos if freq_factors is None else freq_factors, _i32(freq_factors is not None), cos, sin,
                 _i32(n_tokens), _i32(n_dims), _f32(base), _f32(freq_scale), _f32(ext_factor), _f32(attn_factor),
                 _f32(corr_dims[0]), _f32(corr_dims[1])))
    return cos, sin


def rope(rt, x, cos, sin, neox: bool):
    """x (n_tokens, n_head, head_dim) with its first 2 * cos.shape[1] values of each head rotated."""
    _float_array(x, "x")
    n_tokens, n_head, head_dim = x.shape
    half = cos.shape[1]
    _require(cos.shape == (n_tokens, half) == sin.shape and 2 * half <= head_dim, "cos/sin do not fit x")
    out = rt.alloc(x.shape, np.float32)
    n_threads = n_tokens * n_head * (head_dim - half)
    if n_threads:
        _launch(rt, "elementwise.cu", "rope_apply", -(-n_threads // 256), 256,
                (x, cos, sin, out, _i32(n_tokens), _i32(n_head), _i32(head_dim), _i32(2 * half), _i32(neox)))
    return out


def _binary(rt, kernel: str, a, b):
    _float_array(a, "a")
    _float_array(b, "b")
    _require(a.shape == b.shape, f"shapes differ: {a.shape} and {b.shape}")
    out = rt.alloc(a.shape, np.float32)
    if a.size:
        _launch(rt, "elementwise.cu", kernel, -(-a.size // 256), 256, (a, b, out, np.int64(a.size)))
    return out


def swiglu(rt, gate, up):
    """silu(gate) * up."""
    return _binary(rt, "swiglu", gate, up)


def geglu(rt, gate, up):
    """gelu_tanh(gate) * up."""
    return _binary(rt, "geglu", gate, up)


def add(rt, a, b):
    return _binary(rt, "add", a, b)


def _unary(rt, kernel: str, x, value: float):
    _float_array(x, "x")
    out = rt.alloc(x.shape, np.float32)
    if x.size:
        _launch(rt, "elementwise.cu", kernel, -(-x.size // 256), 256, (x, out, np.int64(x.size), _f32(value)))
    return out


def scale(rt, x, s: float):
    """x * s."""
    return _unary(rt, "scale", x, s)


def softcap(rt, x, cap: float):
    """cap * tanh(x / cap)."""
    _require(cap > 0, f"a soft cap must be positive, got {cap}")
    return _unary(rt, "softcap", x, cap)


def rotate_blocks(rt, x, h):
    """Each run of h.shape[0] values of x (..., d) times h (block, block) float32."""
    _float_array(x, "x")
    _float_array(h, "h")
    block = h.shape[0]
    _require(h.shape == (block, block) and x.shape[-1] % block == 0, f"x's last axis is not whole blocks of {block}")
    out = rt.alloc(x.shape, np.float32)
    if x.size:
        _launch(rt, "elementwise.cu", "rotate_blocks", -(-x.size // 256), 256, (x, h, out, np.int64(x.size), _i32(block)))
    return out


def round_q8_1(rt, x):
    """x (..., d), d % 32 == 0, rounded to q8_1 values (as quantize_q8_1 rounds), kept as float32."""
    _float_array(x, "x")
    _require(x.shape[-1] % 32 == 0, f"q8_1 rounds whole 32-value blocks, not rows of {x.shape[-1]}")
    out = rt.alloc(x.shape, np.float32)
    if x.size:
        _launch(rt, "elementwise.cu", "round_q8_1", -(-x.size // 256), 256, (x, out, np.int64(x.size)))
    return out


# ---- MoE routing -------------------------------------------------------------------------------------

MAX_EXPERTS = 512


def moe_route(rt, logits, k: int, gating: str = "softmax", select_on_logits: bool = False, bias=None,
              n_groups: int = 0, n_groups_used: int = 0, norm_weights: bool = False, weights_scale: float = 0.0):
    """(ids (T, k) int64, weights (T, k) f32) of the experts each token's router logits (T, n_expert) pick."""
    _float_array(logits, "logits")
    n_tokens, n_expert = logits.shape
    _require(n_expert <= MAX_EXPERTS and 0 < k <= n_expert, f"k={k} of {n_expert} experts (at most {MAX_EXPERTS})")
    _require(gating in ("softmax", "sigmoid"), "gating is softmax or sigmoid")
    _require(n_groups <= 1 or (n_expert % n_groups == 0 and 0 < n_groups_used <= n_groups <= 64),
             "experts must split evenly into at most 64 groups")
    if bias is not None:
        _float_array(bias, "bias")
    ids, weights = rt.alloc((n_tokens, k), np.int64), rt.alloc((n_tokens, k), np.float32)
    if n_tokens:
        _launch(rt, "moe.cu", "moe_route", n_tokens, 256,
                (logits, logits if bias is None else bias, ids, weights, _i32(n_expert), _i32(k),
                 _i32(gating == "sigmoid"), _i32(select_on_logits), _i32(bias is not None), _i32(n_groups),
                 _i32(n_groups_used), _i32(norm_weights), _f32(weights_scale)))
    return ids, weights


def moe_combine(rt, y, ids, weights):
    """(T, n) sums of each token's k expert outputs y (T * k, n), weighted by weights (T, k), in
    ascending expert id (ids (T, k) int64): the order of the engine's host-routed sum."""
    _float_array(y, "y")
    _float_array(weights, "weights")
    _dtype(ids, np.int64, "ids")
    _contiguous(ids, "ids")
    n_tokens, k = ids.shape
    _require(weights.shape == (n_tokens, k) and y.ndim == 2 and y.shape[0] == n_tokens * k,
             f"y must be ({n_tokens * k}, n) and weights ({n_tokens}, {k})")
    n = y.shape[1]
    out = rt.alloc((n_tokens, n), np.float32)
    if n_tokens and n:
        _launch(rt, "moe.cu", "moe_combine", (-(-n // 256), n_tokens), 256, (y, ids, weights, out, _i32(n), _i32(k)))
    return out


# Template instances each source is built with (CuPy name_expressions; the emulator's entry points)
NAME_EXPRESSIONS = {
    "matvec.cu": all_matvec_names(),
    "rows.cu": tuple(f"{kernel}<{f.ggml_type}>" for kernel in ("get_rows", "dequantize_rows") for f in FORMATS.values()),
}


# ---- the Gated DeltaNet mixer (Qwen3.5, Qwen3-Next) -------------------------------------------------

CONV_KERNELS = (4,)             # ssm_d_conv of the released models: causal_conv_silu's instances
MAX_DELTA_HEAD_DIM = 128        # delta_net.cu: 4 key rows of a state column per lane of a warp
DELTA_COLUMNS_PER_BLOCK = 32    # 8 state columns per warp, 4 warps
NAME_EXPRESSIONS["delta_net.cu"] = tuple(f"causal_conv_silu<{k}>" for k in CONV_KERNELS)


def causal_conv_silu(rt, x, state, weight):
    """silu of the causal depthwise conv of x (T, C) over time, continuing from state (K-1, C), the
    previous K-1 inputs, which becomes the last K-1 inputs (in place); weight (C, K) -> (T, C)."""
    for a, what in ((x, "x"), (state, "state"), (weight, "weight")):
        _float_array(a, what)
    n_tokens, n_channels = x.shape
    kernel = weight.shape[-1]
    _require(kernel in CONV_KERNELS, f"no CUDA causal conv with a kernel of {kernel} (have {CONV_KERNELS})")
    _require(weight.shape == (n_channels, kernel), f"weight must be ({n_channels}, {kernel}), got {weight.shape}")
    _require(state.shape == (kernel - 1, n_channels), f"state must be ({kernel - 1}, {n_channels}), got {state.shape}")
    out = rt.alloc(x.shape, np.float32)
    if x.size:
        _launch(rt, "delta_net.cu", f"causal_conv_silu<{kernel}>", -(-n_channels // 128), 128,
                (x, state, weight, out, _i32(n_tokens), _i32(n_channels)))
    return out


def gated_delta_rule(rt, mixed, g, beta, state, n_k_heads: int, n_v_heads: int, d: int, grouped: bool, eps: float,
                     q_scale: float):
    """The delta rule over the tokens of mixed (T, C) = [q (Hk x d) | k (Hk x d) | v (Hv x d) | ...],
    q and k L2-normalised (eps) and q times q_scale on the way; value head h reads key head
    h // (Hv / Hk) when grouped, else h % Hk. g, beta (T, Hv); state (Hv, d, d) in any shape of
    that size, updated in place. -> (T, Hv, d)."""
    for a, what in ((mixed, "mixed"), (g, "g"), (beta, "beta"), (state, "state")):
        _float_array(a, what)
    n_tokens, row_values = mixed.shape
    _require(0 < n_k_heads and n_v_heads % n_k_heads == 0,
             f"{n_v_heads} value heads do not group over {n_k_heads} key heads")
    _require(0 < d <= MAX_DELTA_HEAD_DIM,
             f"the CUDA delta rule takes heads of 1 to {MAX_DELTA_HEAD_DIM} values, got {d}")
    _require(row_values >= (2 * n_k_heads + n_v_heads) * d, f"rows of {row_values} values cannot hold q, k and v")
    _require(g.shape == beta.shape == (n_tokens, n_v_heads), f"g and beta must be ({n_tokens}, {n_v_heads})")
    _require(state.size == n_v_heads * d * d, f"state must hold {n_v_heads} states of {d} x {d}")
    out = rt.alloc((n_tokens, n_v_heads, d), np.float32)
    if n_tokens:
        _launch(rt, "delta_net.cu", "gated_delta_rule", (n_v_heads, -(-d // DELTA_COLUMNS_PER_BLOCK)), 128,
                (mixed, _i32(row_values), g, beta, state, out, _i32(n_tokens), _i32(n_k_heads), _i32(n_v_heads),
                 _i32(d), _i32(grouped), _f32(eps), _f32(q_scale)))
    return out


def gated_rms_norm(rt, x, weight, z, eps: float):
    """x (..., d) / sqrt(mean(x^2) + eps) * weight (d,) * silu(z), z shaped as x."""
    for a, what in ((x, "x"), (weight, "weight"), (z, "z")):
        _float_array(a, what)
    d = x.shape[-1]
    _require(weight.shape == (d,), f"weight must be ({d},), got {weight.shape}")
    _require(z.shape == x.shape, f"z must be shaped as x {x.shape}, got {z.shape}")
    out = rt.alloc(x.shape, np.float32)
    if x.size:
        _launch(rt, "delta_net.cu", "gated_rms_norm", x.size // d, 128, (x, weight, z, out, _i32(d), _f32(eps)))
    return out
