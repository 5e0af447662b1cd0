"""The register block of the prefill integer GEMM (`qgemm`), written in LLVM IR.

    tile_block_<family>(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)

computes, for the ROWS = VECTORS * LANES weight rows of one repacked tile and the TOKENS
activation rows t0 .. t0 + TOKENS - 1 (clamped to the last row of xq), over n_blocks blocks:

    acc = 0.0
    for each block b:
        I = sum over sub-blocks j of  sc_j * (D_j - xsub[t, j])     (exact int32)
        acc = acc + float(I) * (d_w * dx[t, b])
        integer mins:  M = sum_j mn_j * xsub[t, j];  acc = acc + float(M) * (dm_w * dx[t, b])
        float mins:    acc = acc + dm_w * sx[t, b]
    dest[dest_row0 + i, dest_col0 + row] = acc

where D_j is the integer dot product of the weight's unsigned bytes (its values plus a fixed
offset) with the activation's signed bytes over sub-block j, and xsub holds, per token and
sub-block, the offset times the activations' integer sum (types with an offset) or that sum
itself (the integer mins). Each weight row is one lane: a tile stores, for every group of 4
columns, the 4 bytes of all its rows side by side, so one packed multiply-add (vpdpbusd with
AVX512-VNNI, `isa.dot_u8_s8`) advances LANES rows by 4 columns against one broadcast 4-byte word
of one token, and a block's integer sum ends in its lane without any horizontal reduction.
VECTORS x TOKENS accumulators stay in registers: every weight vector loaded serves TOKENS
tokens, every activation word VECTORS * LANES rows.

The float steps are separate multiplies and adds in the order written (no fusion), so
`qgemm`'s NumPy reference reproduces them bit for bit.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels.cpu import isa
from kernels.cpu.isa import f32, i32, i64, vector

LANES = 8 if isa.ISA == "avx2" else 16   # rows per weight vector: the form's int32 lanes
# vpmaddubsw's int16 pair sums saturate past 2**15: with those forms, weights whose unsigned
# bytes exceed 128 (offset 128: Q8_0, IQ4_NL, IQ4_XS) take the generic form
SATURATING_FORMS = ("avx2", "avx512bw")
VECTORS = 3                              # weight vectors per register block (see qgemm)
ROWS = VECTORS * LANES                   # rows of a tile
TOKENS = 4                               # tokens per register block


def _flat_pointer(context, builder, array_type, array_value, row, col):
    """Pointer to element (row, col) of a C-contiguous 2-D Numba array."""
    array = context.make_array(array_type)(context, builder, array_value)
    n_cols = builder.extract_value(array.shape, 1)
    return builder.gep(array.data, [builder.add(builder.mul(row, n_cols), col)])


def _data_pointer(context, builder, array_type, array_value, index):
    return isa.element_pointer(context, builder, array_type, array_value, index)


def _broadcast_word(builder, pointer):
    """The 4 bytes at `pointer` repeated in every int32 lane, as <4 * LANES x i8>."""
    word = isa.load_scalar(builder, pointer, i32)
    return builder.bitcast(isa.splat(builder, word, LANES), vector(ir.IntType(8), 4 * LANES))


class _Loop:
    """A counted IR loop `for index in range(count)` whose body updates a list of values."""

    def __init__(self, builder, count, initial, name):
        self.builder = builder
        self.count = count
        self.entry = builder.block
        self.body = builder.append_basic_block(f"{name}_body")
        self.exit = builder.append_basic_block(f"{name}_exit")
        builder.branch(self.body)
        builder.position_at_end(self.body)
        self.index = builder.phi(i64, f"{name}_index")
        self.index.add_incoming(ir.Constant(i64, 0), self.entry)
        self.values = []
        for k, value in enumerate(initial):
            phi = builder.phi(value.type, f"{name}_value{k}")
            phi.add_incoming(value, self.entry)
            self.values.append(phi)

    def close(self, updated):
        builder = self.builder
        latch = builder.block
        following = builder.add(self.index, ir.Constant(i64, 1))
        self.index.add_incoming(following, latch)
        for phi, value in zip(self.values, updated):
            phi.add_incoming(value, latch)
        builder.cbranch(builder.icmp_signed("<", following, self.count), self.body, self.exit)
        builder.position_at_end(self.exit)
        return updated


def make_tile_block(sub_block: int, n_sub: int, has_offset: bool, has_scales: bool, min_kind: int, form: str):
    """The register-block intrinsic of one family of types: sub-blocks of `sub_block` elements,
    `n_sub` per block, a weight offset (xsub subtracted), integer sub-block scales, and mins
    (0 none, 1 integer per sub-block with a float dm per block, 2 a float dm per block times
    the activations' sx); `form` is the `isa` form of its multiply-adds."""
    steps = sub_block // 4

    @intrinsic
    def tile_block(typingctx, tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0):
        sig = types.void(tq, tsc, tmn, td, tdm, xq, xsub, dx, sx, t0, n_blocks, dest, dest_row0, dest_col0)

        def codegen(context, builder, signature, args):
            (tq_v, tsc_v, tmn_v, td_v, tdm_v, xq_v, xsub_v, dx_v, sx_v, t0_v, n_blocks_v, dest_v, dest_row0_v,
             dest_col0_v) = args
            at = signature.args
            ivec, fvec = vector(i32, LANES), vector(f32, LANES)
            zero = ir.Constant(i64, 0)
            last_token = builder.sub(builder.extract_value(
                context.make_array(at[5])(context, builder, xq_v).shape, 0), ir.Constant(i64, 1))
            tokens = []
            for i in range(TOKENS):
                t = builder.add(t0_v, ir.Constant(i64, i))
                tokens.append(builder.select(builder.icmp_signed("<", t, last_token), t, last_token))
            x_rows = [_flat_pointer(context, builder, at[5], xq_v, t, zero) for t in tokens]
            tq_ptr = builder.bitcast(_data_pointer(context, builder, at[0], tq_v, zero), ir.IntType(8).as_pointer())
            tsc_ptr = _data_pointer(context, builder, at[1], tsc_v, zero)
            tmn_ptr = _data_pointer(context, builder, at[2], tmn_v, zero)
            td_ptr = _data_pointer(context, builder, at[3], td_v, zero)
            tdm_ptr = _data_pointer(context, builder, at[4], tdm_v, zero)
            n_acc = VECTORS * TOKENS
            facc0 = [ir.Constant(fvec, None)] * n_acc

            block_loop = _Loop(builder, n_blocks_v, facc0, "block")
            b = block_loop.index
            izero = [ir.Constant(ivec, None)] * n_acc
            sub_loop = _Loop(builder, ir.Constant(i64, n_sub), izero + izero, "sub")
            j = sub_loop.index
            sub = builder.add(builder.mul(b, ir.Constant(i64, n_sub)), j)     # sub-block of the row
            dots = list(izero)
            for s in range(steps):
                k4 = builder.add(builder.mul(sub, ir.Constant(i64, steps)), ir.Constant(i64, s))
                base = builder.mul(k4, ir.Constant(i64, ROWS * 4))
                weights = [isa.load_vector(builder, builder.gep(tq_ptr, [builder.add(base, ir.Constant(
                    i64, v * LANES * 4))]), ir.IntType(8), 4 * LANES) for v in range(VECTORS)]
                for i in range(TOKENS):
                    word = _broadcast_word(builder, builder.gep(x_rows[i], [builder.mul(k4, ir.Constant(i64, 4))]))
                    for v in range(VECTORS):
                        a = i * VECTORS + v
                        dots[a] = isa.dot_u8_s8(builder, dots[a], weights[v], word, form)
            sums, min_sums = sub_loop.values[:n_acc], sub_loop.values[n_acc:]
            new_sums, new_min_sums = list(sums), list(min_sums)
            xs = [isa.splat(builder, isa.load_scalar(builder, _flat_pointer(
                context, builder, at[6], xsub_v, t, sub), i32), LANES) for t in tokens] if has_offset or min_kind == 1 else None
            scale_at = builder.mul(sub, ir.Constant(i64, ROWS))
            for v in range(VECTORS):
                at_v = builder.add(scale_at, ir.Constant(i64, v * LANES))
                scales = isa.load_vector(builder, builder.gep(tsc_ptr, [at_v]), i32, LANES) if has_scales else None
                mins = isa.load_vector(builder, builder.gep(tmn_ptr, [at_v]), i32, LANES) if min_kind == 1 else None
                for i in range(TOKENS):
                    a = i * VECTORS + v
                    dot = builder.sub(dots[a], xs[i]) if has_offset else dots[a]
                    new_sums[a] = builder.add(sums[a], builder.mul(scales, dot) if has_scales else dot)
                    if mins is not None:
                        new_min_sums[a] = builder.add(min_sums[a], builder.mul(mins, xs[i]))
            sub_loop.close(new_sums + new_min_sums)   # the updated values are the sums at the exit

            facc = list(block_loop.values)
            d_at = builder.mul(b, ir.Constant(i64, ROWS))
            x_scales = [builder.load(_flat_pointer(context, builder, at[7], dx_v, t, b)) for t in tokens]
            x_min_scales = ([builder.load(_flat_pointer(context, builder, at[8], sx_v, t, b)) for t in tokens]
                            if min_kind == 2 else None)
            for v in range(VECTORS):
                at_v = builder.add(d_at, ir.Constant(i64, v * LANES))
                d_w = isa.load_vector(builder, builder.gep(td_ptr, [at_v]), f32, LANES)
                dm_w = isa.load_vector(builder, builder.gep(tdm_ptr, [at_v]), f32, LANES) if min_kind else None
                for i in range(TOKENS):
                    a = i * VECTORS + v
                    dx_i = isa.splat(builder, x_scales[i], LANES)
                    acc = builder.fadd(facc[a], builder.fmul(builder.sitofp(new_sums[a], fvec),
                                                             builder.fmul(d_w, dx_i)))
                    if min_kind == 1:
                        acc = builder.fadd(acc, builder.fmul(builder.sitofp(new_min_sums[a], fvec),
                                                             builder.fmul(dm_w, dx_i)))
                    elif min_kind == 2:
                        acc = builder.fadd(acc, builder.fmul(dm_w, isa.splat(builder, x_min_scales[i], LANES)))
                    facc[a] = acc
            block_loop.close(facc)                  # facc: the sums at the exit

            for i in range(TOKENS):
                row = builder.add(dest_row0_v, ir.Constant(i64, i))
                for v in range(VECTORS):
                    col = builder.add(dest_col0_v, ir.Constant(i64, v * LANES))
                    pointer = _flat_pointer(context, builder, at[11], dest_v, row, col)
                    builder.store(facc[i * VECTORS + v], builder.bitcast(pointer, fvec.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return tile_block
