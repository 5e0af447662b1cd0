"""Which packed integer multiply-adds this CPU has, and llvmlite helpers that emit them.

The integer kernels (`blockdot`, the prefill GEMM) are written in LLVM IR through Numba's
`@intrinsic`. Their inner step is the dot product of unsigned bytes with signed bytes summed
in groups of four into int32 lanes, which x86 does in one instruction with AVX512-VNNI
(vpdpbusd) and in two with AVX2 / AVX512BW (vpmaddubsw to int16 pairs, vpmaddwd with ones).
Plain IR of the same sums is the fallback: LLVM compiles it for any CPU, only slower.

    ISA            the form used here: "avx512vnni", "avx512bw", "avx2" or "generic", the best
                   the host has, or what OFFLOAD_STUDIO_CPU_ISA names (read at import; it may
                   only name a form the host has). Changing it drops the package's Numba
                   cache (kernels.cpu._drop_stale_numba_cache), which does not key on it.

Exactness: every form gives the same int32 lanes (lane i = sum over k < 4 of u[4i+k] * s[4i+k])
as long as no int16 pair sum of vpmaddubsw saturates: |u[2j] * s[2j] + u[2j+1] * s[2j+1]| must
stay below 2**15, which holds for u <= 128 and s in [-127, 127] (`sign_transfer` gives that
for int8 weights and the activations the Q8 quantizers write).
"""

from __future__ import annotations

import os

from llvmlite import binding as llvm_binding
from llvmlite import ir

FORMS = ("generic", "avx2", "avx512bw", "avx512vnni")   # weakest first
_ENVIRONMENT_VARIABLE = "OFFLOAD_STUDIO_CPU_ISA"

i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
f32 = ir.FloatType()


def host_forms(features: dict | None = None) -> tuple[str, ...]:
    """The FORMS this CPU can run, weakest first (the 256-bit AVX-512 forms need AVX512VL)."""
    if features is None:
        features = dict(llvm_binding.get_host_cpu_features())
    has = {name for name, on in features.items() if on}
    forms = ["generic"]
    if "avx2" in has:
        forms.append("avx2")
    if {"avx512bw", "avx512vl"} <= has:
        forms.append("avx512bw")
        if "avx512vnni" in has:
            forms.append("avx512vnni")
    return tuple(forms)


def selected_form(requested: str | None, available: tuple[str, ...]) -> str:
    """The form named by the environment override, else the best available one."""
    if not requested:
        return available[-1]
    if requested not in FORMS:
        raise ValueError(f"{_ENVIRONMENT_VARIABLE}={requested!r} is not one of {', '.join(FORMS)}")
    if requested not in available:
        raise ValueError(f"{_ENVIRONMENT_VARIABLE}={requested!r}: this CPU has only {', '.join(available)}")
    return requested


HOST_FORMS = host_forms()
llvm_binding.initialize_native_asmparser()   # for load_half's inline assembly
ISA = selected_form(os.environ.get(_ENVIRONMENT_VARIABLE, "").strip().lower(), HOST_FORMS)


# --- small IR helpers ---------------------------------------------------------------------------

def vector(element_type, n):
    return ir.VectorType(element_type, n)


def indices(values) -> ir.Constant:
    """A constant <n x i32> shuffle mask."""
    values = list(values)
    return ir.Constant(vector(i32, len(values)), values)


def constant_vector(element_type, values) -> ir.Constant:
    values = list(values)
    return ir.Constant(vector(element_type, len(values)), values)


def splat(builder, value, n):
    """<n x T> with every lane `value`."""
    one = builder.insert_element(ir.Constant(vector(value.type, n), ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(vector(i32, n), None))


def element_pointer(context, builder, array_type, array_value, index):
    """Pointer to element `index` of a Numba array (counted in its elements, C order)."""
    array = context.make_array(array_type)(context, builder, array_value)
    return builder.gep(array.data, [index])


def row_pointer(context, builder, array_type, array_value, row):
    """Pointer to the first byte of row `row` of a 2-D Numba array of bytes."""
    array = context.make_array(array_type)(context, builder, array_value)
    stride = builder.extract_value(array.strides, 0)
    return builder.gep(array.data, [builder.mul(row, stride)])


def load_vector(builder, pointer, element_type, n):
    """n elements from `pointer` (any alignment)."""
    return builder.load(builder.bitcast(pointer, vector(element_type, n).as_pointer()), align=1)


def load_scalar(builder, pointer, scalar_type):
    return builder.load(builder.bitcast(pointer, scalar_type.as_pointer()), align=1)


def load_half(builder, pointer, isa: str = ISA):
    """float32 from the IEEE half stored at `pointer`. The x86 forms convert it with vmovd and
    vcvtph2ps in inline assembly: LLVM's own lowering (vpinsrw into a register of its choice)
    makes the conversion wait for whatever that register last held, in the multi-row kernels
    one row's float accumulator, which chained the rows' adds into one (-35 % for Q8_0)."""
    if isa == "generic":
        return builder.fpext(load_scalar(builder, pointer, ir.HalfType()), f32)
    bits = builder.zext(load_scalar(builder, pointer, i16), i32)
    convert = ir.InlineAsm(ir.FunctionType(f32, [i32]), "vmovd $1, $0\n\tvcvtph2ps $0, $0", "=x,r")
    return builder.call(convert, [bits])


def load_half_lanes(builder, pointer, n, isa: str = ISA):
    """<n x float> with every lane the IEEE half at `pointer`. The x86 forms broadcast the half
    and convert all lanes (vpbroadcastw from memory, vcvtph2ps): two instructions that write a
    whole register, where a scalar conversion, multiply and broadcast take five."""
    if isa == "generic":
        return splat(builder, load_half(builder, pointer, isa), n)
    halves = builder.bitcast(splat(builder, load_scalar(builder, pointer, i16), n), vector(ir.HalfType(), n))
    return builder.fpext(halves, vector(f32, n))


def call_intrinsic(builder, name, return_type, args):
    """Call LLVM intrinsic `name`, declared in the current module on first use."""
    module = builder.module
    function = module.globals.get(name)
    if function is None:
        function = ir.Function(module, ir.FunctionType(return_type, [a.type for a in args]), name=name)
    return builder.call(function, args)


def sum_lanes_by_halves(builder, vec):
    """Lane i + lane i + n/2, repeatedly, down to one value: a fixed float summation order."""
    width = vec.type.count
    while width > 1:
        width //= 2
        low = builder.shuffle_vector(vec, vec, indices(range(width)))
        high = builder.shuffle_vector(vec, vec, indices(range(width, 2 * width)))
        vec = builder.fadd(low, high) if isinstance(vec.type.element, ir.FloatType) else builder.add(low, high)
    return builder.extract_element(vec, ir.Constant(i32, 0))


def bits_to_bytes(builder, bits, n):
    """<n x i8> of 0/1: bit j of the iN integer `bits` as byte j (a mask move on AVX-512)."""
    mask = builder.bitcast(bits, vector(ir.IntType(1), n))
    return builder.zext(mask, vector(i8, n))


def sign_transfer(builder, w, x):
    """(|w| as unsigned bytes, x with w's sign): u * s = w * x for each byte, in the operand
    types of vpdpbusd / vpmaddubsw (the u8 x s8 trick of llama.cpp's x86 code)."""
    zero = ir.Constant(w.type, None)
    negative = builder.icmp_signed("<", w, zero)
    magnitude = builder.select(negative, builder.sub(zero, w), w)
    return magnitude, builder.select(negative, builder.sub(zero, x), x)


def dot_s8_s8(builder, acc, w, x, isa: str = ISA):
    """acc + (lane i: sum over k < 4 of w[4i+k] * x[4i+k]) for signed bytes w and x in [-127, 127].
    AVX512-VNNI: (x + 128) . w - 128 * sum(w), two vpdpbusd and a subtract (x + 128 as one xor,
    shared by every weight row dotted with x), exact for any w. Otherwise through sign_transfer."""
    if isa == "avx512vnni":
        bias = ir.Constant(x.type, 0x80)
        shifted = dot_u8_s8(builder, acc, builder.xor(x, bias), w, isa)
        return builder.sub(shifted, dot_u8_s8(builder, ir.Constant(acc.type, None), bias, w, isa))
    return dot_u8_s8(builder, acc, *sign_transfer(builder, w, x), isa)


def lookup16(builder, table: ir.Constant, idx, isa: str = ISA):
    """<n x i8>: table[idx[j]] for a constant <16 x i8> table and byte indices 0..15."""
    n = idx.type.count
    if isa != "generic" and n in (32, 64) and (n == 32 or isa in ("avx512bw", "avx512vnni")):
        repeated = builder.shuffle_vector(table, table, indices(list(range(16)) * (n // 16)))
        name = "llvm.x86.avx2.pshuf.b" if n == 32 else "llvm.x86.avx512.pshuf.b.512"
        return call_intrinsic(builder, name, vector(i8, n), [repeated, idx])
    result = ir.Constant(vector(i8, n), None)
    for j in range(n):
        value = builder.extract_element(table, builder.extract_element(idx, ir.Constant(i32, j)))
        result = builder.insert_element(result, value, ir.Constant(i32, j))
    return result


def pair_sums_u8_s8(builder, u, s, isa: str = ISA):
    """<16 x i16>: u[2j] * s[2j] + u[2j+1] * s[2j+1] for <32 x i8> u (read as unsigned) and s:
    vpmaddubsw, exact while no pair sum saturates (see the module's note)."""
    if isa != "generic":
        return call_intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", vector(i16, 16), [u, s])
    products = builder.mul(builder.zext(u, vector(i16, 32)), builder.sext(s, vector(i16, 32)))
    return _pair_sum(builder, products)


def dot_i16(builder, acc, a, b, isa: str = ISA):
    """acc + (lane i: a[2i] * b[2i] + a[2i+1] * b[2i+1]); acc <8 x i32>, a and b <16 x i16>:
    vpdpwssd with AVX512-VNNI, else vpmaddwd and an add."""
    if isa == "avx512vnni":
        word = vector(i32, 8)
        return call_intrinsic(builder, "llvm.x86.avx512.vpdpwssd.256", word,
                              [acc, builder.bitcast(a, word), builder.bitcast(b, word)])
    if isa in ("avx2", "avx512bw"):
        return builder.add(acc, call_intrinsic(builder, "llvm.x86.avx2.pmadd.wd", vector(i32, 8), [a, b]))
    wide = vector(i32, 16)
    return builder.add(acc, _pair_sum(builder, builder.mul(builder.sext(a, wide), builder.sext(b, wide))))


def _pair_sum(builder, v):
    """Element 2j + element 2j + 1."""
    n = v.type.count
    even = builder.shuffle_vector(v, v, indices(range(0, n, 2)))
    odd = builder.shuffle_vector(v, v, indices(range(1, n, 2)))
    return builder.add(even, odd)


def dot_u8_s8(builder, acc, u, s, isa: str = ISA):
    """acc + (lane i: sum over k < 4 of u[4i+k] * s[4i+k]); acc <n x i32>, u and s <4n x i8>
    (u read as unsigned), n = 8 (ymm) or 16 (zmm; the avx2 form has none)."""
    n = acc.type.count
    if isa == "avx512vnni":
        word = vector(i32, n)
        name = f"llvm.x86.avx512.vpdpbusd.{32 * n}"
        return call_intrinsic(builder, name, word, [acc, builder.bitcast(u, word), builder.bitcast(s, word)])
    if isa in ("avx2", "avx512bw"):
        if n == 8:
            pairs = call_intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", vector(i16, 16), [u, s])
            quads = call_intrinsic(builder, "llvm.x86.avx2.pmadd.wd", vector(i32, 8),
                                   [pairs, ir.Constant(vector(i16, 16), 1)])
        else:
            if isa == "avx2":
                raise ValueError("the avx2 form has no 512-bit dot product")
            pairs = call_intrinsic(builder, "llvm.x86.avx512.pmaddubs.w.512", vector(i16, 32), [u, s])
            quads = call_intrinsic(builder, "llvm.x86.avx512.pmaddw.d.512", vector(i32, 16),
                                   [pairs, ir.Constant(vector(i16, 32), 1)])
        return builder.add(acc, quads)
    wide = vector(i32, 4 * n)
    products = builder.mul(builder.zext(u, wide), builder.sext(s, wide), flags=["nsw"])
    total = acc
    for k in range(4):
        total = builder.add(total, builder.shuffle_vector(products, products, indices(range(k, 4 * n, 4))))
    return total
