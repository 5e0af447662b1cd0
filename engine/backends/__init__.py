"""Backends: the devices a forward pass runs on.

`protocol.py` says what a device does (upload, transfers, quantized matmuls, embedding lookup,
the KV cache of its layers and attention over it, its array namespace); `cpu.py` is the host,
`strict.py` the simulated GPU that holds its arrays in a strict non-NumPy array type, and
`dispatch.py` routes each op of a placed model to the device of its weight, moving activations
between devices and counting the moves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.gguf import ggml_types


@dataclass(frozen=True, eq=False)
class Weight:
    """A tensor as stored in the file: its bytes, ggml type, numpy-order shape and device.

    `data` is a read-only uint8 view shaped (rows..., row_bytes): (rows, row_bytes) for a matrix,
    (n_expert, rows, row_bytes) for a routed-expert tensor.
    """

    name: str
    data: np.ndarray        # or the device's own array type, on a device other than the CPU
    ggml_type: int
    shape: tuple[int, ...]
    device: str = "CPU"

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

