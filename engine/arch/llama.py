"""llama: Llama 1-3 dense models, Mixtral-style MoE (llama with n_expert > 0), and the qwen2,
qwen3 and qwen3moe flags of the same block.

Forward (llama.cpp src/models/llama.cpp, qwen2.cpp, qwen3.cpp, qwen3moe.cpp): RMSNorm, GQA
attention with rope (NORM pairs for llama, with Llama 3's rope_freqs dividing the frequencies
when present; NEOX halves for the qwens, llama_model_rope_type), q/k/v biases (qwen2), per-head
q/k RMSNorm before rope (qwen3, qwen3moe), SwiGLU FFN; a MoE layer routes with a softmax over
all experts, keeps the top k and renormalises their weights (Mixtral, qwen3moe, whose experts
are expert_feed_forward_length wide).

    h = x + attention(attn_norm(x))
    return h + ffn(ffn_norm(h))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.arch import layers
from engine.arch.base import (HyperParams, RopeType, TensorSpec, attention_tensors, blk, dense_ffn_tensors,
                              global_tensors, norm_tensor, routed_expert_tensors)
from engine.arch.layers import Routing, moe_feed_forward, qkv_projections

# the variants: rope type (llama_model_rope_type), per-head q/k norms, q/k/v biases
VARIANTS = {
    "llama": (RopeType.NORM, False, False),
    "qwen2": (RopeType.NEOX, False, True),
    "qwen3": (RopeType.NEOX, True, False),
    "qwen3moe": (RopeType.NEOX, True, False),
}


@dataclass(frozen=True)
class LlamaHyperParams(HyperParams):
    qk_norm: bool = False       # RMSNorm of each head of q and k before rope
    qkv_bias: bool = False      # attn_q/k/v carry biases


def hyperparams(md) -> LlamaHyperParams:
    fields = HyperParams.common_fields(md)
    rope_type, qk_norm, qkv_bias = VARIANTS[fields["arch"]]
    return LlamaHyperParams(**fields, rope_type=rope_type, qk_norm=qk_norm, qkv_bias=qkv_bias)


def tensor_specs(hp: LlamaHyperParams, tied_output: bool = False) -> list[TensorSpec]:
    specs = global_tensors(hp, tied_output)
    specs.append(TensorSpec("rope_freqs.weight", (hp.n_rot // 2,), optional=True))
    for il in range(hp.n_layer):
        specs += attention_tensors(hp, il, qk_norm=hp.qk_norm, bias=hp.qkv_bias)
        specs.append(norm_tensor(il, "ffn_norm", hp.n_embd))
        specs += routed_expert_tensors(hp, il) if hp.n_expert else dense_ffn_tensors(hp, il)
    return specs


# --- forward ----------------------------------------------------------------------------------


def forward_layer(m, il: int, x, batch):
    lw, eps, ops = m.layers[il], m.hparams.rms_eps, m.ops
    h = x + attention(m, il, ops.rms_norm(x, lw.attn_norm, eps), batch)
    return h + feed_forward(m, il, ops.rms_norm(h, lw.ffn_norm, eps))


def attention(m, il: int, x, batch):
    hp, lw, ops = m.hparams, m.layers[il], m.ops
    q, k, v = qkv_projections(ops, x, lw, hp.n_head, hp.n_head_kv[il], hp.n_embd_head_k, hp.n_embd_head_v)
    if hp.qk_norm:
        q = ops.rms_norm(q, lw.attn_q_norm, hp.rms_eps)
        k = ops.rms_norm(k, lw.attn_k_norm, hp.rms_eps)
    neox, rope_freqs = hp.rope_type is RopeType.NEOX, m.vector_here("rope_freqs.weight")
    q, k = batch.rope_qk(q, k, hp.n_rot, hp.rope_freq_base, m.rope_scaling, neox=neox, freq_factors=rope_freqs)
    out = batch.attend(il, q, k, v, kq_scale=1.0 / math.sqrt(hp.n_embd_head_k))
    return m.ops.matmul(out, lw.attn_output)


def feed_forward(m, il: int, x):
    hp, lw = m.hparams, m.layers[il]
    if hp.n_expert:
        routing = Routing(hp.n_expert_used, gating="softmax", norm_weights=True)
        return moe_feed_forward(m.ops, x, lw, routing, m.expert_counts[il])
    return layers.feed_forward(m.ops, x, lw.ffn_gate, lw.ffn_up, lw.ffn_down)


def decode_plan(m):
    """forward_layer as data, for a one-token step of kernels only (engine.arch.decode_plan)."""
    from engine.arch.decode_plan import BlockPlan, DecodePlan, RopePlan

    hp = m.hparams
    rope = RopePlan(hp.n_rot, hp.rope_freq_base, m.rope_scaling, hp.rope_type is RopeType.NEOX, "rope_freqs.weight")
    routing = Routing(hp.n_expert_used, gating="softmax", norm_weights=True) if hp.n_expert else None
    block = BlockPlan(rope, kq_scale=1.0 / math.sqrt(hp.n_embd_head_k), qk_norm=hp.qk_norm, routing=routing)
    return DecodePlan((block,) * hp.n_layer)


__all__ = ["LlamaHyperParams", "hyperparams", "tensor_specs", "blk", "forward_layer"]
