"""Fixtures for the CPU kernel tests: a seeded generator and weights in every ggml type."""
from __future__ import annotations

import numpy as np
import pytest

from ggml_weights import random_weight


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def make_weight(rng):
    """make_weight(type_name, n_rows, n_cols) -> uint8 (n_rows, row_bytes) weight bytes."""
    return lambda type_name, n_rows, n_cols: random_weight(rng, type_name, n_rows, n_cols)
