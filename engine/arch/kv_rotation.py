"""llama.cpp's Hadamard rotation of a quantized KV cache (llama-kv-cache.cpp attn_rot_k/attn_rot_v).

With a quantized K cache and a key head size that is a multiple of 64, llama.cpp multiplies
every query and key head by a normalised Walsh-Hadamard matrix (in blocks of the largest power
of two >= 64 that divides the head size) before the keys are quantized into the cache; with a
quantized V cache it does the same to the values in blocks of 64 and multiplies the attention
output by the same matrix again to undo it (H is symmetric and H H = I). In exact arithmetic
nothing changes (q.k and the weighted sum of values are rotation invariant); what changes is
what the block quantizer loses: the rotation spreads an outlier over its block, so the cached
values quantize with less error, and llama.cpp's logits with a q4_0 or q8_0 cache are those of
the rotated cache. `LLAMA_ATTN_ROT_DISABLE=1` switches it off in llama.cpp; `enabled=False` here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

import array_api_compat
from array_api_compat import array_namespace

MIN_BLOCK = 64


@lru_cache(maxsize=None)
def hadamard(n: int) -> np.ndarray:
    """The n x n orthonormal Walsh-Hadamard matrix (ggml_gen_hadamard's Sylvester construction)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power of two, not {n}")
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def key_block(head_k: int) -> int:
    """The largest power of two >= 64 that divides the key head size (llama_kv_cache::build_input_k_rot)."""
    block = MIN_BLOCK
    while head_k % (2 * block) == 0:
        block *= 2
    return block


def is_quantized(type_name: str) -> bool:
    return type_name not in ("f32", "f16", "bf16")


@dataclass(frozen=True)
class KVRotation:
    """Block sizes of the K and V rotations; 0 where that side is not rotated."""

    k_block: int = 0
    v_block: int = 0

    @classmethod
    def for_cache(cls, head_k: int, head_v: int, type_k: str, type_v: str, enabled: bool = True) -> KVRotation:
        rotate_k = enabled and is_quantized(type_k) and head_k > 0 and head_k % MIN_BLOCK == 0
        rotate_v = enabled and is_quantized(type_v) and head_v > 0 and head_v % MIN_BLOCK == 0
        return cls(key_block(head_k) if rotate_k else 0, MIN_BLOCK if rotate_v else 0)

    def __bool__(self) -> bool:
        return bool(self.k_block or self.v_block)

    def queries_keys(self, q, k):
        """q (T, n_head, d_k) and k (T, n_head_kv, d_k) rotated alike."""
        return (rotate_heads(q, self.k_block), rotate_heads(k, self.k_block)) if self.k_block else (q, k)

    def values(self, v):
        return rotate_heads(v, self.v_block) if self.v_block else v

    def output(self, out, n_head: int):
        """The attention output (T, n_head * d_v) rotated back."""
        if not self.v_block:
            return out
        xp = array_namespace(out)
        return xp.reshape(rotate_heads(xp.reshape(out, (out.shape[0], n_head, -1)), self.v_block), out.shape)


def rotation_disabled() -> bool:
    """llama.cpp's own switch, honoured so that runs can be compared with its `-norot` ones."""
    return os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0") not in ("", "0")


@lru_cache(maxsize=None)
def _rotation(head_k: int, head_v: int, type_k: str, type_v: str, enabled: bool) -> KVRotation:
    return KVRotation.for_cache(head_k, head_v, type_k, type_v, enabled)


def rotation_for(head_k: int, head_v: int, type_k: str, type_v: str) -> KVRotation:
    """The rotation llama.cpp applies for this head size and these cache types."""
    return _rotation(head_k, head_v, type_k, type_v, not rotation_disabled())


def rotate_heads(x, block: int):
    """Each head's vector (..., d) times the block-diagonal Hadamard matrix of `block`-sized blocks."""
    xp = array_namespace(x)
    shape = x.shape
    blocks = xp.reshape(x, (*shape[:-1], shape[-1] // block, block))
    h = xp.asarray(hadamard(block), device=array_api_compat.device(x))    # on the heads' device
    return xp.reshape(blocks @ h, shape)
