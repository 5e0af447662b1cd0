"""A software prefetch of weight rows, for kernels that read a matrix row after row.

The hardware prefetcher follows a stream only within a 4 KiB page and starts each page with a
few misses at full memory latency; a decode step's small products (a Gemma 3 270M layer's are
0.1-1 MB each) run right after the output head or the previous layer has pushed their bytes out
of the cache, so each product begins cold and crosses a page every few rows. Asking for the rows
a few groups ahead keeps their lines in flight across the page boundaries.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.cpu import isa

_LINE_BYTES = 64
_i8_ptr = ir.PointerType(ir.IntType(8))
_i32 = ir.IntType(32)


@intrinsic
def prefetch_rows(typingctx, w, first, n_rows):
    """Ask for the cache lines of rows first .. first + n_rows of a C-ordered uint8 matrix (a
    read hint into every cache level: no fault, no effect on results)."""
    if not (isinstance(w, types.Array) and w.ndim == 2 and w.dtype == types.uint8):
        return None
    if not (isinstance(first, types.Integer) and isinstance(n_rows, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        w_arr, row, count = args
        w_type = signature.args[0]
        row = context.cast(builder, row, signature.args[1], types.intp)
        start = builder.bitcast(isa.row_pointer(context, builder, w_type, w_arr, row), _i8_ptr)
        row_bytes = cgutils.create_struct_proxy(w_type)(context, builder, value=w_arr).strides
        row_bytes = builder.extract_value(row_bytes, 0)
        n_bytes = builder.mul(row_bytes, context.cast(builder, count, signature.args[2], types.intp))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_i8_ptr, _i32, _i32, _i32]),
                                            "llvm.prefetch.p0")
        with cgutils.for_range_slice(builder, ir.Constant(n_bytes.type, 0), n_bytes,
                                     ir.Constant(n_bytes.type, _LINE_BYTES)) as (offset, _):
            # read, locality 3 (keep in all levels), data cache
            builder.call(fn, [builder.gep(start, [offset]), ir.Constant(_i32, 0), ir.Constant(_i32, 3),
                              ir.Constant(_i32, 1)])
        return context.get_dummy_value()

    return types.void(w, first, n_rows), codegen
