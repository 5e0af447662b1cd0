"""A prefill ubatch's routed-expert products as integer GEMMs in one parallel region.

    expert_gemms(x, spans, mats, ggml_type, n_cols, outs)
    expert_product(x, w_bytes, ggml_type, n_cols) -> float32 (n_tokens, n_rows)

In a prefill ubatch the router spreads the tokens unevenly: with 128 experts top-8 and 128
tokens a few experts get 30-60 tokens, most 1-10. One integer GEMM (`qgemm`) per expert is one
parallel region per expert and matrix, and an expert below qgemm.PREFILL_MIN_TOKENS would take
the float tiles on inputs rounded to floats. Here every expert of every matrix of a region
(gate and up, which share their input; or down) is one region of work units:

- a tile of ROWS rows of one expert's matrix for that expert's tokens: the tile decoded once
  (`qgemm_tile.fill_tile`), then qgemm's register blocks over the tokens (`qgemm.tile_products`);
- for an expert of at most FUSED_MAX_TOKENS tokens, a run of rows through the fused one-token
  kernel of `qmatmul` per token, which reads the raw blocks without decoding a tile.

The units are cut into one part per thread of about equal cost. x is quantized once per region
(Q8_0 or Q8_K, as `QuantizedActivations`), as llama.cpp quantizes the input of its mul_mat_id.
Each output equals the one of one product per expert (`expert_product`) bit for bit: a tile's
sums per row and token do not depend on the other tokens or tiles.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from kernels.cpu.formats import as_ggml_type
from kernels.cpu.qgemm import QGEMM_TYPES, activation_terms, qgemm, tile_products, type_layout
from kernels.cpu.qgemm_ir import ROWS, TOKENS
from kernels.cpu.qgemm_tile import fill_tile, new_tile
from kernels.cpu.qmatmul import QuantizedActivations, qmatmul, qmatmul_rows

EXPERT_GEMM_TYPES = QGEMM_TYPES
# Decoding a tile costs about as much as 40 tokens of its products: on an AVX512-VNNI Xeon, Q4_K
# 768 x 2048, 1 thread, a row cost ~1370 ns + 35 ns per token by tiles, ~130 ns per token by
# the fused one-token kernel. A Qwen3-30B-A3B layer's 128-token ubatch ran within noise of its
# best with the fused kernel up to 6 .. 10 tokens per expert, 1.2x slower up to 1 (2 threads).
FUSED_MAX_TOKENS = 8
FUSED_ROWS = 64                 # rows per fused unit (as a decode step's chunk)
# costs in tokens of tile products per row: decoding it into a tile, one token by the fused kernel
TILE_COST_TOKENS = 40.0
FUSED_COST_TOKENS = 4.0

# a unit (one row of `units`): rows ROW0 .. ROW0 + N_ROWS of matrix MATRIX (0 or 1) of expert
# EXPERT, for the rows FIRST .. END of x; FUSED: one token at a time by the one-token kernel
MATRIX, EXPERT, FIRST, END, ROW0, N_ROWS, FUSED = range(7)


@njit(cache=True, nogil=True)
def plan_tiles(spans, n_rows, fused_max_tokens):
    """(units (n_units, 7), cost (n_units,)): for every matrix m (n_rows[m] rows) and span s
    (expert spans[s, 0], rows spans[s, 1] .. spans[s, 2] of x), tiles of ROWS rows, or runs of
    FUSED_ROWS rows for the spans of at most fused_max_tokens tokens."""
    n_units = 0
    for m in range(n_rows.shape[0]):
        for s in range(spans.shape[0]):
            chunk = FUSED_ROWS if spans[s, 2] - spans[s, 1] <= fused_max_tokens else ROWS
            n_units += (n_rows[m] + chunk - 1) // chunk
    units = np.empty((n_units, 7), dtype=np.int64)
    cost = np.empty(n_units, dtype=np.float64)
    u = 0
    for m in range(n_rows.shape[0]):
        for s in range(spans.shape[0]):
            n_tokens = spans[s, 2] - spans[s, 1]
            fused = n_tokens <= fused_max_tokens
            chunk = FUSED_ROWS if fused else ROWS
            for row0 in range(0, n_rows[m], chunk):
                rows = min(chunk, n_rows[m] - row0)
                units[u, MATRIX], units[u, EXPERT] = m, spans[s, 0]
                units[u, FIRST], units[u, END] = spans[s, 1], spans[s, 2]
                units[u, ROW0], units[u, N_ROWS], units[u, FUSED] = row0, rows, fused
                cost[u] = rows * (n_tokens * FUSED_COST_TOKENS if fused
                                  else TILE_COST_TOKENS + ((n_tokens + TOKENS - 1) // TOKENS) * TOKENS)
                u += 1
    return units, cost


def balanced_bounds(cost: np.ndarray, n_parts: int) -> np.ndarray:
    """Cuts of the units into n_parts consecutive parts: part p ends before the first unit
    whose middle passes p / n_parts of the total cost."""
    middles = np.cumsum(cost) - 0.5 * cost
    targets = cost.sum() * np.arange(1, n_parts) / n_parts
    return np.concatenate([[0], np.searchsorted(middles, targets), [len(cost)]]).astype(np.int64)


@njit(cache=True, nogil=True)
def _run_unit(unit, family, type_code, w, n_cols, n_blocks, xq, xsub, dx, sx, min_sums, out, tile, spill):
    first, end, row0, n_rows = unit[FIRST], unit[END], unit[ROW0], unit[N_ROWS]
    if unit[FUSED]:
        for t in range(first, end):
            qmatmul_rows(xq[t:t + 1], dx[t:t + 1], min_sums[t:t + 1], w, type_code, n_cols, row0, n_rows,
                         out[t:t + 1], 0)
        return
    fill_tile(type_code, w, row0, n_cols, tile)
    tile_products(family, tile, xq[first:end], xsub[first:end], dx[first:end], sx[first:end], n_blocks, row0, n_rows,
                  out[first:end], spill)


@njit(cache=True, nogil=True, parallel=True)
def expert_gemm_kernel(units, bounds, family, type_code, n_sub, block, w0, w1, n_cols, xq, xsub, dx, sx, min_sums,
                       out0, out1):
    """Every unit, part p (units bounds[p] .. bounds[p + 1]) on one thread with its own tile:
    out0 (R, rows of w0) and out1 from the region's matrices w0, w1 (n_expert, n_rows,
    row_bytes) of one type, x quantized (xq, dx, min_sums) with qgemm's terms xsub, sx."""
    n_blocks = n_cols // block
    for p in prange(bounds.shape[0] - 1):
        tile = new_tile(n_cols, n_blocks * n_sub, n_blocks)
        spill = np.empty((TOKENS, ROWS), dtype=np.float32)
        for u in range(bounds[p], bounds[p + 1]):
            if units[u, MATRIX] == 0:
                _run_unit(units[u], family, type_code, w0[units[u, EXPERT]], n_cols, n_blocks, xq, xsub, dx, sx,
                          min_sums, out0, tile, spill)
            else:
                _run_unit(units[u], family, type_code, w1[units[u, EXPERT]], n_cols, n_blocks, xq, xsub, dx, sx,
                          min_sums, out1, tile, spill)


def expert_gemms(x: np.ndarray, spans: np.ndarray, mats, ggml_type: int, outs) -> None:
    """outs[m][rows of span s] = those rows of x @ mats[m][expert].T for every span (expert,
    first_row, end_row) and matrix m (one or two (n_expert, n_rows, row_bytes) weights of
    one type in EXPERT_GEMM_TYPES, checked by the caller; outs float32 (R, n_rows), C order)."""
    qtype = as_ggml_type(ggml_type)
    if qtype not in EXPERT_GEMM_TYPES:
        raise ValueError(f"{qtype.name} has no integer GEMM")
    n_cols = x.shape[1]
    family, _, _, n_sub, block = type_layout(qtype)
    xa = QuantizedActivations.for_type(x, qtype)
    xsub, sx = activation_terms(xa, qtype)
    if xsub.shape[0] != len(x):     # a type without offset or mins: a placeholder per token
        xsub = np.zeros((len(x), 1), dtype=np.int32)
    n_rows = np.array([w.shape[1] for w in mats], dtype=np.int64)
    units, cost = plan_tiles(np.ascontiguousarray(spans, dtype=np.int64), n_rows, FUSED_MAX_TOKENS)
    bounds = balanced_bounds(cost, numba.get_num_threads())
    expert_gemm_kernel(units, bounds, family, int(qtype), n_sub, block, mats[0], mats[-1], n_cols, xa.q, xsub, xa.d,
                       sx, xa.min_sums, outs[0], outs[-1])


def expert_product(x: np.ndarray, w_bytes: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """x @ W.T for one expert's tokens x (float32 (n_tokens, n_cols)) as `expert_gemms`
    computes it: per token by the one-token kernel up to FUSED_MAX_TOKENS tokens, else qgemm."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) <= FUSED_MAX_TOKENS:
        return np.concatenate([qmatmul(x[t:t + 1], w_bytes, ggml_type, n_cols) for t in range(len(x))])
    out = np.empty((len(x), w_bytes.shape[0]), dtype=np.float32)
    return qgemm(QuantizedActivations.for_type(x, ggml_type), w_bytes, ggml_type, n_cols, out)
