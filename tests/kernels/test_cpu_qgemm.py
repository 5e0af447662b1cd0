"""The prefill integer GEMM (qgemm) against NumPy references.

- the row decoding: unsigned bytes, integer scales and mins and float block scales that give
  back gguf's dequantized values (a wrong integer anywhere is far outside float noise);
- qgemm bit for bit against a NumPy reference of the same arithmetic (exact integer sums per
  sub-block, then the same float32 multiplies and adds in the same order), every type, row
  counts around the tile height, 1 .. 9 tokens (partial groups of tokens);
- qgemm within float32 noise of the exact value of llama.cpp's formula (float64 from gguf's
  dequantized weights and the quantized activations): a reference independent of the decoding;
- every multiply-add form this CPU runs (`kernels.cpu.isa`), forced in a subprocess with its
  own Numba cache, gives the same bits as the host's best form.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ggml_weights import random_weight
from gguf.constants import GGMLQuantizationType as QType
from gguf.quants import dequantize

from kernels.cpu import isa
from kernels.cpu.qgemm import QGEMM_TYPES, prefill_is_faster, qgemm, type_layout
from kernels.cpu.qgemm_tile import decode_rows
from kernels.cpu.qgemm_ir import ROWS
from kernels.cpu.qmatmul import QuantizedActivations

TYPE_NAMES = sorted(t.name for t in QGEMM_TYPES)
RELATIVE_BUDGET = 2e-6      # of sum |x_q| * |w| per output: float32 noise over a few hundred terms
SHAPES = [(1, 1), (ROWS - 1, 2), (ROWS + 1, 5), (2 * ROWS + 6, 9)]   # (n_rows, n_tokens)


def n_cols_of(type_name: str) -> int:
    return 512 if type_layout(QType[type_name])[4] == 256 else 96


def activations(rng: np.random.Generator, n_tokens: int, n_cols: int) -> np.ndarray:
    """Noise over a wide range of magnitudes, with a zero block in the first token."""
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    x *= np.exp(rng.uniform(-3, 3, (n_tokens, n_cols))).astype(np.float32)
    x[0, :32] = 0.0
    return x


def decoded(w: np.ndarray, qtype: QType, n_cols: int):
    family, offset, _, n_sub, block = type_layout(qtype)
    return decode_rows(w, qtype, n_cols, n_sub, block)


def reference_qgemm(xa: QuantizedActivations, w: np.ndarray, qtype: QType, n_cols: int) -> np.ndarray:
    """NumPy twin of qgemm: exact integer sub-block sums, then, per block, acc + float(I) *
    (d_w * d_x) (+ float(M) * (dm_w * d_x) with integer mins, + m_w * s_x for Q4_1/Q5_1)."""
    family, offset, sub_block, n_sub, block = type_layout(qtype)
    u, sc, mn, d, dm = decoded(w, qtype, n_cols)
    n_tokens, n_rows, n_blocks = xa.q.shape[0], u.shape[0], n_cols // block
    x = xa.q.astype(np.int64).reshape(n_tokens, -1, sub_block)
    values = (u.astype(np.int64) - offset).reshape(n_rows, -1, sub_block)
    dots = np.einsum("tse,rse->trs", x, values)                       # exact
    sums = (dots * sc[None]).reshape(n_tokens, n_rows, n_blocks, n_sub).sum(axis=3)
    mins = (mn[None] * x.sum(axis=2)[:, None, :]).reshape(n_tokens, n_rows, n_blocks, n_sub).sum(axis=3)
    acc = np.zeros((n_tokens, n_rows), dtype=np.float32)
    for b in range(n_blocks):
        dx = xa.d[:, None, b]
        acc = acc + sums[:, :, b].astype(np.float32) * (d[None, :, b] * dx)
        if qtype in (QType.Q4_K, QType.Q5_K, QType.Q2_K):
            acc = acc + mins[:, :, b].astype(np.float32) * (dm[None, :, b] * dx)
        elif qtype in (QType.Q4_1, QType.Q5_1):
            acc = acc + dm[None, :, b] * xa.sums[:, None, b]
    return acc


def run_qgemm(xa, w, qtype, n_cols):
    out = np.full((xa.q.shape[0], w.shape[0]), np.nan, dtype=np.float32)
    return qgemm(xa, w, qtype, n_cols, out)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_decoded_rows_give_gguf_values(rng, type_name):
    qtype, n_cols = QType[type_name], n_cols_of(type_name)
    w = random_weight(rng, type_name, 7, n_cols)
    family, offset, sub_block, n_sub, block = type_layout(qtype)
    u, sc, mn, d, dm = decoded(w, qtype, n_cols)
    per_element = lambda a, size: np.repeat(a.astype(np.float64), size, axis=1)   # noqa: E731
    values = per_element(d, block) * per_element(sc, sub_block) * (u.astype(np.float64) - offset)
    if qtype in (QType.Q4_1, QType.Q5_1):
        values += per_element(dm, block)
    else:
        values += per_element(dm, block) * per_element(mn, sub_block)
    expected = dequantize(w, qtype).reshape(values.shape).astype(np.float64)
    assert np.allclose(values, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_qgemm_is_bit_exact(rng, type_name):
    qtype, n_cols = QType[type_name], n_cols_of(type_name)
    for n_rows, n_tokens in SHAPES:
        w = random_weight(rng, type_name, n_rows, n_cols)
        xa = QuantizedActivations.for_type(activations(rng, n_tokens, n_cols), qtype)
        result = run_qgemm(xa, w, qtype, n_cols)
        expected = reference_qgemm(xa, w, qtype, n_cols)
        assert np.array_equal(result.view(np.uint32), expected.view(np.uint32)), (n_rows, n_tokens)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_qgemm_matches_the_exact_product(rng, type_name):
    """Against float64 products of gguf's dequantized W with the dequantized activations."""
    qtype, n_cols = QType[type_name], n_cols_of(type_name)
    w = random_weight(rng, type_name, ROWS + 3, n_cols)
    xa = QuantizedActivations.for_type(activations(rng, 6, n_cols), qtype)
    block = 256 if xa.k_blocks else 32
    x = xa.q.astype(np.float64) * np.repeat(xa.d.astype(np.float64), block, axis=1)
    weights = dequantize(w, qtype).reshape(w.shape[0], n_cols).astype(np.float64)
    exact = x @ weights.T
    budget = RELATIVE_BUDGET * (np.abs(x) @ np.abs(weights).T) + 1e-30
    if qtype in (QType.Q4_1, QType.Q5_1):    # llama.cpp's min term uses Q8_1's f16 s
        budget += np.abs(weights).max() * np.abs(x).reshape(6, -1, 32).sum(axis=2).sum(axis=1)[:, None] * 1e-3
    assert np.all(np.abs(run_qgemm(xa, w, qtype, n_cols) - exact) <= budget)


def test_qgemm_refuses_mismatched_inputs(rng):
    w = random_weight(rng, "Q4_K", 4, 256)
    xa = QuantizedActivations(activations(rng, 2, 256), k_blocks=False)
    with pytest.raises(ValueError, match="another input type"):
        run_qgemm(xa, w, QType.Q4_K, 256)
    with pytest.raises(ValueError, match="no integer GEMM"):
        run_qgemm(xa, random_weight(rng, "F16", 4, 256), QType.F16, 256)
    with pytest.raises(ValueError, match="out must be"):
        qgemm(QuantizedActivations(activations(rng, 2, 256), k_blocks=True), w, QType.Q4_K, 256,
              np.empty((4, 2), dtype=np.float32))


def test_prefill_is_faster_only_for_several_tokens():
    assert not prefill_is_faster(QType.Q5_0, 1)
    assert not prefill_is_faster(QType.F16, 512)
    assert prefill_is_faster(QType.Q5_0, 512) and prefill_is_faster(QType.Q4_K, 512)


_FORCED_FORM_SCRIPT = """
import sys
import numpy as np
from ggml_weights import random_weight
from gguf.constants import GGMLQuantizationType as QType
from kernels.cpu import isa
from kernels.cpu.qgemm import QGEMM_TYPES, qgemm, type_layout
from kernels.cpu.qmatmul import QuantizedActivations
assert isa.ISA == sys.argv[2], isa.ISA
rng = np.random.default_rng(7)
results = {}
for qtype in sorted(QGEMM_TYPES):
    n_cols = 512 if type_layout(qtype)[4] == 256 else 96
    w = random_weight(rng, qtype.name, 37, n_cols)
    x = rng.standard_normal((6, n_cols)).astype(np.float32)
    xa = QuantizedActivations.for_type(x, qtype)
    results[qtype.name] = qgemm(xa, w, qtype, n_cols, np.empty((6, 37), dtype=np.float32))
np.savez(sys.argv[1], **results)
"""


def _forced_form_results(form: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{form}.npz"
    support = Path(__file__).resolve().parents[1] / "support"
    env = dict(os.environ, OFFLOAD_STUDIO_CPU_ISA=form, NUMBA_CACHE_DIR=str(tmp_path / f"cache-{form}"),
               PYTHONPATH=os.pathsep.join([str(support), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", _FORCED_FORM_SCRIPT, str(out), form], env=env, check=True, timeout=900)
    return dict(np.load(out))


@pytest.fixture(scope="module")
def best_form_results(tmp_path_factory):
    return _forced_form_results(isa.HOST_FORMS[-1], tmp_path_factory.mktemp("best"))


@pytest.mark.parametrize("form", isa.HOST_FORMS[:-1])
def test_every_form_gives_the_same_bits(tmp_path, best_form_results, form):
    best, forced = best_form_results, _forced_form_results(form, tmp_path)
    for name, values in best.items():
        assert np.array_equal(values.view(np.uint32), forced[name].view(np.uint32)), name
