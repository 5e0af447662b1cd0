"""The routed experts of one MoE layer on the CPU as grouped products.

    grouped_experts(x, spans, gate, up, down, activation, rounded, integer_for) -> (R, n_embd)

One product per expert and matrix makes a decode step with k = 8 experts 24 products of about
1 MB, each its own parallel region: the pool is woken, a small matrix split, the threads joined,
24 times per layer. Here all the selected experts' gate and up products are one parallel region,
the activation runs once over all rows, and all their down products are a second region.

A region's work is planned on the host as units: a range of rows of one expert's matrix, for
that expert's tokens (its rows of x, which `engine.arch.layers.expert_rows` keeps contiguous).
The units are split over the threads into parts of about equal cost (rows x (tokens + the cost
of unpacking a row)), so the prefill's unequal experts (one token here, thirty there) balance,
and each thread of a decode step streams its share of the experts' bytes once.

Each unit computes exactly what one product per expert computes for its rows, with the same
kernel body: the integer product of one token (`qmatmul.qmatmul_rows` on x quantized once per
region: gate and up share it) or the float product of `kernels.cpu.matmul` (rows decoded into a
float32 tile of the same size, then `tile_matmul`). A prefill ubatch's experts on the integer
path are `moe_gemm`'s region of integer GEMMs instead. So the results are bit-identical
to one product per expert, whichever path the caller's `integer_for` picks for each expert.

A decode step (one row per expert) whose products are all integer ones is `decode_experts`, one
call per layer: x's quantization, the gate and up units, the activation, the hidden rows'
quantization and the down units, without returning to Python in between (that glue of the
two-region path cost about 0.25 ms per layer of the Qwen3-30B-A3B shape, 1.5 ms per token).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from kernels.cpu.decode import LANES, decode_row
from kernels.cpu.formats import FAST_TYPES, as_ggml_type, read_only, row_bytes
from kernels.cpu.fused_ops import glu_rows
from kernels.cpu.matmul import rows_per_chunk as float_rows_per_chunk
from kernels.cpu.moe_gemm import expert_gemms
from kernels.cpu.qactivations import _quantize_rows_serial, q8_k_min_sums
from kernels.cpu.qmatmul import DECODE_ROWS_PER_CHUNK, Q8_K_INPUT_TYPES, QuantizedActivations, qmatmul_rows
from kernels.cpu.tile_matmul import tile_matmul

GROUPED_TYPES = FAST_TYPES      # the weight types whose rows the units decode

# a unit (one row of `units`): rows ROW0 .. ROW0 + N_ROWS of matrix MATRIX (0 or 1 of the
# region) of expert EXPERT, for the rows FIRST .. END of x, by the integer product when INTEGER
MATRIX, EXPERT, FIRST, END, ROW0, N_ROWS, INTEGER = range(7)
UNPACK_COST_TOKENS = 4      # unpacking a weight row costs about as much as dotting it with 4 tokens

_NO_QUANTS = read_only(np.zeros((0, 0), dtype=np.int8))
_NO_FLOATS = read_only(np.zeros((0, 0), dtype=np.float32))


@njit(cache=True, nogil=True)
def plan_units(spans, experts, integer, n_rows, integer_chunk, float_chunk, n_parts):
    """(units (n_units, 7), bounds (n_parts + 1,)): every matrix m of the region (n_rows[m]
    rows) for every span s (rows spans[s, 0] .. spans[s, 1] of x, expert experts[m, s]) cut
    into units of float_chunk rows, or of integer_chunk rows where integer[m, s]; the
    units bounds[p] .. bounds[p + 1] are part p, parts of about equal cost."""
    n_matrices, n_spans = integer.shape
    n_units = 0
    for m in range(n_matrices):
        for s in range(n_spans):
            chunk = integer_chunk if integer[m, s] else float_chunk
            n_units += (n_rows[m] + chunk - 1) // chunk
    units = np.empty((n_units, 7), dtype=np.int64)
    cost = np.empty(n_units, dtype=np.float64)
    u = 0
    for m in range(n_matrices):
        for s in range(n_spans):
            chunk = integer_chunk if integer[m, s] else float_chunk
            n_tokens = spans[s, 1] - spans[s, 0]
            for row0 in range(0, n_rows[m], chunk):
                rows = min(chunk, n_rows[m] - row0)
                units[u, MATRIX], units[u, EXPERT] = m, experts[m, s]
                units[u, FIRST], units[u, END] = spans[s, 0], spans[s, 1]
                units[u, ROW0], units[u, N_ROWS], units[u, INTEGER] = row0, rows, integer[m, s]
                cost[u] = rows * (n_tokens + UNPACK_COST_TOKENS)
                u += 1
    return units, _balanced_bounds(cost, n_parts)


@njit(cache=True, nogil=True)
def _balanced_bounds(cost, n_parts):
    """Cuts of the units into n_parts consecutive parts, each ending where the running cost
    passes its share of the total."""
    bounds = np.empty(n_parts + 1, dtype=np.int64)
    bounds[0] = 0
    total = cost.sum()
    running, u = 0.0, 0
    for p in range(1, n_parts):
        while u < cost.shape[0] and running + 0.5 * cost[u] < total * p / n_parts:
            running += cost[u]
            u += 1
        bounds[p] = u
    bounds[n_parts] = cost.shape[0]
    return bounds


@njit(cache=True, nogil=True)
def _float_rows(x, w, type_code, n_cols, row0, n_rows, out):
    """out[:, row0:row0 + n_rows] = x @ W[row0:row0 + n_rows].T as kernels.cpu.matmul computes
    it: the rows decoded into a float32 tile, then the register-blocked product."""
    tile = np.empty((n_rows, n_cols), dtype=np.float32)
    for i in range(n_rows):
        decode_row(type_code, w, row0 + i, n_cols, LANES, tile, i)
    tile_matmul(x, tile, n_rows, out, row0)


@njit(cache=True, nogil=True)
def _run_unit(unit, x, xq, xd, min_sums, w, type_code, n_cols, out):
    first, end, matrix = unit[FIRST], unit[END], w[unit[EXPERT]]
    if unit[INTEGER]:
        qmatmul_rows(xq[first:end], xd[first:end], min_sums[first:end], matrix, type_code, n_cols, unit[ROW0],
                     unit[N_ROWS], out[first:end], 0)
    else:
        _float_rows(x[first:end], matrix, type_code, n_cols, unit[ROW0], unit[N_ROWS], out[first:end])


@njit(cache=True, nogil=True, parallel=True)
def expert_products(units, bounds, x, xq, xd, min_sums, w0, w1, type0, type1, n_cols, out0, out1):
    """Every unit, part p (units bounds[p] .. bounds[p + 1]) on one thread: out0 (R, rows of
    w0) and out1 from the region's matrices w0, w1 (n_expert, n_rows, row_bytes), from x float32
    (R, n_cols) for the float units and x quantized (xq, xd, min_sums) for the integer ones."""
    for p in prange(bounds.shape[0] - 1):
        for u in range(bounds[p], bounds[p + 1]):
            if units[u, MATRIX] == 0:
                _run_unit(units[u], x, xq, xd, min_sums, w0, type0, n_cols, out0)
            else:
                _run_unit(units[u], x, xq, xd, min_sums, w1, type1, n_cols, out1)


@njit(cache=True, nogil=True)
def _quantized_rows(x, k_blocks):
    """(q, d, min_sums) of x's rows as QuantizedActivations quantizes them, on the calling thread."""
    n_rows, n_cols = x.shape
    q = np.empty((n_rows, n_cols), dtype=np.int8)
    d = np.empty((n_rows, n_cols // (256 if k_blocks else 32)), dtype=np.float32)
    sums = np.empty((n_rows, n_cols // (16 if k_blocks else 32)), dtype=np.float32)
    _quantize_rows_serial(x, k_blocks, q, d, sums)
    if not k_blocks:
        return q, d, sums       # Q8_1's s is what Q4_1 / Q5_1's mins multiply
    min_sums = np.empty_like(sums)
    q8_k_min_sums(d, sums, min_sums)
    return q, d, min_sums


@njit(cache=True, nogil=True)
def _one_row_spans(n_rows):
    spans = np.empty((n_rows, 2), dtype=np.int64)
    for r in range(n_rows):
        spans[r, 0], spans[r, 1] = r, r + 1
    return spans


@njit(cache=True, nogil=True, parallel=True)
def decode_experts(x, experts, gate, up, down, gate_type, down_type, gate_k_blocks, down_k_blocks, glu_kind,
                   gate_chunk, down_chunk, n_parts):
    """down(glu(gate(x), up(x))) of expert experts[r] on row r of x (float32 (R, n_embd)), all by
    the integer products, in one call: the gate and up units are one parallel loop, the down
    units a second, and x's quantization, the activation and the hidden rows' quantization run
    between them on the calling thread (a decode step's few rows: cheaper than the pool). Each
    loop's units are n_parts parts of equal bytes, one per thread."""
    n_rows, n_embd = x.shape
    n_ff = gate.shape[1]
    spans = _one_row_spans(n_rows)
    xq, xd, x_sums = _quantized_rows(x, gate_k_blocks)
    both = np.empty((2, n_rows), dtype=np.int64)
    both[0], both[1] = experts, experts
    units, bounds = plan_units(spans, both, np.ones((2, n_rows), dtype=np.int64),
                               np.array([n_ff, up.shape[1]], dtype=np.int64), gate_chunk, gate_chunk, n_parts)
    gate_out = np.empty((n_rows, n_ff), dtype=np.float32)
    up_out = np.empty((n_rows, up.shape[1]), dtype=np.float32)
    for p in prange(n_parts):
        for u in range(bounds[p], bounds[p + 1]):
            w, out = (gate, gate_out) if units[u, MATRIX] == 0 else (up, up_out)
            r = units[u, FIRST]
            qmatmul_rows(xq[r:r + 1], xd[r:r + 1], x_sums[r:r + 1], w[units[u, EXPERT]], gate_type, n_embd,
                         units[u, ROW0], units[u, N_ROWS], out[r:r + 1], 0)
    hidden = np.empty((n_rows, n_ff), dtype=np.float32)
    glu_rows(gate_out, up_out, glu_kind, hidden)
    hq, hd, h_sums = _quantized_rows(hidden, down_k_blocks)
    units, bounds = plan_units(spans, experts.reshape(1, n_rows), np.ones((1, n_rows), dtype=np.int64),
                               np.array([down.shape[1]], dtype=np.int64), down_chunk, down_chunk, n_parts)
    out = np.empty((n_rows, down.shape[1]), dtype=np.float32)
    for p in prange(n_parts):
        for u in range(bounds[p], bounds[p + 1]):
            r = units[u, FIRST]
            qmatmul_rows(hq[r:r + 1], hd[r:r + 1], h_sums[r:r + 1], down[units[u, EXPERT]], down_type, n_ff,
                         units[u, ROW0], units[u, N_ROWS], out[r:r + 1], 0)
    return out


def _checked_experts(w_bytes: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    w = np.asarray(w_bytes)
    if w.dtype != np.uint8 or w.ndim != 3 or w.shape[2] != row_bytes(ggml_type, n_cols):
        raise ValueError(f"expert weight bytes of shape {w.shape} do not hold rows of {n_cols} "
                         f"{as_ggml_type(ggml_type).name} elements")
    return read_only(np.ascontiguousarray(w))


def _products(x, spans, weights, outs, rounded, integer_for) -> None:
    """outs[m][rows of span s] = those rows of x @ W_m[expert].T for every matrix m of the
    region (one or two weights of one ggml type: they share x's rounding or quantization).
    In a prefill ubatch the experts that take the integer product are one region of integer
    GEMMs (`moe_gemm.expert_gemms`); the others are units of one region."""
    n_cols = x.shape[1]
    ggml_type = int(weights[0][1])
    n_tokens = spans[:, 2] - spans[:, 1]
    by_count = {n: integer_for(ggml_type, n) for n in set(n_tokens.tolist())}
    integer = np.array([by_count[n] for n in n_tokens.tolist()], dtype=np.int64)
    mats = [_checked_experts(w, ggml_type, n_cols) for w, _ in weights]
    alone = (integer == 1) & (len(x) > 1)     # a prefill ubatch: its integer experts in one GEMM region
    if alone.any():
        expert_gemms(x, spans[alone], mats, ggml_type, outs)
    grouped = spans[~alone]
    if len(grouped) == 0:
        return
    integer = np.repeat(integer[None, ~alone], len(mats), axis=0)
    experts = np.repeat(grouped[None, :, 0], len(mats), axis=0)
    n_rows = np.array([w.shape[1] for w in mats], dtype=np.int64)
    units, bounds = plan_units(np.ascontiguousarray(grouped[:, 1:]), experts, integer, n_rows,
                               DECODE_ROWS_PER_CHUNK, float_rows_per_chunk(n_cols), numba.get_num_threads())
    xq, xd, min_sums = _NO_QUANTS, _NO_FLOATS, _NO_FLOATS
    if integer.any():
        xa = QuantizedActivations.for_type(x, ggml_type)
        xq, xd, min_sums = xa.q, xa.d, xa.min_sums
    xf = _NO_FLOATS if integer.all() else read_only(np.ascontiguousarray(rounded(x, ggml_type), dtype=np.float32))
    expert_products(units, bounds, xf, xq, xd, min_sums, mats[0], mats[-1], ggml_type, ggml_type, n_cols, outs[0],
                    outs[-1])


class DecodeExperts:
    """`decode_experts` bound to one layer's gate, up and down expert tensors: step(x, experts)
    runs row r of x through expert experts[r]. `bound` gives one where it applies (a GLU it
    knows, gate and up of one type, all three on the integer path for one token), else None."""

    def __init__(self, gate, up, down, gate_type: int, down_type: int, glu_kind: int):
        self.gate, self.up, self.down = gate, up, down
        self.gate_type, self.down_type, self.glu_kind = gate_type, down_type, glu_kind
        self.gate_k_blocks = as_ggml_type(gate_type) in Q8_K_INPUT_TYPES
        self.down_k_blocks = as_ggml_type(down_type) in Q8_K_INPUT_TYPES

    @classmethod
    def bound(cls, gate, up, down, glu_kind, integer_for) -> DecodeExperts | None:
        """gate, up, down: (bytes (n_expert, n_rows, row_bytes), ggml type), as grouped_experts takes them."""
        if glu_kind is None or int(gate[1]) != int(up[1]):
            return None
        gate_type, down_type = int(gate[1]), int(down[1])
        if not (integer_for(gate_type, 1) and integer_for(down_type, 1)):
            return None
        n_embd, n_ff = down[0].shape[1], gate[0].shape[1]
        return cls(_checked_experts(gate[0], gate_type, n_embd), _checked_experts(up[0], gate_type, n_embd),
                   _checked_experts(down[0], down_type, n_ff), gate_type, down_type, glu_kind)

    def __call__(self, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return decode_experts(x, experts, self.gate, self.up, self.down, self.gate_type, self.down_type,
                              self.gate_k_blocks, self.down_k_blocks, self.glu_kind, DECODE_ROWS_PER_CHUNK,
                              DECODE_ROWS_PER_CHUNK, numba.get_num_threads())


def _decode_step(x, spans, gate, up, down, glu_kind, integer_for) -> np.ndarray | None:
    """`decode_experts` where it applies: one row per expert (a decode step) and `DecodeExperts.bound`."""
    step = DecodeExperts.bound(gate, up, down, glu_kind, integer_for) if len(spans) == len(x) else None
    return None if step is None else step(x, np.ascontiguousarray(spans[:, 0]))


def grouped_experts(x, spans, gate, up, down, activation, rounded, integer_for, glu_kind=None) -> np.ndarray:
    """down(activation(gate(x), up(x))) per expert over its rows of x, as float32 (R, n_embd).

    x: float32 (R, n_embd), each expert's rows contiguous. spans: (expert, first_row, end_row)
    per expert, covering x's rows in order; `expert` indexes the three weights. gate, up, down:
    (bytes (n_expert, n_rows, row_bytes), ggml type) of a type in GROUPED_TYPES.
    activation(gate_out, up_out): the family's GLU over float32 arrays. rounded(x, ggml_type):
    the float input a float product of that type takes (x itself, or x rounded as llama.cpp
    quantizes it). integer_for(ggml_type, n_tokens): whether an expert with n_tokens rows takes
    the integer product. glu_kind: `fused_ops.glu_rows`'s kind of that activation, or None;
    with one, glu_rows applies it (as the CPU's dense FFN does), and a decode step whose
    products are all integer ones is one call (`decode_experts`).
    """
    x = read_only(np.ascontiguousarray(x, dtype=np.float32))
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
    fused = _decode_step(x, spans, gate, up, down, glu_kind, integer_for)
    if fused is not None:
        return fused
    n_ff, n_embd = gate[0].shape[1], down[0].shape[1]
    gate_out = np.empty((x.shape[0], n_ff), dtype=np.float32)
    up_out = np.empty((x.shape[0], up[0].shape[1]), dtype=np.float32)
    if int(gate[1]) == int(up[1]):
        _products(x, spans, (gate, up), (gate_out, up_out), rounded, integer_for)
    else:
        _products(x, spans, (gate,), (gate_out,), rounded, integer_for)
        _products(x, spans, (up,), (up_out,), rounded, integer_for)
    if glu_kind is None:
        hidden = read_only(np.ascontiguousarray(activation(gate_out, up_out), dtype=np.float32))
    else:
        hidden = np.empty_like(gate_out)
        glu_rows(gate_out, up_out, glu_kind, hidden)
    out = np.empty((x.shape[0], n_embd), dtype=np.float32)
    _products(hidden, spans, (down,), (out,), rounded, integer_for)
    return out
