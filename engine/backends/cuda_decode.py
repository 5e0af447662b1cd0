"""One token through a run of layers on one CUDA device, as launches only: the step that
`CapturedDecode` captures as a CUDA graph and replays.

The family's block comes as data (`engine.arch.decode_plan`); each piece below is one runtime
kernel (kernels.cuda.ops) on device memory, with nothing read back to the host in between: the
MoE router's choice stays on the device (`expert_matvec`, `moe_combine`). The token id, its
position and its cache cell in every layer are device inputs, so a replay only refills them. The
attended cache length of each layer is the step's key, padded (`padded_cells`) so that a graph
lives for GRAPH_CELL_PADDING tokens; the cells past the filled ones are masked by their position.

The same kernels run in the eager CUDA path for the matmuls, the embedding row, the cache writes
and attention; the norms, rope, activations and the router are array math there (one kernel
each here), so the two agree to float rounding, not bit for bit.
"""
from __future__ import annotations

import numpy as np

from engine.arch.kv_rotation import hadamard, is_quantized, rotation_for
from engine.arch.layers import yarn_corr_dims
from engine.backends import Weight
from engine.backends.cuda import MASK_KIND, CudaBackend
from kernels.cuda import ops

GATED_ACTIVATIONS = {"swiglu": ops.swiglu, "geglu": ops.geglu}


class RangeDecode:
    """step(key, inputs) of one token through `layers` on `backend`, for CapturedDecode.

    inputs: "ids" (1,) int64 when the step starts at the embedding (`embedding` given), else "x"
    (1, n_embd) float32; "pos" (1,) int64; "cells" (len(layers),) int64, the token's cell in each
    layer's cache. key: each layer's attended cache length. Returns (x, or the logits when `head`
    (output_norm host vector, output weight) is given; the experts each MoE layer picked,
    (n_moe_layers, k) int64, or None)."""

    def __init__(self, backend: CudaBackend, hp, plan, layers: range, layer_tensors, kv_layers, vectors,
                 embedding: Weight | None = None, head=None):
        self.rt, self.hp, self.plan, self.layers = backend.runtime, hp, plan, layers
        self.exact = not backend.round_inputs
        self.round_queries = backend.round_inputs and hp.n_embd_head_k % 32 == 0
        self.weights = [layer_tensors[il] for il in layers]
        self.kv = [kv_layers[il] for il in layers]
        # a quantized cache holds Hadamard-rotated heads: each block size's matrix on the device
        self.rotations = [rotation_for(hp.n_embd_head_k, hp.n_embd_head_v, kv.layout.type_k, kv.layout.type_v)
                          for kv in self.kv]
        blocks = {b for r in self.rotations for b in (r.k_block, r.v_block) if b}
        self.hadamard = {b: self.rt.upload(hadamard(b)) for b in blocks}
        # 1-D tensors (norms, biases; activations of the backend's namespace) as runtime arrays, once
        to_runtime = backend.memory.to_runtime
        self.vectors = [{name: to_runtime(t) for name, t in lt.tensors.items() if not isinstance(t, Weight)}
                        for lt in self.weights]
        self.freq_factors = {name: self.rt.upload(np.ascontiguousarray(v, np.float32)) for name, v in vectors.items()}
        self.embedding = embedding
        self.head = None if head is None else (self.rt.upload(np.ascontiguousarray(head[0], np.float32)), head[1])
        self.moe_layers = [il for il in layers if plan.blocks[il].routing is not None]

    # --- the step ---------------------------------------------------------------------------------

    def __call__(self, key, inputs):
        rt, pos = self.rt, inputs["pos"]
        x = self._embed(inputs["ids"]) if self.embedding is not None else inputs["x"]
        tables: dict = {}
        routed = None
        if self.moe_layers:
            k = self.plan.blocks[self.moe_layers[0]].routing.n_expert_used
            routed = rt.alloc((len(self.moe_layers), k), np.int64)
        for i, il in enumerate(self.layers):
            x = self._block(i, il, x, pos, inputs["cells"][i:i + 1], key[i], tables, routed)
        return (self._logits(x) if self.head is not None else x), routed

    def _embed(self, ids):
        w = self.embedding
        x = ops.get_rows(self.rt, w.data, ids, w.type_name, w.n_cols)
        return ops.scale(self.rt, x, self.plan.embed_scale) if self.plan.embed_scale != 1.0 else x

    def _logits(self, x):
        norm, w = self.head
        logits = self._mv(ops.rms_norm(self.rt, x, norm, self.hp.rms_eps), w)
        cap = self.plan.logit_softcap
        return ops.softcap(self.rt, logits, cap) if cap else logits

    def _mv(self, x, w):
        return ops.matvec(self.rt, x, w.data, w.type_name, w.n_cols, exact=self.exact)

    def _project(self, h, i: int, name: str):
        y = self._mv(h, self.weights[i].get(name))
        bias = self.vectors[i].get(f"{name}.bias")
        return y if bias is None else ops.add(self.rt, y, bias.reshape(y.shape))

    def _block(self, i: int, il: int, x, pos, cell, n_attend: int, tables: dict, routed):
        rt, hp, plan, vec = self.rt, self.hp, self.plan.blocks[il], self.vectors[i]
        eps = hp.rms_eps
        h = ops.rms_norm(rt, x, vec["attn_norm"], eps)
        out = self._attention(i, il, h, pos, cell, n_attend, plan, tables)
        if plan.post_norms:
            out = ops.rms_norm(rt, out, vec["post_attention_norm"], eps)
        x = ops.add(rt, x, out)
        h = ops.rms_norm(rt, x, vec["ffn_norm"], eps)
        out = self._experts(i, il, h, plan, routed) if plan.routing is not None else self._ffn(i, h, plan)
        if plan.post_norms:
            out = ops.rms_norm(rt, out, vec["post_ffw_norm"], eps)
        return ops.add(rt, x, out)

    def _attention(self, i: int, il: int, h, pos, cell, n_attend: int, plan, tables: dict):
        rt, hp, vec, kv = self.rt, self.hp, self.vectors[i], self.kv[i]
        n_head_kv = hp.n_head_kv[il]
        q = self._project(h, i, "attn_q").reshape(1, hp.n_head, hp.n_embd_head_k)
        k = self._project(h, i, "attn_k").reshape(1, n_head_kv, hp.n_embd_head_k)
        v = self._project(h, i, "attn_v")
        if plan.qk_norm:
            q = ops.rms_norm(rt, q, vec["attn_q_norm"], hp.rms_eps)
            k = ops.rms_norm(rt, k, vec["attn_k_norm"], hp.rms_eps)
        cos, sin = self._rope_table(pos, plan.rope, tables)
        q, k = ops.rope(rt, q, cos, sin, plan.rope.neox), ops.rope(rt, k, cos, sin, plan.rope.neox)
        if plan.q_scale != 1.0:
            q = ops.scale(rt, q, plan.q_scale)
        layout = kv.layout
        rotation = self.rotations[i]
        if rotation.k_block:        # rotated as UBatch.attend rotates them
            q, k = self._rotated(q, rotation.k_block), self._rotated(k, rotation.k_block)
        if rotation.v_block:
            v = self._rotated(v, rotation.v_block)
        if self.round_queries and is_quantized(layout.type_k):      # CudaBackend.attend
            q = ops.round_q8_1(rt, q)
        ops.store_rows(rt, k.reshape(1, -1), kv.k, cell, layout.type_k)
        ops.store_rows(rt, v, kv.v, cell, layout.type_v)
        ops.store_positions(rt, kv.cell_pos, cell, pos)
        a = ops.attention(rt, q, kv.k, kv.v, kv.cell_pos, pos, n_attend, n_head_kv, layout.type_k, layout.type_v,
                          plan.kq_scale, MASK_KIND[hp.attention_kind(il)], hp.attention_window)
        if rotation.v_block:
            a = self._rotated(a, rotation.v_block)
        return self._mv(a, self.weights[i].attn_output)

    def _rotated(self, x, block: int):
        return ops.rotate_blocks(self.rt, x, self.hadamard[block])

    def _rope_table(self, pos, rope, tables: dict):
        """cos and sin of this token, built once per step for each rope the layers use."""
        if rope not in tables:
            s = rope.scaling
            corr = (yarn_corr_dims(rope.n_dims, s.n_ctx_orig, rope.base, s.beta_fast, s.beta_slow)
                    if s.ext_factor else (0.0, 0.0))
            tables[rope] = ops.rope_cos_sin(self.rt, pos, rope.n_dims, rope.base, s.freq_scale, s.ext_factor,
                                            s.attn_factor, corr, self.freq_factors.get(rope.freq_factors))
        return tables[rope]

    def _ffn(self, i: int, h, plan):
        lw = self.weights[i]
        gated = GATED_ACTIVATIONS[plan.activation](self.rt, self._mv(h, lw.ffn_gate), self._mv(h, lw.ffn_up))
        return self._mv(gated, lw.ffn_down)

    def _experts(self, i: int, il: int, h, plan, routed):
        """The router and the experts it picks, all on the device (llama.cpp build_moe_ffn)."""
        rt, lw, r = self.rt, self.weights[i], plan.routing
        bias = self.vectors[i].get("exp_probs_b.bias")
        ids, weights = ops.moe_route(rt, self._mv(h, lw.ffn_gate_inp), r.n_expert_used, r.gating, r.select_on_logits,
                                     bias, r.n_groups, r.n_groups_used, r.norm_weights, r.weights_scale)
        chosen = ids.reshape(-1)
        gate, up = (ops.expert_matvec(rt, h, w.data, chosen, w.type_name, w.n_cols, self.exact)
                    for w in (lw.ffn_gate_exps, lw.ffn_up_exps))
        gated = GATED_ACTIVATIONS[plan.activation](rt, gate, up)
        down = lw.ffn_down_exps
        y = ops.expert_matvec(rt, gated, down.data, chosen, down.type_name, down.n_cols, self.exact)
        rt.copy_into(routed[self.moe_layers.index(il)], chosen)
        return ops.moe_combine(rt, y, ids, weights)


def decode_blocker(plan, hp, layers: range, kv_layers) -> str | None:
    """Why the kernels-only step cannot run `layers` (what it has no kernel for), or None."""
    if plan is None:
        return f"the {hp.arch} family has no one-token decode plan (engine.arch.decode_plan)"
    for il in layers:
        layout, block = kv_layers[il].layout, plan.blocks[il]
        for type_name in (layout.type_k, layout.type_v):
            if type_name not in ops.STORED_ON_DEVICE:
                return f"a {type_name} KV cache is quantized on the host, which a CUDA graph cannot hold"
        if block.routing is not None and block.routing.weight_before_ffn:
            return f"layer {il} weights its experts' inputs, which the graph step has no kernel for"
        if block.activation not in GATED_ACTIVATIONS:
            return f"layer {il}'s {block.activation} has no kernel in the graph step"
        if max(hp.n_embd_head_k, hp.n_embd_head_v) > ops.MAX_HEAD_DIM or not layout.n_v:
            return f"layer {il}'s attention shape is not one the graph step covers"
    return None

