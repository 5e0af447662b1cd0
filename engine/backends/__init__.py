"""Compute backends: one small op set that every device implements.

A backend runs the ops of a forward pass over weights that stay in their GGUF encoding:

    matmul(x, weight)               x @ W.T for a 2-D weight
    expert_matmul(x, weight, e, rows=None)
                                    x @ W[e].T for one expert of a 3-D `*_exps` tensor (or a row range)
    head_matmul(x, weight)          one matrix per head of a 3-D tensor (MLA's attn_k_b/attn_v_b)
    embedding(weight, ids)          rows of a (possibly quantized) table, as float32
    rms_norm, rope, attention, swiglu, geglu, add
    to_host(x) / from_host(x)       copies between this device and host memory
    set_threads(n)                  worker threads for the calling thread (-t)

The CPU backend (`engine.backends.cpu`) works on NumPy arrays; a CUDA backend implements the same
names over device arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.gguf import ggml_types


@dataclass(frozen=True, eq=False)
class Weight:
    """A tensor as stored in the file: its bytes, ggml type and numpy-order shape.

    `data` is a read-only uint8 view shaped (rows..., row_bytes): (rows, row_bytes) for a matrix,
    (n_expert, rows, row_bytes) for a routed-expert tensor.
    """

    name: str
    data: np.ndarray
    ggml_type: int
    shape: tuple[int, ...]

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.shape[-2] if len(self.shape) > 1 else 1

    @property
    def type_name(self) -> str:
        return ggml_types.type_name(self.ggml_type)

    def __repr__(self) -> str:
        return f"Weight({self.name}, {self.type_name}, {self.shape})"

