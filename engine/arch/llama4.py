"""llama4 (Scout/Maverick): MoE every interleave_moe_layer_step layers with a shared expert,
top-1 sigmoid routing, chunked attention in 3 of 4 layers and no rope in every 4th.

Forward (llama.cpp src/models/llama4.cpp): rope layers apply NORM rope with rope_freqs and then
a weightless RMS norm to q and k (Llama4TextL2Norm); the other layers skip rope and scale q by
the attention temperature. MoE layers rank experts by raw router logit, weight the chosen
expert's input by sigmoid(logit), and add a shared SwiGLU expert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gguf.constants import Keys

from engine.arch.base import (AttentionKind, HyperParams, Metadata, TensorSpec, attention_tensors,
                              dense_ffn_tensors, global_tensors, norm_tensor, routed_expert_tensors,
                              shared_expert_tensors, swa_layer_pattern)
from engine.arch.layers import Routing, feed_forward, namespace, qkv_projections, routed_and_shared_experts

DEFAULT_CHUNK = 8192
DEFAULT_PATTERN = 4
NO_ROPE_LAYER_STEP = 4      # llama_hparams::n_no_rope_layer_step
N_EXPERT_MAVERICK = 128


@dataclass(frozen=True)
class Llama4HyperParams(HyperParams):
    n_moe_layer_step: int = 1
    attention_chunk: int = DEFAULT_CHUNK      # 0: every layer global, all with rope
    chunked_layers: tuple[bool, ...] = ()
    attn_temp_floor_scale: int = DEFAULT_CHUNK
    attn_temp_scale: float = 0.1
    use_kq_norm: bool = True
    rope_freq_base_swa: float = 0.0     # chunked layers' rope base; 0: rope_freq_base

    def attention_kind(self, il: int) -> AttentionKind:
        return AttentionKind.CHUNKED if self.chunked_layers[il] else AttentionKind.FULL

    @property
    def attention_window(self) -> int:
        return self.attention_chunk

    def uses_rope(self, il: int) -> bool:
        # llama.cpp skips rope on every 4th layer; without chunking the step becomes n_layer,
        # which leaves only the last layer without rope
        step = NO_ROPE_LAYER_STEP if self.attention_chunk else self.n_layer
        return (il + 1) % step != 0

    def attention_temperature(self, positions):
        """Per-token q scale (n_tokens,) float32 of the no-rope layers (llm_graph_input_attn_temp,
        offset 1), on the device of the int64 positions."""
        xp = namespace(positions)
        floors = xp.floor((xp.astype(positions, xp.float64) + 1.0) / self.attn_temp_floor_scale)
        return xp.astype(xp.log(floors + 1.0) * self.attn_temp_scale + 1.0, xp.float32)

    def is_moe_layer(self, il: int) -> bool:
        return self.n_moe_layer_step > 0 and (il + 1) % self.n_moe_layer_step == 0


def hyperparams(md) -> Llama4HyperParams:
    fields = HyperParams.common_fields(md)
    m = Metadata(md)
    n_layer = fields["n_layer"]
    window = m.get(Keys.Attention.SLIDING_WINDOW)
    chunk = 0 if window == 0 else DEFAULT_CHUNK
    chunked = swa_layer_pattern(md, n_layer, DEFAULT_PATTERN) if chunk else (False,) * n_layer
    return Llama4HyperParams(
        **fields, n_moe_layer_step=int(m.get(Keys.LLM.INTERLEAVE_MOE_LAYER_STEP, 1)),
        attention_chunk=chunk, chunked_layers=chunked,
        use_kq_norm=fields["n_expert"] != N_EXPERT_MAVERICK,
        rope_freq_base_swa=float(m.get(Keys.Rope.FREQ_BASE_SWA, 0.0) or 0.0))


def tensor_specs(hp: Llama4HyperParams, tied_output: bool = False) -> list[TensorSpec]:
    specs = global_tensors(hp, tied_output)
    specs.append(TensorSpec("rope_freqs.weight", (hp.n_rot // 2,), optional=True))
    for il in range(hp.n_layer):
        specs += attention_tensors(hp, il)
        specs.append(norm_tensor(il, "ffn_norm", hp.n_embd))
        if hp.is_moe_layer(il):
            specs += routed_expert_tensors(hp, il) + shared_expert_tensors(hp, il, hp.n_ff_exp)
        else:
            specs += dense_ffn_tensors(hp, il)
    return specs


# --- forward ----------------------------------------------------------------------------------


def forward_layer(m, il: int, x, batch):
    lw, eps, ops = m.layers[il], m.hparams.rms_eps, m.ops
    h = x + attention(m, il, ops.rms_norm(x, lw.attn_norm, eps), batch)
    return h + feed_forward_block(m, il, ops.rms_norm(h, lw.ffn_norm, eps))


def attention(m, il: int, x, batch):
    hp, lw = m.hparams, m.layers[il]
    q, k, v = qkv_projections(m.ops, x, lw, hp.n_head, hp.n_head_kv[il], hp.n_embd_head_k, hp.n_embd_head_v)
    if hp.uses_rope(il):
        base = hp.rope_freq_base_swa if hp.chunked_layers[il] and hp.rope_freq_base_swa else hp.rope_freq_base
        rope_freqs = m.vector_here("rope_freqs.weight")
        q, k = batch.rope_qk(q, k, hp.n_rot, base, m.rope_scaling, neox=False, freq_factors=rope_freqs)
        if hp.use_kq_norm:
            q, k = m.ops.rms_norm(q, None, hp.rms_eps), m.ops.rms_norm(k, None, hp.rms_eps)
    else:
        q = q * hp.attention_temperature(batch.device_positions())[:, None, None]
    out = batch.attend(il, q, k, v, kq_scale=1.0 / math.sqrt(hp.n_embd_head_k))
    return m.ops.matmul(out, lw.attn_output)


def feed_forward_block(m, il: int, x):
    hp, lw = m.hparams, m.layers[il]
    if not hp.is_moe_layer(il):
        return feed_forward(m.ops, x, lw.ffn_gate, lw.ffn_up, lw.ffn_down)
    routing = Routing(hp.n_expert_used, gating="sigmoid", select_on_logits=True, weight_before_ffn=True)
    return routed_and_shared_experts(m.ops, x, lw, routing, m.expert_counts[il])
