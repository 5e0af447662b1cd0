"""The kernels a CUDA-graph decode step needs beyond the eager path's: experts picked on the device
(bit-identical to one matvec per expert), their weighted sum in the engine's order (bit-identical
to the host-routed sum of engine.arch.layers.moe_feed_forward), scaling and soft-capping."""
from __future__ import annotations

import numpy as np
import pytest

from engine.arch import layers
from kernels.cuda import ops

N_EXPERT, N_ROWS = 6, 70


def expert_table(make_weight, type_name: str, n_cols: int) -> np.ndarray:
    return np.stack([make_weight(type_name, N_ROWS, n_cols) for _ in range(N_EXPERT)])


@pytest.mark.parametrize("type_name, exact", [("Q4_K", False), ("Q4_K", True), ("Q8_0", False), ("F16", False)])
@pytest.mark.parametrize("per_slot", [False, True])
def test_expert_matvec_equals_one_matvec_per_expert(rt, rng, make_weight, type_name, exact, per_slot):
    n_cols = 256
    table = expert_table(make_weight, type_name, n_cols)
    ids = np.array([4, 1, 5], np.int64)
    x = rng.standard_normal((len(ids) if per_slot else 1, n_cols)).astype(np.float32)
    w_dev = rt.upload(table)
    got = rt.download(ops.expert_matvec(rt, rt.upload(x), w_dev, rt.upload(ids), type_name, n_cols, exact=exact))
    for slot, expert in enumerate(ids):
        row = x[slot:slot + 1] if per_slot else x
        one = rt.download(ops.matvec(rt, rt.upload(row), rt.upload(table[expert]), type_name, n_cols, exact=exact))
        np.testing.assert_array_equal(got[slot:slot + 1], one)


def test_expert_matvec_refuses_bad_arguments(emu_rt, make_weight):
    table = emu_rt.upload(expert_table(make_weight, "Q8_0", 64))
    x = emu_rt.upload(np.zeros((2, 64), np.float32))
    with pytest.raises(ops.KernelArgumentError, match="x must be"):
        ops.expert_matvec(emu_rt, x, table, emu_rt.upload(np.array([0, 1, 2], np.int64)), "Q8_0", 64)
    with pytest.raises(ops.KernelArgumentError, match="ids must be"):
        ops.expert_matvec(emu_rt, x, table, emu_rt.upload(np.zeros((1, 2), np.int64)), "Q8_0", 64)


def test_moe_combine_sums_like_the_host_routed_path(rt, rng):
    """moe_feed_forward's sum: zeros, then + y * w per expert in ascending expert id, in float32."""
    n_tokens, k, n = 3, 4, 300
    ids = np.stack([rng.permutation(16)[:k] for _ in range(n_tokens)]).astype(np.int64)
    weights = rng.random((n_tokens, k)).astype(np.float32)
    y = rng.standard_normal((n_tokens * k, n)).astype(np.float32)
    got = rt.download(ops.moe_combine(rt, rt.upload(y), rt.upload(ids), rt.upload(weights)))
    expected = np.zeros((n_tokens, n), np.float32)
    order = np.argsort(ids, axis=-1, kind="stable")
    for j in range(k):
        slot = order[:, j]
        rows = y[np.arange(n_tokens) * k + slot]
        expected = expected + rows * np.take_along_axis(weights, slot[:, None], axis=-1)
    np.testing.assert_array_equal(got, expected)


def test_scale_and_softcap(rt, rng):
    x = rng.standard_normal((2, 333)).astype(np.float32) * 40
    np.testing.assert_array_equal(rt.download(ops.scale(rt, rt.upload(x), 0.125)), x * np.float32(0.125))
    np.testing.assert_allclose(rt.download(ops.softcap(rt, rt.upload(x), 30.0)), layers.softcap(x, 30.0),
                               rtol=2e-6, atol=2e-6)
    with pytest.raises(ops.KernelArgumentError, match="positive"):
        ops.softcap(rt, rt.upload(x), 0.0)


def test_rotate_blocks_is_the_kv_caches_hadamard_rotation(rt, rng):
    from engine.arch.kv_rotation import hadamard, rotate_heads

    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    for block in (64, 128):
        got = rt.download(ops.rotate_blocks(rt, rt.upload(x), rt.upload(hadamard(block))))
        np.testing.assert_allclose(got, rotate_heads(x, block), rtol=1e-5, atol=1e-5)


def test_round_q8_1_rounds_like_the_eager_query_rounding(rt, rng):
    from engine.backends.cuda import q8_1_rounded

    x = rng.standard_normal((3, 2, 64)).astype(np.float32) * 5
    x[0, 0, :32] = 0.0                                      # an all-zero block stays zero
    got = rt.download(ops.round_q8_1(rt, rt.upload(x)))
    np.testing.assert_allclose(got, q8_1_rounded(np, x), rtol=1e-6, atol=0)
    assert np.array_equal(got[0, 0, :32], np.zeros(32, np.float32))
