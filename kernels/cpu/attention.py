"""Attention of query tokens over a KV cache kept in its storage type.

    attend_cache(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window,
                 kq_scale, rounding, out)

One pass over the cells with an online softmax (a running maximum, sum and weighted value
sum per query head, as llama.cpp's CPU flash attention keeps them): each visible cell's key
and value rows are decoded once into a scratch row (bit-exact with `dequantize_rows`) and
used by every query head that reads them, so a step neither decodes the whole cache nor
allocates anything the size of it. Cells a query may not see (empty, in its future, outside
its sliding window or chunk) are skipped before they are decoded.

`rounding` picks how the sums are rounded (queries arrive already rounded to the key's dot type):
  EXACT  float32 running sums.
  FLASH  llama.cpp's CPU flash attention of a few queries (ggml's one-chunk kernel): an F16 V's
         running value sum is held in f16, each rescale and each multiply-add (one f32 fused
         multiply-add) rounded to f16 per element, divided by the sum at the end in f32.
  PLAIN  llama.cpp's CPU attention without flash attention (mul_mat, soft_max, mul_mat): two
         passes, the scores of all cells first, then probabilities normalised (the exponentials
         summed in double) and rounded to V's dot type (f16 or bf16) before the V product.

Storage: uint8 rows (cells, row_bytes) of F32, F16, BF16 or a `quantize_rows` block type,
all kv heads of a cell in one row. q (T, n_head, d_k) C-ordered float32, grouped-query heads
(query head h reads kv head h // (n_head / n_head_kv)); out (T, n_head * d_v) float32. More than
PARALLEL_MIN_TOKENS queries run in parallel over the queries.

Speed (a decode step is ~100k multiply-adds per layer): every per-element loop is one that LLVM
packs: F16/BF16/F32 rows are read in place by intrinsics (vcvtph2ps for f16), the f16 rounding is
vcvtps2ph/vcvtph2ps, the fused multiply-adds are llvm.fma, and the score is `_dot`, an IR loop of
plain vector loads in a fixed order. The per-cell loop takes no array slice: Numba gives each
slice two atomic reference-count updates, which cost more than a cell's arithmetic.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from kernels.cpu import isa
from kernels.cpu.decode import decode_row
from kernels.cpu.formats import f32_to_bf16_bits

FULL, SLIDING, CHUNKED = 0, 1, 2    # which cached positions a query sees (llama_hparams::is_masked_swa)
EXACT, FLASH, PLAIN = 0, 1, 2       # how the sums are rounded (see the module docstring)
PARALLEL_MIN_TOKENS = 5             # a decode step's few queries stay on the calling thread
_LANES = 32

_F32, _F16, _BF16 = int(QType.F32), int(QType.F16), int(QType.BF16)
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(QType[n]) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
_IQ4_NL = int(QType.IQ4_NL)
CACHE_TYPES = frozenset((_F32, _F16, _BF16, _Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _IQ4_NL))


@njit(cache=True, nogil=True, inline="always")
def _visible(q, k, mask_kind, window):
    if k < 0 or k > q:
        return False
    if mask_kind == SLIDING:
        return q - k < window
    if mask_kind == CHUNKED:
        return k >= (q // window) * window
    return True


@intrinsic
def _through_half(typingctx, x):
    """float32 x converted to IEEE half (nearest, ties to even) and back: vcvtps2ph / vcvtph2ps
    with F16C, which a loop of it packs eight or sixteen at a time."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.float32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c in float32 with one rounding (llvm.fma: vfmadd with FMA, packed in a loop)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return _vector_fma(builder, *args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(cache=True, nogil=True, inline="always")
def f16_round(x):
    """x rounded to the nearest float16 (ties to even), as a float32: the same value as a
    conversion to f16 and back, a NaN kept as it is (the FLASH sum rounds every element)."""
    return x if x != x else _through_half(np.float32(x))


@njit(cache=True, nogil=True, inline="always")
def _bf16(x):
    return np.uint32(np.uint32(f32_to_bf16_bits(x)) << np.uint32(16)).view(np.float32)


def _vector_fma(builder, a, b, c):
    """a * b + c with one rounding, of float32 scalars or vectors (llvm.fma)."""
    kind = "f32" if isinstance(c.type, ir.FloatType) else f"v{c.type.count}f32"
    return isa.call_intrinsic(builder, f"llvm.fma.{kind}", c.type, [a, b, c])


def _lane_sum(builder, v):
    """The 8 lanes of v summed as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    halves = builder.fadd(builder.shuffle_vector(v, v, isa.indices(range(4))),
                          builder.shuffle_vector(v, v, isa.indices(range(4, 8))))
    pairs = builder.fadd(halves, builder.shuffle_vector(halves, halves, isa.indices([2, 3, 0, 1])))
    return builder.fadd(builder.extract_element(pairs, ir.Constant(isa.i32, 0)),
                        builder.extract_element(pairs, ir.Constant(isa.i32, 1)))


def _dot_codegen(context, builder, signature, args):
    """sum a[a0 + i] * b[b0 + i], i < n, in _dot's order: three loops, each with a block after
    it that folds its accumulators."""
    a_type, _, b_type, _, _ = signature.args
    a_arr, a0, b_arr, b0, n = args
    pa = builder.gep(context.make_array(a_type)(context, builder, a_arr).data, [a0])
    pb = builder.gep(context.make_array(b_type)(context, builder, b_arr).data, [b0])
    f32, i64 = ir.FloatType(), isa.i64
    f32x8 = isa.vector(f32, 8)
    zeros = ir.Constant(f32x8, None)

    def vectors(i, offset):
        index = builder.add(i, ir.Constant(i64, offset))
        return (isa.load_vector(builder, builder.gep(pa, [index]), f32, 8),
                isa.load_vector(builder, builder.gep(pb, [index]), f32, 8))

    def counter(start, start_block):
        i = builder.phi(i64)
        i.add_incoming(start, start_block)
        return i

    entry = builder.block
    n32 = builder.and_(n, ir.Constant(i64, -32))
    n8 = builder.and_(n, ir.Constant(i64, -8))
    blocks32, fold32, after32, blocks8, fold8, after8, singles, done = (builder.append_basic_block(name) for name in (
        "blocks32", "fold32", "after32", "blocks8", "fold8", "after8", "singles", "done"))
    builder.cbranch(builder.icmp_signed(">", n32, ir.Constant(i64, 0)), blocks32, after32)

    builder.position_at_end(blocks32)           # four 8-lane accumulators over blocks of 32
    i = counter(ir.Constant(i64, 0), entry)
    accs = [builder.phi(f32x8) for _ in range(4)]
    next_i = builder.add(i, ir.Constant(i64, 32))
    i.add_incoming(next_i, blocks32)
    new_accs = [_vector_fma(builder, *vectors(i, 8 * u), acc) for u, acc in enumerate(accs)]
    for acc, new_acc in zip(accs, new_accs):
        acc.add_incoming(zeros, entry)
        acc.add_incoming(new_acc, blocks32)
    builder.cbranch(builder.icmp_signed("<", next_i, n32), blocks32, fold32)

    builder.position_at_end(fold32)
    sum32 = _lane_sum(builder, builder.fadd(builder.fadd(new_accs[0], new_accs[1]),
                                            builder.fadd(new_accs[2], new_accs[3])))
    builder.branch(after32)

    builder.position_at_end(after32)
    total32 = builder.phi(f32)
    total32.add_incoming(ir.Constant(f32, 0.0), entry)
    total32.add_incoming(sum32, fold32)
    start8 = builder.insert_element(zeros, total32, ir.Constant(isa.i32, 0))
    builder.cbranch(builder.icmp_signed(">", n8, n32), blocks8, after8)

    builder.position_at_end(blocks8)            # then blocks of 8 into one accumulator
    j = counter(n32, after32)
    acc8 = builder.phi(f32x8)
    next_j = builder.add(j, ir.Constant(i64, 8))
    j.add_incoming(next_j, blocks8)
    new_acc8 = _vector_fma(builder, *vectors(j, 0), acc8)
    acc8.add_incoming(start8, after32)
    acc8.add_incoming(new_acc8, blocks8)
    builder.cbranch(builder.icmp_signed("<", next_j, n8), blocks8, fold8)

    builder.position_at_end(fold8)
    sum8 = _lane_sum(builder, new_acc8)
    builder.branch(after8)

    builder.position_at_end(after8)
    total8 = builder.phi(f32)
    total8.add_incoming(total32, after32)
    total8.add_incoming(sum8, fold8)
    builder.cbranch(builder.icmp_signed(">", n, n8), singles, done)

    builder.position_at_end(singles)            # then one element at a time
    k = counter(n8, after8)
    total = builder.phi(f32)
    next_k = builder.add(k, ir.Constant(i64, 1))
    k.add_incoming(next_k, singles)
    new_total = _vector_fma(builder, builder.load(builder.gep(pa, [k])), builder.load(builder.gep(pb, [k])), total)
    total.add_incoming(total8, after8)
    total.add_incoming(new_total, singles)
    builder.cbranch(builder.icmp_signed("<", next_k, n), singles, done)

    builder.position_at_end(done)
    result = builder.phi(f32)
    result.add_incoming(total8, after8)
    result.add_incoming(new_total, singles)
    return result


@intrinsic
def _dot(typingctx, a, a0, b, b0, n):
    """sum of a[a0 + i] * b[b0 + i] for i < n (flat element offsets into C-ordered float32
    arrays), in one fixed order: blocks of 32 elements into four 8-lane accumulators by fused
    multiply-adds, folded (acc0 + acc1) + (acc2 + acc3) and summed by `_lane_sum`; the rest in
    blocks of 8 into one accumulator that starts from that sum, summed the same way; the last
    n % 8 by scalar fused multiply-adds. (The order that LLVM gave the earlier Numba loop, kept
    so that scores stay bit for bit what they were.)"""
    for array in (a, b):
        if not (isinstance(array, types.Array) and array.dtype == types.float32 and array.layout == "C"):
            return None
    return types.float32(a, types.int64, b, types.int64, types.int64), _dot_codegen


def _element_reader(kind):
    """An intrinsic read(store, c, i) -> float32: element i of uint8 row c stored as kind
    ("f32", "f16", "bf16"), read in place so that a loop of it vectorises (vcvtph2ps for f16)."""

    @intrinsic
    def read(typingctx, store, c, i):
        if not (isinstance(store, types.Array) and store.dtype == types.uint8 and store.ndim == 2):
            return None

        def codegen(context, builder, signature, args):
            array = context.make_array(signature.args[0])(context, builder, args[0])
            row = builder.gep(array.data, [builder.mul(args[1], builder.extract_value(array.strides, 0))])
            f32 = ir.FloatType()
            if kind == "f32":
                return builder.load(builder.gep(builder.bitcast(row, f32.as_pointer()), [args[2]]), align=1)
            bits = builder.load(builder.gep(builder.bitcast(row, isa.i16.as_pointer()), [args[2]]), align=1)
            if kind == "f16":
                return builder.fpext(builder.bitcast(bits, ir.HalfType()), f32)
            return builder.bitcast(builder.shl(builder.zext(bits, isa.i32), ir.Constant(isa.i32, 16)), f32)

        return types.float32(store, types.int64, types.int64), codegen

    return read


_read_f32, _read_f16, _read_bf16 = (_element_reader(kind) for kind in ("f32", "f16", "bf16"))


@njit(cache=True, nogil=True)
def _load_row(type_code, store, c, row):
    """row (1, n) = cache row c as float32: F32, F16 and BF16 converted in place by vector
    loops, any other type through decode_row (the same values)."""
    n = row.shape[1]
    if type_code == _F16:
        for i in range(n):
            row[0, i] = _read_f16(store, c, i)
    elif type_code == _F32:
        for i in range(n):
            row[0, i] = _read_f32(store, c, i)
    elif type_code == _BF16:
        for i in range(n):
            row[0, i] = _read_bf16(store, c, i)
    else:
        decode_row(type_code, store, c, n, _LANES, row, 0)


@njit(cache=True, nogil=True)
def _online_query(t, q, k_store, k_type, v_store, v_type, group, cell_pos, q_pos, mask_kind, window, scale,
                  f16_sum, key, value, values, running_max, running_sum, acc, out):
    """out[t] by one pass with an online softmax; f16_sum: the value sum held in f16 (FLASH).
    key / value: (1, n) scratch rows, values: value as (n_head_kv, d_v)."""
    n_head, d_k = q.shape[1], q.shape[2]
    d_v = acc.shape[1]
    running_max[:] = -np.inf
    running_sum[:] = 0.0
    acc[:] = 0.0
    for c in range(cell_pos.shape[0]):
        if not _visible(q_pos[t], cell_pos[c], mask_kind, window):
            continue
        _load_row(k_type, k_store, c, key)
        _load_row(v_type, v_store, c, value)
        for h in range(n_head):
            g = h // group
            score = _dot(q, (t * n_head + h) * d_k, key, g * d_k, d_k) * scale
            # the value sum's updates, written out here: a helper taking the arrays would cost
            # reference-count updates per call; fused multiply-adds are explicit (_fma)
            if score > running_max[h]:      # a new maximum: rescale what was summed so far
                shrink = np.exp(running_max[h] - score)
                running_max[h] = score
                running_sum[h] = running_sum[h] * shrink + np.float32(1.0)
                if f16_sum:     # ggml_vec_scale_f16, then ggml_vec_mad_f16 by 1 (an exact sum of halves)
                    for i in range(d_v):
                        acc[h, i] = f16_round(values[g, i] + f16_round(acc[h, i] * shrink))
                else:
                    for i in range(d_v):
                        acc[h, i] = _fma(acc[h, i], shrink, values[g, i])
            else:
                p = np.exp(score - running_max[h])
                running_sum[h] += p
                if f16_sum:     # ggml_vec_mad_f16
                    for i in range(d_v):
                        acc[h, i] = f16_round(_fma(values[g, i], p, acc[h, i]))
                else:
                    for i in range(d_v):
                        acc[h, i] = _fma(p, values[g, i], acc[h, i])
    for h in range(n_head):
        inverse = np.float32(1.0) / running_sum[h]
        for i in range(d_v):
            out[t, h * d_v + i] = acc[h, i] * inverse


@njit(cache=True, nogil=True)
def _plain_query(t, q, k_store, k_type, v_store, v_type, group, cell_pos, q_pos, mask_kind, window, scale,
                 key, value, values, scores, acc, out):
    """out[t] as llama.cpp computes it without flash attention: all scores, a softmax normalised
    in f32 by the double sum of its exponentials, the probabilities rounded to V's dot type."""
    n_head, d_k = q.shape[1], q.shape[2]
    d_v = acc.shape[1]
    scores[:] = -np.inf
    for c in range(cell_pos.shape[0]):
        if _visible(q_pos[t], cell_pos[c], mask_kind, window):
            _load_row(k_type, k_store, c, key)
            for h in range(n_head):
                scores[c, h] = _dot(q, (t * n_head + h) * d_k, key, (h // group) * d_k, d_k) * scale
    for h in range(n_head):
        largest = np.float32(-np.inf)
        for c in range(cell_pos.shape[0]):
            largest = max(largest, scores[c, h])
        total = 0.0
        for c in range(cell_pos.shape[0]):
            e = np.exp(scores[c, h] - largest)
            scores[c, h] = e
            total += np.float64(e)
        inverse = np.float32(1.0 / total)
        for c in range(cell_pos.shape[0]):
            p = scores[c, h] * inverse
            scores[c, h] = f16_round(p) if v_type == _F16 else (_bf16(p) if v_type == _BF16 else p)
    acc[:] = 0.0
    for c in range(cell_pos.shape[0]):
        if not _visible(q_pos[t], cell_pos[c], mask_kind, window):
            continue
        _load_row(v_type, v_store, c, value)
        for h in range(n_head):
            g, p = h // group, scores[c, h]
            for i in range(d_v):
                acc[h, i] = _fma(p, values[g, i], acc[h, i])
    for h in range(n_head):
        for i in range(d_v):
            out[t, h * d_v + i] = acc[h, i]


@njit(cache=True, nogil=True)
def _attend_queries(t0, t1, q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window,
                    kq_scale, rounding, out):
    """out[t0:t1], with scratch rows of its own."""
    n_head, d_k = q.shape[1], q.shape[2]
    d_v = out.shape[1] // n_head
    group = n_head // n_head_kv
    key = np.empty((1, n_head_kv * d_k), dtype=np.float32)
    value = np.empty((1, n_head_kv * d_v), dtype=np.float32)
    values = value.reshape((n_head_kv, d_v))
    acc = np.empty((n_head, d_v), dtype=np.float32)
    scale = np.float32(kq_scale)
    if rounding == PLAIN:
        scores = np.empty((cell_pos.shape[0], n_head), dtype=np.float32)
        for t in range(t0, t1):
            _plain_query(t, q, k_store, k_type, v_store, v_type, group, cell_pos, q_pos, mask_kind, window, scale,
                         key, value, values, scores, acc, out)
        return
    f16_sum = rounding == FLASH and v_type == _F16
    running_max = np.empty(n_head, dtype=np.float32)
    running_sum = np.empty(n_head, dtype=np.float32)
    for t in range(t0, t1):
        _online_query(t, q, k_store, k_type, v_store, v_type, group, cell_pos, q_pos, mask_kind, window, scale,
                      f16_sum, key, value, values, running_max, running_sum, acc, out)


@njit(cache=True, nogil=True, parallel=True)
def _attend_parallel(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window, kq_scale,
                     rounding, out):
    n_tokens = q.shape[0]
    for t in prange(n_tokens):
        _attend_queries(t, t + 1, q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind,
                        window, kq_scale, rounding, out)


def attend_cache(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window, kq_scale,
                 rounding, out):
    """out[t] = softmax(kq_scale * q[t] K^T over the cells q_pos[t] sees) V, per query head."""
    if not q.flags.c_contiguous:
        raise ValueError(f"attend_cache: q {q.shape} must be C-contiguous")
    if q.shape[0] < PARALLEL_MIN_TOKENS:
        _attend_queries(0, q.shape[0], q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind,
                        window, kq_scale, rounding, out)
    else:
        _attend_parallel(q, k_store, k_type, v_store, v_type, n_head_kv, cell_pos, q_pos, mask_kind, window,
                         kq_scale, rounding, out)
