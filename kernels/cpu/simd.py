"""The one vector primitive of the integer-dot kernels, written in LLVM IR.

    scaled_block_dot(w, w0, w_stride, dw, dw0, dw_stride, x, x0, dx, n_blocks, groups) -> float32

        sum over blocks b < n_blocks of  float(S_b) * (dw_b * dx[b]),
        S_b = sum over e < 32 * groups of  w[w0 + b * w_stride + e] * x[x0 + b * 32 * groups + e]

`w` is int8 (Q8_0 rows read in place) or int16 (weights unpacked to small integers, sub-block
scales multiplied in); `x` int8: the activations quantized to Q8_0 / Q8_K blocks; `dx` their
float32 block scales. The weight's block scale dw_b is `dw[dw0 + b * dw_stride]`: a float32
element, or, when dw is uint8, the IEEE half stored in those two bytes (a ggml block's `d`,
read in place from the row).

Why IR: Numba widens every integer product to 64 bits, so a plain loop of int8 products never
becomes a packed 16-bit multiply-add; and a per-block reduction written in Python costs a
horizontal sum per block. Here the block's integer sum stays in 16 int32 lanes (each lane the
sum of pairs of products: exactly the shape of x86's vpmaddwd / vpdpwssd, and of NEON's
sdot-free smlal pairs), is converted to float once per block, scaled, and accumulated in 16
float lanes that are summed once at the end. The IR is generic: LLVM picks the instructions
for the CPU it compiles for.

Exactness: the integer sums are exact (|w| < 2**12, |x| <= 127, at most 256 products per lane
pair), so the only roundings are the per-block float conversion, scale product, lane
accumulation and the final lane sum, in the order of `scaled_block_dot_reference`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LANES = 16                 # int32 / float32 lanes of the accumulators
GROUP = 2 * LANES          # elements consumed per multiply-add step


def _element_pointer(context, builder, array_type, array_value, index):
    array = context.make_array(array_type)(context, builder, array_value)
    return builder.gep(array.data, [index])


def _load_vector(builder, pointer, element_type, n):
    vector_type = ir.VectorType(element_type, n)
    return builder.load(builder.bitcast(pointer, vector_type.as_pointer()), align=1)


def _indices(values) -> ir.Constant:
    """A constant <n x i32> shuffle mask."""
    values = list(values)
    return ir.Constant(ir.VectorType(ir.IntType(32), len(values)), values)


def _pair_multiply_add(builder, w16, x8):
    """<16 x i32>: lane i = w[2i] * x[2i] + w[2i+1] * x[2i+1] (the vpmaddwd pattern)."""
    wide = ir.VectorType(ir.IntType(32), GROUP)
    products = builder.mul(builder.sext(w16, wide), builder.sext(x8, wide), flags=["nsw"])
    even = builder.shuffle_vector(products, products, _indices(range(0, GROUP, 2)))
    odd = builder.shuffle_vector(products, products, _indices(range(1, GROUP, 2)))
    return builder.add(even, odd, flags=["nsw"])


def _load_scale(builder, pointer, from_half_bytes):
    """float32 from a float32 element, or from two little-endian bytes of an IEEE half."""
    if not from_half_bytes:
        return builder.load(pointer, align=1)
    half = builder.load(builder.bitcast(pointer, ir.HalfType().as_pointer()), align=1)
    return builder.fpext(half, ir.FloatType())


@intrinsic
def scaled_block_dot(typingctx, w, w0, w_stride, dw, dw0, dw_stride, x, x0, dx, n_blocks, groups_per_block):
    """See the module docstring. Offsets and strides count elements of their own array (bytes
    for uint8 scale arrays, which hold IEEE halves)."""
    if w.dtype not in (types.int8, types.int16) or x.dtype != types.int8 or dx.dtype != types.float32:
        return None
    if dw.dtype not in (types.float32, types.uint8):
        return None
    sig = types.float32(w, w0, w_stride, dw, dw0, dw_stride, x, x0, dx, n_blocks, groups_per_block)
    w_bits = w.dtype.bitwidth
    dw_is_half = dw.dtype == types.uint8

    def codegen(context, builder, signature, args):
        w_arr, w0_v, w_stride_v, dw_arr, dw0_v, dw_stride_v, x_arr, x0_v, dx_arr, n_blocks_v, groups_v = args
        arg_types = signature.args
        i64 = ir.IntType(64)
        i32x = ir.VectorType(ir.IntType(32), LANES)
        f32x = ir.VectorType(ir.FloatType(), LANES)
        w_ptr = _element_pointer(context, builder, arg_types[0], w_arr, w0_v)
        dw_ptr = _element_pointer(context, builder, arg_types[3], dw_arr, dw0_v)
        x_ptr = _element_pointer(context, builder, arg_types[6], x_arr, x0_v)
        dx_ptr = _element_pointer(context, builder, arg_types[8], dx_arr, ir.Constant(i64, 0))
        group = ir.Constant(i64, GROUP)

        entry = builder.block
        block_head = builder.append_basic_block("block_head")
        group_loop = builder.append_basic_block("group_loop")
        block_end = builder.append_basic_block("block_end")
        done = builder.append_basic_block("done")
        zero64 = ir.Constant(i64, 0)
        one64 = ir.Constant(i64, 1)
        builder.cbranch(builder.icmp_signed(">", n_blocks_v, zero64), block_head, done)

        # for b in range(n_blocks):
        builder.position_at_end(block_head)
        b = builder.phi(i64, "b")
        facc = builder.phi(f32x, "facc")
        b.add_incoming(zero64, entry)
        facc.add_incoming(ir.Constant(f32x, None), entry)
        w_block = builder.gep(w_ptr, [builder.mul(b, w_stride_v)])
        x_block = builder.gep(x_ptr, [builder.mul(builder.mul(b, groups_v), group)])
        builder.branch(group_loop)

        #     isum = the block's groups of 32 through pair multiply-adds (exact int32)
        builder.position_at_end(group_loop)
        g = builder.phi(i64, "g")
        isum = builder.phi(i32x, "isum")
        g.add_incoming(zero64, block_head)
        isum.add_incoming(ir.Constant(i32x, None), block_head)
        offset = builder.mul(g, group)
        w_vec = _load_vector(builder, builder.gep(w_block, [offset]), ir.IntType(w_bits), GROUP)
        x_vec = _load_vector(builder, builder.gep(x_block, [offset]), ir.IntType(8), GROUP)
        isum_next = builder.add(isum, _pair_multiply_add(builder, w_vec, x_vec), flags=["nsw"])
        g_next = builder.add(g, one64)
        isum.add_incoming(isum_next, group_loop)
        g.add_incoming(g_next, group_loop)
        builder.cbranch(builder.icmp_signed("<", g_next, groups_v), group_loop, block_end)

        #     facc += float(isum) * (dw[b] * dx[b])
        builder.position_at_end(block_end)
        scale_w = _load_scale(builder, builder.gep(dw_ptr, [builder.mul(b, dw_stride_v)]), dw_is_half)
        scale_x = builder.load(builder.gep(dx_ptr, [b]), align=1)
        scale = builder.fmul(scale_w, scale_x)
        scale_vec = builder.insert_element(ir.Constant(f32x, ir.Undefined), scale, ir.Constant(ir.IntType(32), 0))
        scale_vec = builder.shuffle_vector(scale_vec, scale_vec, ir.Constant(i32x, None))
        facc_next = builder.fadd(facc, builder.fmul(builder.sitofp(isum_next, f32x), scale_vec))
        b_next = builder.add(b, one64)
        b.add_incoming(b_next, block_end)
        facc.add_incoming(facc_next, block_end)
        builder.cbranch(builder.icmp_signed("<", b_next, n_blocks_v), block_head, done)

        # the 16 lanes summed by halves (lane i + lane i+8, ...): a fixed order
        builder.position_at_end(done)
        vec = builder.phi(f32x, "lanes")
        vec.add_incoming(ir.Constant(f32x, None), entry)
        vec.add_incoming(facc_next, block_end)
        width = LANES
        while width > 1:
            width //= 2
            low = builder.shuffle_vector(vec, vec, _indices(range(width)))
            high = builder.shuffle_vector(vec, vec, _indices(range(width, 2 * width)))
            vec = builder.fadd(low, high)
        return builder.extract_element(vec, ir.Constant(ir.IntType(32), 0))

    return sig, codegen


def scaled_block_dot_reference(w, w0, w_stride, dw, x, x0, dx, n_blocks, groups_per_block) -> np.float32:
    """NumPy twin of `scaled_block_dot` (dw given as float32 per block), the same integer sums
    and the same float roundings in the same order."""
    block = GROUP * groups_per_block
    acc = np.zeros(LANES, dtype=np.float32)
    for b in range(n_blocks):
        w_start, x_start = w0 + b * w_stride, x0 + b * block
        wv = np.asarray(w[w_start: w_start + block], dtype=np.int64).reshape(-1, LANES, 2)
        xv = np.asarray(x[x_start: x_start + block], dtype=np.int64).reshape(-1, LANES, 2)
        isum = (wv * xv).sum(axis=(0, 2))                  # exact integer lane sums
        scale = np.float32(dw[b]) * np.float32(dx[b])
        acc = acc + isum.astype(np.float32) * scale
    width = LANES
    while width > 1:
        width //= 2
        acc = acc[:width] + acc[width:2 * width]
    return np.float32(acc[0])
