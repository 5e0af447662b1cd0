"""The CUDA emulation itself: each feature against NumPy, and the bugs it must catch."""
from __future__ import annotations

import numpy as np
import pytest

from kernels.cuda.runtime import EmulatedRuntime, KernelLaunchError

SRC = "emu/selftest.cu"


def test_block_sum_through_shared_memory_and_barriers(emu_rt, rng):
    x = rng.standard_normal((3, 256)).astype(np.float32)
    out = emu_rt.alloc(x.shape, np.float32)
    emu_rt.launch(SRC, "block_sum_ok", 3, 256, (emu_rt.upload(x), out))
    np.testing.assert_allclose(emu_rt.download(out), np.repeat(x.sum(1, keepdims=True), 256, 1), rtol=1e-5, atol=1e-5)


def test_warp_shuffles_and_ballot(emu_rt, rng):
    x = rng.standard_normal(64).astype(np.float32)
    out = emu_rt.alloc((64, 4), np.float32)
    emu_rt.launch(SRC, "shuffles", 1, 64, (emu_rt.upload(x), out))
    got = emu_rt.download(out)
    warps = x.reshape(2, 32)
    lanes = np.arange(32)
    down = np.where(lanes + 3 < 32, np.roll(warps, -3, axis=1), warps)
    np.testing.assert_allclose(got[:, 0], np.repeat(warps.sum(1), 32), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, 1], down.ravel())
    np.testing.assert_array_equal(got[:, 2], np.repeat(warps[:, 5], 32))
    np.testing.assert_array_equal(got[:, 3], np.repeat((warps > 0).sum(1), 32))


def test_atomics_from_many_blocks(emu_rt, rng):
    values = rng.integers(0, 1000, 8 * 96).astype(np.int32)
    counter, biggest = emu_rt.zeros(1, np.int32), emu_rt.zeros(1, np.uint32)
    emu_rt.launch(SRC, "atomics", 8, 96, (emu_rt.upload(values), counter, biggest))
    assert emu_rt.download(counter)[0] == values.sum()
    assert emu_rt.download(biggest)[0] == values.max()


def test_dp4a_half_and_bfloat16(emu_rt, rng):
    n = 300
    a = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    b = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    x = np.concatenate([rng.standard_normal(n - 12) * 100,
                        [0.0, -0.0, 1e-8, 6e-5, 65504.0, 70000.0, np.inf, -np.inf, 2.0**-24, 3 * 2.0**-25,
                         1 + 2.0**-11, 1 + 3 * 2.0**-11]]).astype(np.float32)
    outs = [emu_rt.alloc(n, t) for t in (np.int32, np.uint16, np.float32, np.float32)]
    emu_rt.launch(SRC, "intrinsics", 3, 128, (emu_rt.upload(a), emu_rt.upload(b), emu_rt.upload(x), *outs, np.int32(n)))
    dot, as_half, half_back, bf16_back = (emu_rt.download(o) for o in outs)
    expected_dot = (a.view(np.int8).reshape(n, 4).astype(np.int64) * b.view(np.int8).reshape(n, 4)).sum(1) + np.arange(n)
    np.testing.assert_array_equal(dot, expected_dot)
    with np.errstate(over="ignore"):        # 70000 rounds to inf, as on the GPU
        as_f16 = x.astype(np.float16)
    np.testing.assert_array_equal(as_half, as_f16.view(np.uint16))
    np.testing.assert_array_equal(half_back, as_f16.astype(np.float32))
    np.testing.assert_array_equal(bf16_back, (x.view(np.uint32) & 0xFFFF0000).view(np.float32))


def test_dynamic_shared_memory_and_2d_blocks(emu_rt, rng):
    x = rng.standard_normal((4 * 8, 16)).astype(np.float32)
    out = emu_rt.alloc(x.shape, np.float32)
    emu_rt.launch(SRC, "reverse_rows_2d", 4, (16, 8), (emu_rt.upload(x), out), shared_bytes=16 * 8 * 4)
    np.testing.assert_array_equal(emu_rt.download(out), x[:, ::-1])


def test_template_kernel_through_name_expressions(emu_rt, rng):
    x = rng.standard_normal(50).astype(np.float32)
    out = emu_rt.alloc(50, np.float32)
    emu_rt.launch(SRC, "scale_by<3>", 1, 64, (emu_rt.upload(x), out, np.int32(50)), name_expressions=("scale_by<3>",))
    np.testing.assert_array_equal(emu_rt.download(out), 3 * x)


def test_a_missing_barrier_is_caught_by_the_shuffled_thread_order(rng):
    x = rng.standard_normal(128).astype(np.float32)
    expected = np.roll(x, -1)
    for kernel, should_match in (("neighbour_synced", True), ("neighbour_racy", False)):
        for seed in range(3):
            rt = EmulatedRuntime(debug=True, seed=seed)
            out = rt.alloc(128, np.float32)
            rt.launch(SRC, kernel, 1, 128, (rt.upload(x), out))
            assert np.array_equal(rt.download(out), expected) == should_match, (kernel, seed)


def test_an_out_of_bounds_read_is_caught(emu_rt):
    x, out = emu_rt.upload(np.zeros(256, np.float32)), emu_rt.alloc(256, np.float32)
    with pytest.raises(KernelLaunchError, match="0 bytes past the end of pointer argument 0"):
        emu_rt.launch(SRC, "copy_off_by_one", 2, 128, (x, out, np.int32(256)))
    # the process survives and the runtime still works
    emu_rt.launch(SRC, "neighbour_synced", 1, 128, (x, out))


def test_an_out_of_bounds_write_is_caught(emu_rt):
    out = emu_rt.alloc(256, np.float32)
    with pytest.raises(KernelLaunchError, match="out-of-bounds"):
        emu_rt.launch(SRC, "write_past_end", 3, 128, (out, np.int32(256)))


def test_an_odd_sized_buffer_catches_a_write_into_its_slack_by_canary(emu_rt):
    out = emu_rt.alloc(250, np.float32)      # 1000 bytes: the 8 bytes to the guard page hold a canary
    with pytest.raises(KernelLaunchError, match="wrote outside a buffer of 1000 bytes"):
        emu_rt.launch(SRC, "write_past_end", 2, 128, (out, np.int32(250)))


@pytest.mark.parametrize("kernel, args", [("divergent_barrier", ()), ("early_return_then_barrier", (np.int32(100),))])
def test_divergent_barriers_are_caught(emu_rt, kernel, args):
    x, out = emu_rt.upload(np.zeros(128, np.float32)), emu_rt.alloc(128, np.float32)
    with pytest.raises(KernelLaunchError, match="divergent barrier"):
        emu_rt.launch(SRC, kernel, 1, 128, ((out,) if kernel == "divergent_barrier" else (x, out)) + args)


def test_argument_sizes_are_checked_against_the_kernel_signature(emu_rt):
    out = emu_rt.alloc(256, np.float32)
    with pytest.raises(KernelLaunchError, match="argument 1 is 4 bytes in the kernel, 8 at the launch"):
        emu_rt.launch(SRC, "write_past_end", 1, 128, (out, np.int64(256)))
    with pytest.raises(TypeError, match="NumPy scalar"):
        emu_rt.launch(SRC, "write_past_end", 1, 128, (out, 256))


def test_fresh_device_memory_is_poisoned_not_zeroed(emu_rt):
    assert np.isnan(emu_rt.download(emu_rt.alloc(16, np.float32))).all()


def test_unwritten_shared_memory_reads_as_nan(emu_rt):
    out = emu_rt.zeros(64, np.float32)
    emu_rt.launch(SRC, "read_unwritten_shared", 1, 64, (out,))
    assert np.isnan(emu_rt.download(out)).all()
