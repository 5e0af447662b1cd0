"""The CPU backend: the op set over NumPy float32 activations and weights kept in their GGUF
encoding.

Quantized matmuls go to the Numba kernels of `kernels.cpu` when that package provides them;
otherwise rows are decoded with `gguf.quants.dequantize` one tile at a time, so that no weight
is ever held dequantized in full. F32 weights are used in place and F16 weights are widened a
tile at a time.
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from engine.arch.layers import geglu, numpy_namespace, swiglu
from engine.backends import Weight
from engine.backends.kv_store import HostKVLayer, attend_cached
from engine.backends.protocol import AttentionStep, KVLayout
from kernels.cpu.fused_ops import GELU, GELU_F16, SILU, add_rms_norm_rows, glu_rows, q8_0_round_rows, rms_norm_rows, rope_rows

try:    # the Numba kernels, once they are built
    from kernels.cpu import dequantize_rows as kernel_dequantize_rows
    from kernels.cpu import matmul as kernel_matmul
    from kernels.cpu import qmatmul as kernel_qmatmul, integer_path_is_faster, QuantizedActivations
    from kernels.cpu.moe import GROUPED_TYPES, grouped_experts
    from kernels.cpu.moe_gemm import EXPERT_GEMM_TYPES, expert_product
except ImportError:
    kernel_matmul = kernel_dequantize_rows = kernel_qmatmul = None
    integer_path_is_faster = grouped_experts = expert_product = None
    GROUPED_TYPES = EXPERT_GEMM_TYPES = frozenset()

F32 = int(GGMLQuantizationType.F32)
F16 = int(GGMLQuantizationType.F16)
BF16 = int(GGMLQuantizationType.BF16)
TILE_VALUES = 1 << 21       # weight values decoded at once by the fallback (8 MiB of float32)


def decode_rows(rows: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """float32 (n, n_cols) from the bytes (n, row_bytes) of n rows, in the fallback path."""
    if ggml_type == F32:
        return rows.view(np.float32).reshape(len(rows), n_cols)
    if ggml_type == F16:
        return rows.view(np.float16).astype(np.float32).reshape(len(rows), n_cols)
    if ggml_type == BF16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(len(rows), n_cols)
    return gguf_dequantize(np.ascontiguousarray(rows), GGMLQuantizationType(ggml_type)).reshape(len(rows), n_cols)


def dequantize_rows(data: np.ndarray, ggml_type: int, n_cols: int, rows=None) -> np.ndarray:
    """float32 (n, n_cols) of the chosen rows (all when rows is None) of 2-D weight bytes."""
    if kernel_dequantize_rows is not None:
        return kernel_dequantize_rows(data, ggml_type, n_cols, rows)
    picked = data if rows is None else data[np.asarray(rows)]
    return np.ascontiguousarray(decode_rows(picked, ggml_type, n_cols))


def matmul_bytes(x: np.ndarray, data: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """x (n_tokens, n_cols) @ W.T for weight bytes (n_rows, row_bytes) -> (n_tokens, n_rows)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kernel_matmul is not None:
        # F32 too: after a BLAS call OpenBLAS's spinning threads slow the next Numba kernels ~10x
        return kernel_matmul(x, data, ggml_type, n_cols)
    if ggml_type == F32:
        return x @ data.view(np.float32).reshape(len(data), n_cols).T
    n_rows = len(data)
    out = np.empty((len(x), n_rows), dtype=np.float32)
    tile = max(1, TILE_VALUES // n_cols)
    for r0 in range(0, n_rows, tile):
        r1 = min(n_rows, r0 + tile)
        out[:, r0:r1] = x @ decode_rows(data[r0:r1], ggml_type, n_cols).T
    return out


Q8_0_INPUT = frozenset(int(GGMLQuantizationType[n]) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"))
FLOAT_TYPES = frozenset({F32, F16, BF16})
HALF_NAMES = {F16: "f16", BF16: "bf16"}


def q8_0_rounded(x: np.ndarray) -> np.ndarray:
    """x as llama.cpp's CPU backend feeds it to a Q4_0..Q8_0 dot product: blocks of 32 scaled to
    int8 (round half to even, as the x86 quantize_row_q8_0 does) with an f16 scale."""
    rows = _rows(x)
    out = np.empty_like(rows)
    q8_0_round_rows(rows.reshape(-1, 32), out.reshape(-1, 32))
    return out.reshape(x.shape)


def q8_k_rounded(x: np.ndarray) -> np.ndarray:
    """x as fed to a K-quant/IQ dot product: blocks of 256 as ggml's quantize_row_q8_K_ref makes
    them (scale -127/max of the signed largest value, f32 scale)."""
    blocks = x.reshape(-1, 256)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    iscale = np.divide(np.float32(-127), largest, out=np.zeros_like(largest), where=largest != 0)
    q = np.minimum(np.round(blocks * iscale), 127)
    d = np.divide(np.float32(1), iscale, out=np.zeros_like(iscale), where=iscale != 0)
    return (q * d).reshape(x.shape)


def input_blocks(ggml_type: int) -> str:
    """The blocks (or float type) llama.cpp's CPU backend rounds a matmul input to for this weight type."""
    if ggml_type in FLOAT_TYPES:
        return HALF_NAMES.get(ggml_type, "f32")
    return "q8_0" if ggml_type in Q8_0_INPUT else "q8_k"


def llama_cpp_input(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """The matmul input rounded to the block type llama.cpp's CPU backend quantizes it to
    (vec_dot_type). Inputs to float weights stay exact: llama.cpp rounds those to f16/bf16, and with
    attention rounded too that brings the dense and MoE F16 fixtures closer (rel 1.1-1.7e-3 ->
    5-8e-4), but it flips an expert of the deepseek2 F16 fixture (rel 2.7e-3 -> 9.6e-2), whose MLA
    attention is not rounded as llama.cpp's."""
    if ggml_type in FLOAT_TYPES:
        return x
    if ggml_type in Q8_0_INPUT:
        return q8_0_rounded(x)
    return q8_k_rounded(x)


def _rows(x: np.ndarray) -> np.ndarray:
    """x as C-ordered float32 rows over its last axis (no copy when it already is)."""
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])


NO_WEIGHT = np.zeros(0, dtype=np.float32)
GLU_KINDS = {swiglu: SILU, geglu: GELU}


class CpuBackend:
    """Ops on host memory; activations are float32 NumPy arrays.

    With activations="llama.cpp" each matmul input is first rounded the way llama.cpp's CPU
    backend rounds it, so logits and perplexity track llama.cpp's; "f32" computes exactly."""

    name = "CPU"
    round_inputs = False
    allocated_bytes = 0         # the memory map is the CPU's copy of its weights

    def __init__(self, activations: str = "f32"):
        self.round_inputs = activations == "llama.cpp"

    @property
    def namespace(self):
        return numpy_namespace

    def _input(self, x: np.ndarray, w: Weight) -> np.ndarray:
        if not self.round_inputs:
            return x
        return llama_cpp_input(np.ascontiguousarray(x, dtype=np.float32), w.ggml_type)

    @staticmethod
    def set_threads(n_threads: int) -> None:
        """Threads the Numba kernels use when called from this thread (-t); 0 leaves the default."""
        if n_threads > 0:
            import numba
            numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))

    # --- ops that read weights --------------------------------------------------------------

    def matmul(self, x: np.ndarray, w: Weight) -> np.ndarray:
        """x (..., n_cols) @ W.T -> (..., n_rows)."""
        lead = x.shape[:-1]
        y = self._product(x.reshape(-1, w.n_cols), w.data, w)
        return y.reshape(*lead, w.n_rows)

    def matmuls(self, x: np.ndarray, ws) -> list[np.ndarray]:
        """[matmul(x, w) for w in ws] for weights of one width (q, k and v; gate and up), with x
        rounded or quantized once per input block type instead of once per weight."""
        lead, x2, inputs = x.shape[:-1], x.reshape(-1, ws[0].n_cols), {}
        return [self._product(x2, w.data, w, inputs).reshape(*lead, w.n_rows) for w in ws]

    def _product(self, x: np.ndarray, data: np.ndarray, w: Weight, inputs: dict | None = None) -> np.ndarray:
        """x @ W.T over the bytes `data` of w: with llama.cpp's activations, x quantized as
        llama.cpp quantizes it, then integer dot products (the kernels' qmatmul) where those are
        the faster kernel, else the float kernel on the same rounded values; or exact f32.
        `inputs` keeps x's rounded or quantized forms for the next weights of one input."""
        integer = self.round_inputs and integer_path_is_faster is not None and integer_path_is_faster(
            w.ggml_type, len(x))
        key = (integer, input_blocks(w.ggml_type))
        x_in = None if inputs is None else inputs.get(key)
        if x_in is None:
            x_in = QuantizedActivations.for_type(x, w.ggml_type) if integer else self._input(x, w)
            if inputs is not None:
                inputs[key] = x_in
        if integer:
            return kernel_qmatmul(x_in, data, w.ggml_type, w.n_cols)
        return matmul_bytes(x_in, data, w.ggml_type, w.n_cols)

    def expert_matmul(self, x: np.ndarray, w: Weight, expert: int, rows: slice | None = None) -> np.ndarray:
        """x (n_tokens, n_cols) @ W[expert][rows].T: reads only that expert's bytes (only those
        rows, when a range is given)."""
        data = w.data[expert] if rows is None else w.data[expert, rows]
        if self._expert_gemm(w.ggml_type, len(x)):
            return expert_product(x, data, w.ggml_type, w.n_cols)
        return self._product(x, data, w)

    def _expert_gemm(self, ggml_type: int, n_tokens: int) -> bool:
        """Whether an expert's product over n_tokens takes the integer GEMM of a prefill ubatch's
        experts (`kernels.cpu.moe_gemm`): several tokens with llama.cpp's activations, which its
        mul_mat_id quantizes for every expert, and faster than the float tiles for each."""
        return self.round_inputs and n_tokens > 1 and ggml_type in EXPERT_GEMM_TYPES

    def routed_experts(self, x: np.ndarray, spans, gate: Weight, up: Weight, down: Weight, activation):
        """down(activation(gate(x), up(x))) of each expert of `spans` (expert, first_row,
        end_row) over its rows of x (R, n_cols), as (R, n_embd): the grouped products of
        `kernels.cpu.moe` (one parallel region for all the gate and up products, one for the
        down), bit-identical with one expert_matmul each. None for weight types it lacks."""
        if grouped_experts is None or any(w.ggml_type not in GROUPED_TYPES for w in (gate, up, down)):
            return None
        round_inputs = self.round_inputs

        def rounded(rows: np.ndarray, ggml_type: int) -> np.ndarray:
            return llama_cpp_input(rows, ggml_type) if round_inputs else rows

        def integer_for(ggml_type: int, n_tokens: int) -> bool:
            return (round_inputs and integer_path_is_faster(ggml_type, n_tokens)
                    or self._expert_gemm(ggml_type, n_tokens))

        return grouped_experts(x, spans, (gate.data, gate.ggml_type), (up.data, up.ggml_type),
                               (down.data, down.ggml_type), activation, rounded, integer_for,
                               glu_kind=self._glu_kind(activation))

    def head_matmul(self, x: np.ndarray, w: Weight) -> np.ndarray:
        """x (n_tokens, n_head, n_cols) with W (n_head, n_rows, n_cols) -> (n_tokens, n_head, n_rows),
        each head through its own matrix."""
        n_head, n_rows, _ = w.shape
        x = self._input(x, w)
        out = np.empty((x.shape[0], n_head, n_rows), dtype=np.float32)
        heads_per_tile = max(1, TILE_VALUES // (n_rows * w.n_cols))
        for h0 in range(0, n_head, heads_per_tile):
            h1 = min(n_head, h0 + heads_per_tile)
            rows = w.data[h0:h1].reshape((h1 - h0) * n_rows, -1)
            mats = dequantize_rows(rows, w.ggml_type, w.n_cols).reshape(h1 - h0, n_rows, w.n_cols)
            # (heads, n_tokens, n_cols) @ (heads, n_cols, n_rows)
            out[:, h0:h1] = (x[:, h0:h1].transpose(1, 0, 2) @ mats.transpose(0, 2, 1)).transpose(1, 0, 2)
        return out

    def embedding(self, w: Weight, ids: np.ndarray) -> np.ndarray:
        # gather the few rows' bytes first: the decoder then never looks at the whole table
        return dequantize_rows(w.data[np.asarray(ids, dtype=np.int64)], w.ggml_type, w.n_cols)

    def dequantize(self, w: Weight) -> np.ndarray:
        """The whole tensor as float32, numpy-order shape: only for small tensors (norms, biases)."""
        rows = w.data.reshape(-1, w.data.shape[-1])
        return dequantize_rows(rows, w.ggml_type, w.n_cols).reshape(w.shape)

    # --- the small ops of a layer (engine.backends.protocol.LayerOps), one pass each --------------

    @staticmethod
    def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
        rows = _rows(x)
        out = np.empty_like(rows)
        rms_norm_rows(rows, NO_WEIGHT if w is None else w, eps, out)
        return out.reshape(x.shape)

    @staticmethod
    def add_rms_norm(residual: np.ndarray, y: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        rows = _rows(y)
        out = np.empty_like(rows)
        add_rms_norm_rows(_rows(residual), rows, w, eps, out)
        return out.reshape(y.shape)

    def _glu_kind(self, activation) -> int | None:
        """glu_rows's kind of a family's GLU; with llama.cpp's activations GELU is its f16 table."""
        kind = GLU_KINDS.get(activation)
        return GELU_F16 if kind == GELU and self.round_inputs else kind

    def glu(self, gate: np.ndarray, up: np.ndarray, activation) -> np.ndarray:
        kind = self._glu_kind(activation)
        if kind is None:
            return activation(gate, up)
        rows = _rows(gate)
        out = np.empty_like(rows)
        glu_rows(rows, _rows(up), kind, out)
        return out.reshape(gate.shape)

    @staticmethod
    def rope_qk(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool,
                q_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        q, k = np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(k, dtype=np.float32)
        q_out, k_out = np.empty_like(q), np.empty_like(k)
        rope_rows(q, cos, sin, neox, np.float32(q_scale), q_out)
        rope_rows(k, cos, sin, neox, np.float32(1.0), k_out)
        return q_out, k_out

    # --- memory, transfers, the KV cache (engine.backends.protocol) -------------------------------

    def upload(self, w: Weight, experts=None) -> Weight:
        """The memory map is already host memory: a whole tensor stays where it is; a subset of
        experts is a view when it is one contiguous range, else a copy of those experts."""
        if experts is None:
            return Weight(w.name, w.data, w.ggml_type, w.shape, self.name)
        experts = list(experts)
        if experts == list(range(experts[0], experts[0] + len(experts))):
            data = w.data[experts[0]:experts[0] + len(experts)]
        else:
            data = np.ascontiguousarray(w.data[experts])
        return Weight(w.name, data, w.ggml_type, (len(experts), *w.shape[1:]), self.name)

    @staticmethod
    def upload_vector(values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=np.float32)

    @staticmethod
    def to_device(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def to_host(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def new_kv_layer(layout: KVLayout) -> HostKVLayer:
        return HostKVLayer(layout)

    @staticmethod
    def attend(kv: HostKVLayer, step: AttentionStep, positions, q, k, v, kq_scale: float, v_from_k: int = 0):
        kv.store(step.cells, positions, k, v)
        if kv.attends_by_rows(len(q)):
            return kv.attend_rows(step, positions, q, k.shape[1], kq_scale)
        keys, values, key_pos = kv.view(step.n_filled)
        return attend_cached(keys, values, key_pos, positions, step, q, k.shape[1], kq_scale, v_from_k)
