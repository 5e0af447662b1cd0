"""llama.cpp's Hadamard rotation of quantized KV caches."""
import numpy as np
import pytest

from engine.arch.kv_rotation import KVRotation, hadamard, key_block, rotate_heads


@pytest.mark.parametrize("n", [64, 128, 256])
def test_hadamard_is_orthonormal_and_its_own_inverse(n):
    h = hadamard(n)
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(h, h.T)
    assert abs(h[0, 0] - 1 / np.sqrt(n)) < 1e-7 and (np.abs(h) == h[0, 0]).all()


def test_block_sizes_follow_llama_cpp():
    assert [key_block(d) for d in (64, 128, 192, 256, 576)] == [64, 128, 64, 256, 64]
    assert KVRotation.for_cache(128, 128, "q8_0", "q4_0") == KVRotation(128, 64)
    assert KVRotation.for_cache(128, 128, "q8_0", "f16") == KVRotation(128, 0)
    assert not KVRotation.for_cache(128, 128, "f16", "f16")
    assert not KVRotation.for_cache(80, 80, "q8_0", "q8_0")          # head size not a multiple of 64
    assert not KVRotation.for_cache(128, 128, "q8_0", "q8_0", enabled=False)


def test_rotation_leaves_exact_attention_unchanged():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((5, 2, 128)).astype(np.float32) for _ in range(3))
    rotation = KVRotation.for_cache(128, 128, "q4_0", "q4_0")
    qr, kr = rotation.queries_keys(q, k)
    np.testing.assert_allclose(np.einsum("thd,shd->hts", qr, kr), np.einsum("thd,shd->hts", q, k), atol=1e-4)
    weights = rng.random((5, 5)).astype(np.float32)
    out = np.einsum("ts,shd->thd", weights, rotation.values(v)).reshape(5, -1)
    np.testing.assert_allclose(rotation.output(out, 2), np.einsum("ts,shd->thd", weights, v).reshape(5, -1), atol=1e-4)


def test_rotation_works_per_block_of_each_head():
    x = np.zeros((1, 1, 128), np.float32)
    x[0, 0, 64] = 1.0                           # the second block only
    y = rotate_heads(x, 64)
    assert not y[..., :64].any() and np.allclose(np.abs(y[..., 64:]), 1 / 8)
