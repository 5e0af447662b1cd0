"""Fused dot products of one quantized weight row with one quantized activation row, in LLVM IR.

    ROW_DOTS[type_name](w, r, x, dx, sx, n_blocks) -> float32  (Numba intrinsics, host form)
    ROW_DOTS[type_name](w, (r0, r1, ..), x, dx, sx, n_blocks) -> (float32, ..): several rows
    row_dot_intrinsic(type_name, form)                         the same kernel in any isa.FORMS

w: the weight's raw GGUF bytes (uint8, rows first), r: the row; x: the token's activations
quantized to int8 (Q8_0 blocks of 32 for Q4_0 .. IQ4_NL, Q8_K blocks of 256 for the K-quants and
IQ4_XS), dx: their float32 block scales; sx: Q8_1's f16-rounded block sums s, which Q4_1 and
Q5_1 multiply their min m with (llama.cpp's vec_dot_q4_1_q8_1), unread by the other types. The
K-quants' mins enter as exact integer sums of min * x, as llama.cpp forms them from Q8_K's bsums.

Why: for one token (decode) a matmul streams every weight byte once, so it runs at memory speed
only if decoding costs less than reading. Each block is loaded straight into vector registers,
its nibbles, high bits and sub-block scales decoded there, and multiplied with the activations
by the CPU's u8 x s8 multiply-add (`isa.dot_u8_s8`; with sub-block scales, u8 x s8 pair sums
then one int16 multiply-add by the scales, `isa.dot_i16`, instead of an int32 multiply): no
scratch row in memory. Several rows per call share the activation loads.

Lanes and exactness (8 int32 / float32 lanes: one ymm register holds a 32-element group, the
unit of every layout here, and its multiply-add output; a zmm form would pair groups of two
blocks or sub-blocks):
per block, lane i of the integer sum is, over the block's 32-element groups g,
scale_g(i) * (sum over k < 4 of w[32g + 4i + k] * x[32g + 4i + k]), where scale_g(i) is the
integer sub-block scale of those elements (1 for the 32-element types). These sums are exact
(below 2**24, so their float conversion is exact too), hence identical in every isa form; then

    acc = acc + float(isum) * (d_w * dx[b])      (float32, block by block)
    acc = acc - float(imin) * (dmin * dx[b])     (Q2_K, Q4_K, Q5_K: imin the lanes of min * x)
    m_acc = m_acc + m_b * sx[b]                  (Q4_1, Q5_1: a float32 scalar)
    result = acc's 8 lanes summed by halves (lane i + lane i + 4, then + 2, then + 1) + m_acc

which `row_dot_reference` repeats in NumPy. Values stored with an offset (Q4_0's q - 8, Q5_0,
Q3_K, Q6_K) are multiplied as unsigned bytes and the offset taken off as offset * sum(x); signed
ones (Q8_0, the IQ4 tables) use isa.dot_s8_s8 or isa.sign_transfer (|w| and x with w's sign),
so activations must lie in [-127, 127], as the Q8 quantizers write them.
"""

from __future__ import annotations

import numpy as np
from gguf.quants import IQ4_NL
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.cpu import isa
from kernels.cpu.isa import f32, i8, i16, i32, i64, ir

LANES = 8
SIGNED = None            # the offset argument of _Block.dot for weights that are signed bytes
_IQ4_TABLE = isa.constant_vector(i8, [int(v) for v in IQ4_NL.kvalues])

# K-quants with mins: byte offset of the f16 dmin
MIN_OFFSETS = {"Q2_K": 82, "Q4_K": 2, "Q5_K": 2}
SUM_MIN_TYPES = ("Q4_1", "Q5_1")   # the f16 m at byte 2 times Q8_1's s
# type -> (block bytes, elements per block, byte offset of the f16 scale d)
LAYOUTS = {
    "Q4_0": (18, 32, 0), "Q4_1": (20, 32, 0), "Q5_0": (22, 32, 0), "Q5_1": (24, 32, 0),
    "Q8_0": (34, 32, 0), "IQ4_NL": (18, 32, 0),
    "Q2_K": (84, 256, 80), "Q3_K": (110, 256, 108), "Q4_K": (144, 256, 0), "Q5_K": (176, 256, 0),
    "Q6_K": (210, 256, 208), "IQ4_XS": (136, 256, 0),
}


class _Block:
    """IR emission for one weight block and its activations: loads and the dot product step."""

    def __init__(self, builder, w, x, form):
        self.builder, self.w, self.x, self.form = builder, w, x, form

    def bytes(self, offset, n=32):
        return isa.load_vector(self.builder, self.builder.gep(self.w, [ir.Constant(i64, offset)]), i8, n)

    def byte(self, offset):
        """One weight byte as an unsigned int32."""
        return self.builder.zext(self.builder.load(self.builder.gep(self.w, [ir.Constant(i64, offset)])), i32)

    def activations(self, group):
        return isa.load_vector(self.builder, self.builder.gep(self.x, [ir.Constant(i64, 32 * group)]), i8, 32)

    def dot(self, acc, weights, group, offset):
        """acc + the lanes of (weights - offset) . activations of 32-element group `group`.

        offset SIGNED: the weights are signed bytes (isa.dot_s8_s8); otherwise unsigned values below 64, and the offset is taken off as offset * sum(x),
        a second multiply-add instead of a sign transfer's three or four operations."""
        x = self.activations(group)
        if offset is SIGNED:
            return isa.dot_s8_s8(self.builder, acc, weights, x, self.form)
        if offset:   # taken off first: acc - offset * sum(x) is shared by the rows, and the
            # weights' multiply-add then accumulates onto it (no zeroed register, no subtract)
            acc = self.builder.sub(acc, isa.dot_u8_s8(self.builder, _zero_lanes(), _bytes_of(offset), x, self.form))
        return isa.dot_u8_s8(self.builder, acc, weights, x, self.form)

    def min_dot(self, acc, mins, group):
        """acc + the lanes of mins . activations: mins <32 x i8>, each element's 6-bit min."""
        return isa.dot_u8_s8(self.builder, acc, mins, self.activations(group), self.form)

    def scaled_dot(self, acc, weights, group, offset, scales):
        """acc + the lanes of scales * (weights - offset) . activations, scales <16 x i16> (one per
        pair of elements): the products summed in int16 pairs (vpmaddubsw), then multiplied by
        the scales and added into acc by one pair multiply-add (vpdpwssd). The pairs are exact:
        weights below 64 with the offset taken off as offset * (the pairs of x), or |w| <= 128."""
        x = self.activations(group)
        if offset is SIGNED:
            pairs = isa.pair_sums_u8_s8(self.builder, *isa.sign_transfer(self.builder, weights, x), self.form)
        else:
            pairs = isa.pair_sums_u8_s8(self.builder, weights, x, self.form)
            if offset:
                pairs = self.builder.sub(pairs, isa.pair_sums_u8_s8(self.builder, _bytes_of(offset), x, self.form))
        return isa.dot_i16(self.builder, acc, pairs, scales, self.form)


def _zero_lanes():
    return ir.Constant(isa.vector(i32, LANES), None)


def _bytes_of(value, n=32):
    return ir.Constant(isa.vector(i8, n), value)


def _low(builder, v):
    return builder.and_(v, _bytes_of(15, v.type.count))


def _high(builder, v):
    return builder.lshr(v, _bytes_of(4, v.type.count))


def _bits(builder, v, shift, mask, to=0):
    """((v >> shift) & mask) << to per byte, as one shift and one mask (x86 has no byte
    shifts: each is a word shift and a mask, so the fewer the better)."""
    n = v.type.count
    if shift > to:
        v = builder.lshr(v, _bytes_of(shift - to, n))
    elif to > shift:
        v = builder.shl(v, _bytes_of(to - shift, n))
    return builder.and_(v, _bytes_of(mask << to, n))


def _nibbles(builder, blk, offset):
    """<32 x i8>: the 16 low nibbles of the bytes at offset, then the 16 high ones (the 32-element
    types' order). AVX-512 forms: the 16 bytes loaded into both halves, the upper half's words
    shifted by 4 (vpsrlvw), one mask: three instructions instead of four."""
    if blk.form in ("avx512bw", "avx512vnni"):
        both = blk.bytes(offset, 16)
        both = builder.shuffle_vector(both, both, isa.indices(list(range(16)) * 2))
        words = builder.lshr(builder.bitcast(both, isa.vector(i16, 16)), isa.constant_vector(i16, [0] * 8 + [4] * 8))
        return _low(builder, builder.bitcast(words, isa.vector(i8, 32)))
    v16 = blk.bytes(offset, 16)
    return builder.shuffle_vector(_low(builder, v16), _high(builder, v16), isa.indices(range(32)))


def _spread(builder, scales16, group):
    """<16 x i16> pair scales: pairs 0-7 scales16[group], pairs 8-15 scales16[group + 1]
    (16-element groups)."""
    return builder.shuffle_vector(scales16, scales16, isa.indices([group] * 8 + [group + 1] * 8))


def _splat16(builder, scale):
    """<16 x i16> pair scales: every pair the int32 `scale` (one 32-element group)."""
    return isa.splat(builder, builder.trunc(scale, i16), 16)


def _fifth_bits(builder, blk, offset):
    """<32 x i8>: 16 where bit j of the u32 at offset is set (element j's fifth bit), else 0."""
    bits = isa.load_scalar(builder, builder.gep(blk.w, [ir.Constant(i64, offset)]), i32)
    return builder.shl(isa.bits_to_bytes(builder, bits, 32), _bytes_of(4))


# --- the 32-element types: one group per block --------------------------------------------------

def _q8_0(builder, blk):
    return blk.dot(_zero_lanes(), blk.bytes(2), 0, SIGNED)


def _q4_0(builder, blk):
    return blk.dot(_zero_lanes(), _nibbles(builder, blk, 2), 0, 8)


def _q4_1(builder, blk):
    return blk.dot(_zero_lanes(), _nibbles(builder, blk, 4), 0, 0)


def _q5_0(builder, blk):
    q = builder.or_(_nibbles(builder, blk, 6), _fifth_bits(builder, blk, 2))
    return blk.dot(_zero_lanes(), q, 0, 16)


def _q5_1(builder, blk):
    q = builder.or_(_nibbles(builder, blk, 8), _fifth_bits(builder, blk, 4))
    return blk.dot(_zero_lanes(), q, 0, 0)


def _iq4_nl(builder, blk):
    values = isa.lookup16(builder, _IQ4_TABLE, _nibbles(builder, blk, 2), blk.form)
    return blk.dot(_zero_lanes(), values, 0, SIGNED)


# --- the 256-element types: eight groups of 32 with integer sub-block scales ---------------------

def _k_scale_min(builder, blk, j):
    """Q4_K / Q5_K 6-bit (scale, min) of sub-block j from the 12 bytes at 4 (see k_scale_min)."""
    def six_bits(offset):
        return builder.and_(blk.byte(offset), ir.Constant(i32, 63))

    if j < 4:
        return six_bits(4 + j), six_bits(8 + j)
    def with_top_bits(low, top_byte):
        """low | (the top 2 bits of top_byte) << 4."""
        return builder.or_(low, builder.shl(builder.lshr(top_byte, ir.Constant(i32, 6)), ir.Constant(i32, 4)))

    packed = blk.byte(8 + j)
    scale = with_top_bits(builder.and_(packed, ir.Constant(i32, 15)), blk.byte(j))
    minimum = with_top_bits(builder.lshr(packed, ir.Constant(i32, 4)), blk.byte(4 + j))
    return scale, minimum


def _k_sub_blocks(builder, blk, qs_offset, fifth_bits):
    """Q4_K and Q5_K: sub-block j is nibble j % 2 of the 32 bytes at qs_offset + 32 (j // 2), with
    fifth bit (fifth_bits[l] >> j) & 1 (Q5_K); (isum, imin) lanes."""
    acc, acc_min = _zero_lanes(), _zero_lanes()
    for j in range(8):
        q = blk.bytes(qs_offset + 32 * (j >> 1))
        q = _high(builder, q) if j & 1 else _low(builder, q)
        if fifth_bits is not None:
            q = builder.or_(q, _bits(builder, fifth_bits, j, 1, 4))
        scale, minimum = _k_scale_min(builder, blk, j)
        acc = blk.scaled_dot(acc, q, j, 0, _splat16(builder, scale))
        acc_min = blk.min_dot(acc_min, isa.splat(builder, builder.trunc(minimum, i8), 32), j)
    return acc, acc_min


def _q4_k(builder, blk):
    """d | dmin | scales[12] | qs[128]."""
    return _k_sub_blocks(builder, blk, 16, None)


def _q5_k(builder, blk):
    """d | dmin | scales[12] | qh[32] | qs[128]."""
    return _k_sub_blocks(builder, blk, 48, blk.bytes(16))


def _q6_k(builder, blk):
    """ql[128] | qh[64] | scales int8[16] | d: element 128a + 32s + l has low nibble s // 2 of
    ql[64a + 32(s % 2) + l], high bits (qh[32a + l] >> 2s) & 3, value q - 32, scale per 16."""
    scales = builder.sext(blk.bytes(192, 16), isa.vector(i16, 16))
    acc = _zero_lanes()
    for a in range(2):
        qh = blk.bytes(128 + 32 * a)
        for s in range(4):
            ql = blk.bytes(64 * a + 32 * (s & 1))
            low = _high(builder, ql) if s >> 1 else _low(builder, ql)
            q = builder.or_(low, _bits(builder, qh, 2 * s, 3, 4))
            acc = blk.scaled_dot(acc, q, 4 * a + s, 32, _spread(builder, scales, 8 * a + 2 * s))
    return acc


def _q2_k(builder, blk):
    """scales[16] | qs[64] | d | dmin: element 128h + 32s + l is (qs[32h + l] >> 2s) & 3, its
    16-element group's multiplier the low nibble of scales[8h + 2s + l // 16]."""
    scale_bytes = blk.bytes(0, 16)
    scales = builder.zext(_low(builder, scale_bytes), isa.vector(i16, 16))
    mins = _high(builder, scale_bytes)
    acc, acc_min = _zero_lanes(), _zero_lanes()
    for h in range(2):
        qs = blk.bytes(16 + 32 * h)
        for s in range(4):
            group = 8 * h + 2 * s
            acc = blk.scaled_dot(acc, _bits(builder, qs, 2 * s, 3), 4 * h + s, 0, _spread(builder, scales, group))
            group_mins = builder.shuffle_vector(mins, mins, isa.indices([group] * 16 + [group + 1] * 16))
            acc_min = blk.min_dot(acc_min, group_mins, 4 * h + s)
    return acc, acc_min


def _q3_k_scales(builder, blk):
    """<16 x i16>: the signed 6-bit scales of Q3_K's 16 groups (see q3_k_scale): low 4 bits
    from bytes 96..103 (low nibbles for groups 0-7, high for 8-15), high 2 bits from 104..107."""
    low8 = blk.bytes(96, 8)
    low = builder.shuffle_vector(_low(builder, low8), _high(builder, low8), isa.indices(range(16)))
    high4 = blk.bytes(104, 4)
    high = builder.shuffle_vector(high4, high4, isa.indices([g & 3 for g in range(16)]))
    shifts = isa.constant_vector(i8, [2 * (g >> 2) for g in range(16)])
    high = builder.and_(builder.lshr(high, shifts), _bytes_of(3, 16))
    scales = builder.or_(low, builder.shl(high, _bytes_of(4, 16)))
    return builder.sub(builder.zext(scales, isa.vector(i16, 16)), ir.Constant(isa.vector(i16, 16), 32))


def _q3_k(builder, blk):
    """hmask[32] | qs[64] | scales[12] | d: element 128h + 32s + l has low bits
    (qs[32h + l] >> 2s) & 3 and high bit (hmask[l] >> (4h + s)) & 1; value low + 4 high - 4."""
    scales = _q3_k_scales(builder, blk)
    hmask = blk.bytes(0)
    acc = _zero_lanes()
    for h in range(2):
        qs = blk.bytes(32 + 32 * h)
        for s in range(4):
            high = _bits(builder, hmask, 4 * h + s, 1, 2)
            q = builder.or_(_bits(builder, qs, 2 * s, 3), high)
            acc = blk.scaled_dot(acc, q, 4 * h + s, 4, _spread(builder, scales, 8 * h + 2 * s))
    return acc


def _iq4_xs(builder, blk):
    """d | scales_h u16 | scales_l[4] | qs[128]: sub-block j's 16 bytes at 8 + 16j as IQ4_NL,
    scale ((scales_l[j // 2] >> 4(j % 2)) & 15 | ((scales_h >> 2j) & 3) << 4) - 32."""
    scales_high = builder.or_(blk.byte(2), builder.shl(blk.byte(3), ir.Constant(i32, 8)))
    acc = _zero_lanes()
    for j in range(8):
        low = builder.and_(builder.lshr(blk.byte(4 + (j >> 1)), ir.Constant(i32, 4 * (j & 1))), ir.Constant(i32, 15))
        high = builder.and_(builder.lshr(scales_high, ir.Constant(i32, 2 * j)), ir.Constant(i32, 3))
        scale = builder.sub(builder.or_(low, builder.shl(high, ir.Constant(i32, 4))), ir.Constant(i32, 32))
        values = isa.lookup16(builder, _IQ4_TABLE, _nibbles(builder, blk, 8 + 16 * j), blk.form)
        acc = blk.scaled_dot(acc, values, j, SIGNED, _splat16(builder, scale))
    return acc


_DECODERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "IQ4_NL": _iq4_nl,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_XS": _iq4_xs,
}


def _scaled(builder, lanes, w_block, half_offset, dx_b, form):
    """float(lanes) * (the block's f16 at half_offset * dx_b), the scale formed in every lane
    (the same float32 product as a scalar one; fewer instructions, dx_b's lanes shared by the rows)."""
    d_w = isa.load_half_lanes(builder, builder.gep(w_block, [ir.Constant(i64, half_offset)]), LANES, form)
    scale = builder.fmul(d_w, isa.splat(builder, dx_b, LANES))
    return builder.fmul(builder.sitofp(lanes, isa.vector(f32, LANES)), scale)


def _emit_row_dots(context, builder, signature, args, type_name, form):
    """The block loop over one row, or a tuple of rows at once: integer lanes per block and row,
    scaled and accumulated in float32 lanes, one accumulator per row. The rows share the
    activation loads (and what is computed from the activations alone, such as the offsets'
    sums), and their independent float chains hide each other's add latency. No software
    prefetch here: 256 or 1024 bytes ahead within a row gained nothing; the caller asks for
    whole rows several KiB ahead, across the 4 KiB pages (`qmatmul.PREFETCH_ROWS_AHEAD`)."""
    block_bytes, block_elements, d_offset = LAYOUTS[type_name]
    w_type, r_type, x_type, dx_type, sx_type, _ = signature.args
    w_arr, r, x_arr, dx_arr, sx_arr, n_blocks = args
    zero = ir.Constant(i64, 0)
    indices = [builder.extract_value(r, k) for k in range(r_type.count)] if isinstance(r_type, types.UniTuple) else [r]
    rows = [isa.row_pointer(context, builder, w_type, w_arr, index) for index in indices]
    x_row = isa.element_pointer(context, builder, x_type, x_arr, zero)
    dx_row = isa.element_pointer(context, builder, dx_type, dx_arr, zero)
    sx_row = isa.element_pointer(context, builder, sx_type, sx_arr, zero)
    f32_lanes = isa.vector(f32, LANES)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(f32_lanes, None)) for _ in rows]
    m_accs = [cgutils.alloca_once_value(builder, ir.Constant(f32, 0)) for _ in rows]
    with cgutils.for_range(builder, n_blocks) as loop:
        b = loop.index
        x_block = builder.gep(x_row, [builder.mul(b, ir.Constant(i64, block_elements))])
        dx_b = builder.load(builder.gep(dx_row, [b]))
        for row, acc, m_acc in zip(rows, accs, m_accs):
            w_block = builder.gep(row, [builder.mul(b, ir.Constant(i64, block_bytes))])
            lanes = _DECODERS[type_name](builder, _Block(builder, w_block, x_block, form))
            isum, imin = lanes if type_name in MIN_OFFSETS else (lanes, None)
            total = builder.fadd(builder.load(acc), _scaled(builder, isum, w_block, d_offset, dx_b, form))
            if imin is not None:
                total = builder.fsub(total, _scaled(builder, imin, w_block, MIN_OFFSETS[type_name], dx_b, form))
            builder.store(total, acc)
            if type_name in SUM_MIN_TYPES:
                m_b = isa.load_half(builder, builder.gep(w_block, [ir.Constant(i64, 2)]), form)
                m_term = builder.fmul(m_b, builder.load(builder.gep(sx_row, [b])))
                builder.store(builder.fadd(builder.load(m_acc), m_term), m_acc)
    return [builder.fadd(isa.sum_lanes_by_halves(builder, builder.load(acc)), builder.load(m_acc))
            for acc, m_acc in zip(accs, m_accs)]


def row_dot_intrinsic(type_name: str, form: str = isa.ISA):
    """A Numba intrinsic row_dot(w, r, x, dx, sx, n_blocks) for one type and isa form: float32
    row r . x, or for a tuple of rows r a tuple of their floats, computed together."""
    if type_name not in _DECODERS:
        raise ValueError(f"no fused block dot for {type_name}")

    @intrinsic
    def row_dot(typingctx, w, r, x, dx, sx, n_blocks):
        if w.dtype != types.uint8 or w.ndim != 2 or x.dtype != types.int8:
            return None
        if dx.dtype != types.float32 or sx.dtype != types.float32:
            return None
        if isinstance(r, types.UniTuple) and isinstance(r.dtype, types.Integer):
            rows_type, result_type = types.UniTuple(types.int64, r.count), types.UniTuple(types.float32, r.count)
        elif isinstance(r, types.Integer):
            rows_type, result_type = types.int64, types.float32
        else:
            return None

        def codegen(context, builder, signature, args):
            values = _emit_row_dots(context, builder, signature, args, type_name, form)
            if isinstance(result_type, types.UniTuple):
                return context.make_tuple(builder, result_type, values)
            return values[0]

        return result_type(w, rows_type, x, dx, sx, types.int64), codegen

    return row_dot


ROW_DOTS = {name: row_dot_intrinsic(name) for name in _DECODERS}


def _lane_sums(values, x, n_blocks):
    products = np.asarray(values, np.int64) * np.asarray(x, np.int64)
    return products.reshape(n_blocks, -1, LANES, 4).sum(axis=(1, 3))    # (n_blocks, LANES), exact


def row_dot_reference(w_values, d_w, x, dx, min_values=None, dmin=None, m=None, sx=None) -> np.float32:
    """NumPy twin of a row dot: w_values the row's integer weights (sub-block scales multiplied
    in; unpack's tile row), d_w float32 per block; for Q2_K / Q4_K / Q5_K also min_values (each
    element's integer sub-block min) and dmin per block; for Q4_1 / Q5_1 m per block and sx.
    The same lanes, the same float steps."""
    n_blocks = len(d_w)
    isums = _lane_sums(w_values, x, n_blocks)
    imins = None if min_values is None else _lane_sums(min_values, x, n_blocks)
    acc = np.zeros(LANES, dtype=np.float32)
    for b in range(n_blocks):
        acc = acc + isums[b].astype(np.float32) * (np.float32(d_w[b]) * np.float32(dx[b]))
        if imins is not None:
            acc = acc - imins[b].astype(np.float32) * (np.float32(dmin[b]) * np.float32(dx[b]))
    width = LANES
    while width > 1:
        width //= 2
        acc = acc[:width] + acc[width:2 * width]
    m_acc = np.float32(0)
    for b in range(n_blocks if m is not None else 0):
        m_acc = np.float32(m_acc + np.float32(m[b]) * np.float32(sx[b]))
    return np.float32(acc[0] + m_acc)

