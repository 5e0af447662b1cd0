"""One token through a run of CPU layers as kernel calls only: the CPU's lean decode step.

A decode step of a small model is short (Gemma 3 270M reads 246 MB per token), and the family's
forward_layer, array math between backend ops that each check, reshape and allocate, spent a
quarter of it in Python. Where the family describes its block as data (engine.arch.decode_plan),
this step runs that block with each layer's weights, norms and kernel choices bound once:
- a layer whose products all take the integer path over an f32/f16 cache runs as the chains of
  kernels.cpu.decode_step: one call from the norm to the stored key and value and the rounded
  query, attention over the cache (kernels.cpu.attention), one call for the o product and the
  residual, one for a dense FFN;
- any other layer (float weights, exact activations, a quantized cache with its rotation) runs
  op by op with its products bound, attention through UBatch.attend as the family's does;
- a MoE layer's experts are one `decode_experts` call where CpuBackend would reach it, else the
  family's `moe_feed_forward`.
Each runs the same kernels on the same inputs in the same order as CpuBackend under
forward_layer, so the logits are bit-identical with the family's (tests/engine/run/
test_cpu_decode.py holds every form to that).
"""
from __future__ import annotations

import numpy as np

from engine.arch.kv_rotation import rotation_for
from engine.arch.layers import geglu, moe_feed_forward, select_experts, swiglu
from engine.backends import Weight
from engine.backends.cpu import CpuBackend
from engine.backends.kv_store import MASK_KIND, HostKVLayer, attention_rounding
from kernels.cpu.attention import EXACT, attend_cache
from kernels.cpu.fused_ops import add_rms_norm_rows, glu_rows, rms_norm_rows, rope_rows

try:    # the Numba kernels, once they are built
    from kernels.cpu import integer_path_is_faster
    from kernels.cpu.decode import checked_weight
    from kernels.cpu.decode_step import (STORE_F16, STORE_F32, attention_inputs, attention_output, dense_ffn,
                                         ffn_input)
    from kernels.cpu.formats import read_only
    from kernels.cpu.moe import GROUPED_TYPES, DecodeExperts
    from kernels.cpu.qactivations import quantize_one_token
    from kernels.cpu.qgemm import prefill_is_faster
    from kernels.cpu.qmatmul import (DECODE_ROWS_PER_CHUNK, LANES, Q8_K_INPUT_TYPES, SERIAL_WORK_BYTES,
                                     qmatmul_kernel, qmatmul_serial, quantized_buffers)
    from kernels.cpu.routing import combine
except ImportError:
    integer_path_is_faster = None

GLU = {"swiglu": swiglu, "geglu": geglu}


def lean_blocker(backend, plan) -> str | None:
    """Why a CPU range cannot take the lean step, or None."""
    if not isinstance(backend, CpuBackend):
        return "not a CPU range"
    if integer_path_is_faster is None:
        return "the CPU kernels are not built"
    if plan is None:
        return "the family has no one-token decode plan (engine.arch.decode_plan)"
    for il, block in enumerate(plan.blocks):
        if block.activation not in GLU:
            return f"layer {il}'s {block.activation} is not a GLU the lean step knows"
        if block.routing is not None and block.routing.weight_before_ffn:
            return f"layer {il} weights its experts' inputs"
    return None


class _Quantized:
    """One activation row quantized for the integer products of one input block type (Q8_0 or
    Q8_K), in buffers reused by every layer: the products that read it run right after."""

    def __init__(self, n_cols: int, k_blocks: bool):
        self.k_blocks = k_blocks
        self.q, self.d, self.sums, self.min_sums = quantized_buffers(1, n_cols, k_blocks)
        # the kernels take their inputs read-only (one compiled form each): views of the buffers
        self.inputs = (read_only(self.q), read_only(self.d), read_only(self.min_sums))
        self.form = (self.q, self.d, self.sums, self.min_sums, *self.inputs)     # decode_step's

    def fill(self, x: np.ndarray) -> None:
        quantize_one_token(read_only(x), self.k_blocks, self.q, self.d, self.sums, self.min_sums)


def _quantized(quantized: dict, n_cols: int, k_blocks: bool) -> _Quantized:
    """The range's buffers for inputs of n_cols in one block type; zero-sized where n_cols is
    not whole blocks of it (a form no product of that width takes)."""
    key = (n_cols, k_blocks)
    if key not in quantized:
        whole = n_cols % (256 if k_blocks else 32) == 0
        quantized[key] = _Quantized(n_cols if whole else 0, k_blocks)
    return quantized[key]


def _forms(quantized: dict, n_cols: int) -> tuple:
    """(Q8_0, Q8_K) forms of an input of n_cols, as decode_step's `inputs`."""
    return tuple(_quantized(quantized, n_cols, k_blocks).form for k_blocks in (False, True))


class _Products:
    """The products of one input (q, k and v; gate and up; one weight), by the kernel and input
    CpuBackend._product would pick for each at one token."""

    def __init__(self, backend: CpuBackend, weights, quantized: dict):
        self.backend, self.weights = backend, weights
        self.integer = []       # per weight: (data, type, kernel, quantized input) or None
        for w in weights:
            qtype = int(w.ggml_type)
            integer = (backend.round_inputs and integer_path_is_faster(qtype, 1)
                       and not prefill_is_faster(qtype, 1))
            if not integer:
                self.integer.append(None)
                continue
            data = checked_weight(w.data, qtype, w.n_cols)
            kernel = qmatmul_serial if data.nbytes <= SERIAL_WORK_BYTES else qmatmul_kernel
            self.integer.append((data, qtype, kernel, _quantized(quantized, w.n_cols, qtype in Q8_K_INPUT_TYPES)))

    @property
    def all_integer(self) -> bool:
        return all(integer is not None for integer in self.integer)

    def chained(self) -> tuple:
        """(weights, types, k_blocks) as decode_step takes them."""
        return (tuple(data for data, *_ in self.integer), tuple(qtype for _, qtype, *_ in self.integer),
                tuple(quantized.k_blocks for *_, quantized in self.integer))

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """[x @ W.T (1, n_rows) for each weight] of x (1, n_cols)."""
        outs, done, generic_inputs = [], set(), {}
        for w, integer in zip(self.weights, self.integer):
            if integer is None:
                outs.append(self.backend._product(x, w.data, w, generic_inputs))
                continue
            data, qtype, kernel, quantized = integer
            if id(quantized) not in done:
                quantized.fill(x)
                done.add(id(quantized))
            out = np.empty((1, data.shape[0]), dtype=np.float32)
            kernel(*quantized.inputs, data, qtype, w.n_cols, LANES, DECODE_ROWS_PER_CHUNK, out, 0)
            outs.append(out)
        return outs


class _Experts:
    """A MoE layer's routed experts by one bound `decode_experts` call, as CpuBackend.routed_experts
    reaches it for one token with every expert on the CPU (`bound`: None where it would not)."""

    def __init__(self, backend: CpuBackend, lw, step: DecodeExperts):
        self.gate_inp = _Products(backend, [lw.ffn_gate_inp], {})
        self.step = step

    @classmethod
    def bound(cls, backend: CpuBackend, lw, n_expert: int, activation, device: str) -> _Experts | None:
        tensors = (lw.ffn_gate_exps, lw.ffn_up_exps, lw.ffn_down_exps)
        if not all(type(w) is Weight and w.device == device and w.data.shape[0] == n_expert
                   and int(w.ggml_type) in GROUPED_TYPES for w in tensors):
            return None

        def integer_for(ggml_type: int, n_tokens: int) -> bool:     # CpuBackend.routed_experts' at one token
            return backend.round_inputs and integer_path_is_faster(ggml_type, n_tokens)
        step = DecodeExperts.bound(*((w.data, w.ggml_type) for w in tensors), backend._glu_kind(activation),
                                   integer_for)
        return None if step is None else cls(backend, lw, step)

    def __call__(self, x: np.ndarray, routing, bias, counts: np.ndarray) -> np.ndarray:
        ids, weights = select_experts(self.gate_inp(x)[0], routing, bias)
        chosen = ids[0]
        counts[chosen] += 1                 # k distinct experts
        order = np.argsort(chosen, kind="stable")
        experts = np.ascontiguousarray(chosen[order])
        y = self.step(read_only(np.repeat(x, len(experts), axis=0)), experts)
        # weighted and summed in ascending expert order from zero, as moe_feed_forward sums them
        out = np.empty_like(x)
        combine(y, experts, weights[0][order], out[0])
        return out


class _Layer:
    """One layer's plan, tensors and products, bound once."""

    def __init__(self, backend: CpuBackend, m, il: int, plan, quantized: dict, device: str, kv):
        hp, lw = m.hparams, m.layers[il]
        self.il, self.plan, self.lw = il, plan, lw
        self.shapes = ((hp.n_head, hp.n_embd_head_k), (hp.n_head_kv[il], hp.n_embd_head_k),
                       (hp.n_head_kv[il], hp.n_embd_head_v))
        self.biases = [lw.get(f"{name}.bias") for name in ("attn_q", "attn_k", "attn_v")]
        self.qkv = _Products(backend, [lw.attn_q, lw.attn_k, lw.attn_v], quantized)
        self.o = _Products(backend, [lw.attn_output], quantized)
        self.activation = GLU[plan.activation]
        self.glu_kind = backend._glu_kind(self.activation)
        self.experts = None
        if plan.routing is None:
            self.gate_up = _Products(backend, [lw.ffn_gate, lw.ffn_up], quantized)
            self.down = _Products(backend, [lw.ffn_down], quantized)
        else:
            self.experts = _Experts.bound(backend, lw, hp.n_expert, self.activation, device)
        self.chain = _Chain(self, hp, kv, quantized) if _Chain.fits(self, hp, kv) else None


class _Chain:
    """A layer's arguments to the chained kernels of kernels.cpu.decode_step, bound once: every
    product of the layer integer, its keys and values in an f32/f16 cache with no rotation."""

    @staticmethod
    def fits(layer: _Layer, hp, kv) -> bool:
        products = [layer.qkv, layer.o] + ([layer.gate_up, layer.down] if layer.plan.routing is None else [])
        if not (all(p.all_integer for p in products) and layer.glu_kind is not None):
            return False
        if not isinstance(kv, HostKVLayer) or kv.v is None:
            return False
        layout = kv.layout
        return ({layout.type_k, layout.type_v} <= {"f32", "f16"}
                and not rotation_for(hp.n_embd_head_k, hp.n_embd_head_v, layout.type_k, layout.type_v))

    def __init__(self, layer: _Layer, hp, kv: HostKVLayer, quantized: dict):
        lw, plan, il = layer.lw, layer.plan, layer.il
        none = np.zeros(0, dtype=np.float32)
        self.heads = (hp.n_head, hp.n_head_kv[il], hp.n_embd_head_k, hp.n_embd_head_v)
        self.n_attended = hp.n_head * hp.n_embd_head_v
        self.qkv_inputs = _forms(quantized, hp.n_embd)
        self.qkv = layer.qkv.chained()
        self.biases = tuple(none if b is None else b for b in layer.biases)
        self.q_norm, self.k_norm = (lw.attn_q_norm, lw.attn_k_norm) if plan.qk_norm else (none, none)
        layout = kv.layout
        self.k_rows, self.v_rows, self.cell_pos = kv.k_bytes, kv.v_bytes, kv.cell_pos
        self.k_type, self.v_type = kv.k_codec.type_id, kv.v_codec.type_id
        self.stores = tuple(STORE_F16 if t == "f16" else STORE_F32 for t in (layout.type_k, layout.type_v))
        self.rounding = attention_rounding(layout, 1)
        self.round_q = self.rounding != EXACT and layout.type_k == "f16"      # UBatch.attend's half_rounded
        self.o_inputs = _forms(quantized, self.n_attended)
        (self.wo,), (self.o_type,), (self.o_k_blocks,) = layer.o.chained()
        self.post_attention_norm = lw.post_attention_norm if plan.post_norms else none
        self.post_ffw_norm = lw.post_ffw_norm if plan.post_norms else none
        if plan.routing is None:
            self.ffn_inputs = _forms(quantized, hp.n_embd)
            self.down_inputs = _forms(quantized, lw.ffn_down.n_cols)
            (gate, up), (g_type, u_type), (g_kb, u_kb) = layer.gate_up.chained()
            (down,), (d_type,), (d_kb,) = layer.down.chained()
            self.ffn = ((gate, up, down), (g_type, u_type, d_type), (g_kb, u_kb, d_kb))


class CpuRangeDecode:
    """step(x, batch) of one token (x (1, n_embd)) through `layers` on the CPU backend."""

    def __init__(self, backend: CpuBackend, m, plan, layers: range, device: str, cache):
        self.backend, self.m, self.layers = backend, m, layers
        self.eps = m.hparams.rms_eps
        quantized: dict = {}
        self.bound = [_Layer(backend, m, il, plan.blocks[il], quantized, device, cache.layers[il])
                      for il in layers]

    def __call__(self, x: np.ndarray, batch) -> np.ndarray:
        for layer in self.bound:
            x = self._block(layer, x, batch) if layer.chain is None else self._chained_block(layer, x, batch)
        return x

    # --- one block (BlockPlan) --------------------------------------------------------------------

    def _norm(self, x: np.ndarray, w) -> np.ndarray:
        rows = x.reshape(-1, x.shape[-1])
        out = np.empty_like(rows)
        rms_norm_rows(rows, w, self.eps, out)
        return out.reshape(x.shape)

    def _add_norm(self, residual: np.ndarray, y: np.ndarray, w) -> np.ndarray:
        out = np.empty_like(y)
        add_rms_norm_rows(residual, y, w, self.eps, out)
        return out

    def _block(self, layer: _Layer, x: np.ndarray, batch) -> np.ndarray:
        plan, lw = layer.plan, layer.lw
        out = self._attention(layer, self._norm(x, lw.attn_norm), batch)
        h = self._add_norm(x, out, lw.post_attention_norm) if plan.post_norms else x + out
        y = self._norm(h, lw.ffn_norm)
        y = self._ffn(layer, y) if plan.routing is None else self._moe(layer, y)
        return self._add_norm(h, y, lw.post_ffw_norm) if plan.post_norms else h + y

    def _chained_block(self, layer: _Layer, x: np.ndarray, batch) -> np.ndarray:
        """_block by decode_step's chains: two calls around attention, one for a dense FFN."""
        c, plan, lw, eps = layer.chain, layer.plan, layer.lw, self.eps
        step = batch.cache.step(layer.il, batch.positions)
        n, positions = step.n_filled, batch.device_positions()
        rope = plan.rope
        cos, sin = batch.rope_tables(rope.n_dims, rope.base, rope.scaling, self._freq_factors(rope))
        q = attention_inputs(x, lw.attn_norm, eps, c.qkv_inputs, *c.qkv, c.biases, c.q_norm, c.k_norm,
                             c.heads, cos, sin, rope.neox, plan.q_scale, c.k_rows, c.v_rows, c.cell_pos,
                             int(step.cells[0]), int(positions[0]), c.stores, c.round_q)
        attended = np.empty((1, c.n_attended), dtype=np.float32)
        attend_cache(q, c.k_rows[:n], c.k_type, c.v_rows[:n], c.v_type, c.heads[1], c.cell_pos[:n], positions,
                     MASK_KIND[step.kind], step.window, plan.kq_scale, c.rounding, attended)
        h = attention_output(x, attended, c.o_inputs, c.wo, c.o_type, c.o_k_blocks, c.post_attention_norm, eps)
        if plan.routing is None:
            return dense_ffn(h, lw.ffn_norm, eps, c.ffn_inputs, c.down_inputs, *c.ffn, layer.glu_kind, c.post_ffw_norm)
        y = self._moe(layer, ffn_input(h, lw.ffn_norm, eps))
        return self._add_norm(h, y, lw.post_ffw_norm) if plan.post_norms else h + y

    def _freq_factors(self, rope):
        return None if rope.freq_factors is None else self.m.vector_here(rope.freq_factors)

    def _attention(self, layer: _Layer, h: np.ndarray, batch) -> np.ndarray:
        plan, lw = layer.plan, layer.lw
        q, k, v = (y if bias is None else y + bias for y, bias in zip(layer.qkv(h), layer.biases))
        q, k, v = (y.reshape(1, *shape) for y, shape in zip((q, k, v), layer.shapes))
        if plan.qk_norm:
            q, k = self._norm(q, lw.attn_q_norm), self._norm(k, lw.attn_k_norm)
        rope = plan.rope
        cos, sin = batch.rope_tables(rope.n_dims, rope.base, rope.scaling, self._freq_factors(rope))
        q_out, k_out = np.empty_like(q), np.empty_like(k)
        rope_rows(q, cos, sin, rope.neox, np.float32(plan.q_scale), q_out)
        rope_rows(k, cos, sin, rope.neox, np.float32(1.0), k_out)
        out = batch.attend(layer.il, q_out, k_out, v, kq_scale=plan.kq_scale)
        return layer.o(out)[0]

    def _ffn(self, layer: _Layer, y: np.ndarray) -> np.ndarray:
        gate, up = layer.gate_up(y)
        if layer.glu_kind is None:
            hidden = layer.activation(gate, up)
        else:
            hidden = np.empty_like(gate)
            glu_rows(gate, up, layer.glu_kind, hidden)
        return layer.down(hidden)[0]

    def _moe(self, layer: _Layer, y: np.ndarray) -> np.ndarray:
        m, routing = self.m, layer.plan.routing
        counts = m.expert_counts[layer.il]
        if layer.experts is None:
            return moe_feed_forward(m.ops, y, layer.lw, routing, counts, layer.activation)
        return layer.experts(y, routing, layer.lw.get("exp_probs_b.bias"), counts)


__all__ = ["CpuRangeDecode", "lean_blocker"]
