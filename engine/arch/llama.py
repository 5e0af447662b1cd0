"""llama: Llama 1-3 dense models and Mixtral-style MoE (llama with n_expert > 0).

Forward (llama.cpp src/models/llama.cpp): RMSNorm, GQA attention with NORM rope (Llama 3's
rope_freqs dividing the frequencies when present), SwiGLU FFN; a MoE layer routes with a
softmax over all experts, keeps the top k and renormalises their weights (Mixtral).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.arch import layers
from engine.arch.base import (HyperParams, TensorSpec, attention_tensors, blk, dense_ffn_tensors,
                              global_tensors, norm_tensor, routed_expert_tensors)
from engine.arch.layers import Routing, moe_feed_forward, qkv_projections, rms_norm


@dataclass(frozen=True)
class LlamaHyperParams(HyperParams):
    pass


def hyperparams(md) -> LlamaHyperParams:
    return LlamaHyperParams.from_metadata(md)


def tensor_specs(hp: LlamaHyperParams, tied_output: bool = False) -> list[TensorSpec]:
    specs = global_tensors(hp, tied_output)
    specs.append(TensorSpec("rope_freqs.weight", (hp.n_rot // 2,), optional=True))
    for il in range(hp.n_layer):
        specs += attention_tensors(hp, il)
        specs.append(norm_tensor(il, "ffn_norm", hp.n_embd))
        specs += routed_expert_tensors(hp, il) if hp.n_expert else dense_ffn_tensors(hp, il)
    return specs


# --- forward ----------------------------------------------------------------------------------


def forward_layer(m, il: int, x, batch):
    lw, eps = m.layers[il], m.hparams.rms_eps
    h = x + attention(m, il, rms_norm(x, lw.attn_norm, eps), batch)
    return h + feed_forward(m, il, rms_norm(h, lw.ffn_norm, eps))


def attention(m, il: int, x, batch):
    hp, lw = m.hparams, m.layers[il]
    q, k, v = qkv_projections(m.ops, x, lw, hp.n_head, hp.n_head_kv[il], hp.n_embd_head_k, hp.n_embd_head_v)
    rope_freqs = m.tensor("rope_freqs.weight")
    q = batch.rope(q, hp.n_rot, hp.rope_freq_base, m.rope_scaling, neox=False, freq_factors=rope_freqs)
    k = batch.rope(k, hp.n_rot, hp.rope_freq_base, m.rope_scaling, neox=False, freq_factors=rope_freqs)
    out = batch.attend(il, q, k, v, kq_scale=1.0 / math.sqrt(hp.n_embd_head_k))
    return m.ops.matmul(out, lw.attn_output)


def feed_forward(m, il: int, x):
    hp, lw = m.hparams, m.layers[il]
    if hp.n_expert:
        routing = Routing(hp.n_expert_used, gating="softmax", norm_weights=True)
        return moe_feed_forward(m.ops, x, lw, routing, m.expert_counts[il])
    return layers.feed_forward(m.ops, x, lw.ffn_gate, lw.ffn_up, lw.ffn_down)


__all__ = ["LlamaHyperParams", "hyperparams", "tensor_specs", "blk", "forward_layer"]
