"""The host-feature selection and the IR helpers of kernels.cpu.isa, in every form this CPU runs.

Each form's u8 x s8 dot product must give the exact int32 lane sums of groups of four, and the
table lookup the table's entries, with the awkward values at the ends of their ranges.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit, types
from numba.extending import intrinsic

from kernels.cpu import isa
from kernels.cpu.isa import i8, i32, i64, ir

ZMM_FORMS = [form for form in isa.HOST_FORMS if form != "avx2"]


def _store(builder, value, pointer):
    builder.store(value, builder.bitcast(pointer, value.type.as_pointer()), align=1)


def _pointers(context, builder, signature, args):
    zero = ir.Constant(i64, 0)
    return [isa.element_pointer(context, builder, t, a, zero) for t, a in zip(signature.args, args)]


def _signed_dot(form, n):
    """f(w int8 (4n,), x int8 (4n,), out int32 (n,)): the lanes of w . x through sign_transfer."""
    @intrinsic
    def emit(typingctx, w, x, out):
        def codegen(context, builder, signature, args):
            wp, xp, op = _pointers(context, builder, signature, args)
            u, s = isa.sign_transfer(builder, isa.load_vector(builder, wp, i8, 4 * n),
                                     isa.load_vector(builder, xp, i8, 4 * n))
            _store(builder, isa.dot_u8_s8(builder, ir.Constant(isa.vector(i32, n), None), u, s, form), op)
            return context.get_dummy_value()
        return types.void(w, x, out), codegen

    return njit(lambda w, x, out: emit(w, x, out))


def _vector_op(form, emit_op, in_types, out_type):
    """f(a, b, out): out = emit_op(builder, a, b, form) for vectors a, b loaded as in_types."""
    @intrinsic
    def emit(typingctx, a, b, out):
        def codegen(context, builder, signature, args):
            ap, bp, op = _pointers(context, builder, signature, args)
            a_vec, b_vec = (isa.load_vector(builder, p, t.element, t.count) for p, t in zip((ap, bp), in_types))
            _store(builder, emit_op(builder, a_vec, b_vec, form), op)
            return context.get_dummy_value()
        return types.void(a, b, out), codegen

    return njit(lambda a, b, out: emit(a, b, out))


def _lookup(form, n):
    """f(idx uint8 (n,), out int8 (n,)) with the table 16 * k - 128 + k."""
    table = isa.constant_vector(i8, [16 * k - 128 + k for k in range(16)])

    @intrinsic
    def emit(typingctx, idx, out):
        def codegen(context, builder, signature, args):
            ip, op = _pointers(context, builder, signature, args)
            _store(builder, isa.lookup16(builder, table, isa.load_vector(builder, ip, i8, n), form), op)
            return context.get_dummy_value()
        return types.void(idx, out), codegen

    return njit(lambda idx, out: emit(idx, out))


@pytest.mark.parametrize("form,n", [(f, 8) for f in isa.HOST_FORMS] + [(f, 16) for f in ZMM_FORMS])
def test_dot_u8_s8_lanes_are_exact(rng, form, n):
    w = rng.integers(-128, 128, 4 * n).astype(np.int8)
    x = rng.integers(-127, 128, 4 * n).astype(np.int8)
    w[:8], x[:8] = -128, -127                 # the largest pair sums vpmaddubsw must hold
    w[8:12], x[8:12] = 127, 127
    out = np.zeros(n, dtype=np.int32)
    _signed_dot(form, n)(w, x, out)
    np.testing.assert_array_equal(out, (w.astype(np.int64) * x).reshape(n, 4).sum(axis=1))


@pytest.mark.parametrize("form", isa.HOST_FORMS)
def test_pair_sums_u8_s8_are_exact(rng, form):
    u = rng.integers(0, 129, 32).astype(np.uint8)
    s = rng.integers(-127, 128, 32).astype(np.int8)
    u[:4], s[:4] = 128, np.array([-127, -127, 127, 127])    # the largest pair sums that must hold
    out = np.zeros(16, dtype=np.int16)
    pair_sums = _vector_op(form, isa.pair_sums_u8_s8, (isa.vector(i8, 32),) * 2, None)
    pair_sums(u, s, out)
    np.testing.assert_array_equal(out, (u.astype(np.int64) * s).reshape(16, 2).sum(axis=1))


@pytest.mark.parametrize("form", isa.HOST_FORMS)
def test_dot_i16_lanes_are_exact(rng, form):
    a = rng.integers(-2**15, 2**15, 16).astype(np.int16)
    b = rng.integers(-2**15, 2**15, 16).astype(np.int16)
    a[:2], b[:2] = -2**15, -2**15 + 1
    out = np.zeros(8, dtype=np.int32)

    def plus_seven(builder, a_vec, b_vec, form):
        return isa.dot_i16(builder, ir.Constant(isa.vector(i32, 8), 7), a_vec, b_vec, form)

    _vector_op(form, plus_seven, (isa.vector(isa.i16, 16),) * 2, None)(a, b, out)
    np.testing.assert_array_equal(out, 7 + (a.astype(np.int64) * b).reshape(8, 2).sum(axis=1))


@pytest.mark.parametrize("form", isa.HOST_FORMS)
def test_dot_s8_s8_lanes_are_exact(rng, form):
    w = rng.integers(-128, 128, 32).astype(np.int8)
    x = rng.integers(-127, 128, 32).astype(np.int8)
    w[:8], x[:8] = -128, np.array([-127, 127] * 4)
    w[8:12], x[8:12] = 127, -127
    out = np.zeros(8, dtype=np.int32)

    def plus_three(builder, w_vec, x_vec, form):
        return isa.dot_s8_s8(builder, ir.Constant(isa.vector(i32, 8), 3), w_vec, x_vec, form)

    _vector_op(form, plus_three, (isa.vector(i8, 32),) * 2, None)(w, x, out)
    np.testing.assert_array_equal(out, 3 + (w.astype(np.int64) * x).reshape(8, 4).sum(axis=1))


@pytest.mark.parametrize("form,n", [(f, 32) for f in isa.HOST_FORMS] + [(f, 64) for f in ZMM_FORMS])
def test_lookup16(rng, form, n):
    idx = rng.integers(0, 16, n).astype(np.uint8)
    out = np.zeros(n, dtype=np.int8)
    _lookup(form, n)(idx, out)
    expected = (16 * idx.astype(np.int64) - 128 + idx).astype(np.int8)
    np.testing.assert_array_equal(out, expected)


def _half_lanes(form, n):
    """f(h uint16 (1,), out float32 (n,)): out = the half with bits h[0], in every lane."""
    @intrinsic
    def emit(typingctx, h, out):
        def codegen(context, builder, signature, args):
            hp, op = _pointers(context, builder, signature, args)
            _store(builder, isa.load_half_lanes(builder, hp, n, form), op)
            return context.get_dummy_value()
        return types.void(h, out), codegen

    return njit(lambda h, out: emit(h, out))


@pytest.mark.parametrize("form", isa.HOST_FORMS)
def test_load_half_lanes_converts_every_half(form):
    halves = np.array([1.0, -0.0, 65504.0, -2.0 ** -24, 6.1e-5, 0.3333, np.inf], dtype=np.float16)
    convert = _half_lanes(form, 8)
    for value in halves:
        out = np.zeros(8, dtype=np.float32)
        convert(value.reshape(1).view(np.uint16), out)
        np.testing.assert_array_equal(out.view(np.uint32), np.full(8, np.float32(value)).view(np.uint32))


def test_forms_follow_the_host_features():
    assert isa.host_forms({"avx2": True}) == ("generic", "avx2")
    assert isa.host_forms({"avx2": True, "avx512bw": True, "avx512vnni": True}) == ("generic", "avx2")
    assert isa.host_forms({"avx2": True, "avx512bw": True, "avx512vl": True, "avx512vnni": True})[-1] == "avx512vnni"
    assert isa.selected_form("", ("generic", "avx2")) == "avx2"
    assert isa.selected_form("generic", ("generic", "avx2")) == "generic"
    with pytest.raises(ValueError, match="this CPU has only"):
        isa.selected_form("avx512vnni", ("generic", "avx2"))
    with pytest.raises(ValueError, match="is not one of"):
        isa.selected_form("sse9", ("generic",))


def test_environment_forces_the_generic_form():
    environment = dict(os.environ, OFFLOAD_STUDIO_CPU_ISA="generic")
    result = subprocess.run([sys.executable, "-c", "from kernels.cpu import isa; print(isa.ISA)"],
                            env=environment, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "generic"
