"""qwen2, qwen3 and qwen3moe: NEOX rope; qwen2 has q/k/v biases, qwen3 per-head q/k norms,
qwen3moe routes over experts of width expert_feed_forward_length.

Forward (llama.cpp src/models/qwen2.cpp, qwen3.cpp, qwen3moe.cpp): as llama, with NEOX rope,
q/k RMSNorm per head before rope (qwen3), and softmax top-k routing with renormalised weights
(qwen3moe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.arch.base import (HyperParams, RopeType, TensorSpec, attention_tensors, dense_ffn_tensors,
                              global_tensors, norm_tensor, routed_expert_tensors)
# the FFN, dense or routed (softmax over all experts, top-k, renormalised), is llama's own
from engine.arch.llama import feed_forward
from engine.arch.layers import qkv_projections, rms_norm


@dataclass(frozen=True)
class QwenHyperParams(HyperParams):
    qk_norm: bool = False
    qkv_bias: bool = False


def hyperparams(md) -> QwenHyperParams:
    fields = HyperParams.common_fields(md)
    arch = fields["arch"]
    return QwenHyperParams(**fields, rope_type=RopeType.NEOX,
                           qk_norm=arch in ("qwen3", "qwen3moe"), qkv_bias=arch == "qwen2")


def tensor_specs(hp: QwenHyperParams, tied_output: bool = False) -> list[TensorSpec]:
    specs = global_tensors(hp, tied_output)
    for il in range(hp.n_layer):
        specs += attention_tensors(hp, il, qk_norm=hp.qk_norm, bias=hp.qkv_bias)
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
    if hp.qk_norm:
        q = rms_norm(q, lw.attn_q_norm, hp.rms_eps)
        k = rms_norm(k, lw.attn_k_norm, hp.rms_eps)
    q = batch.rope(q, hp.n_rot, hp.rope_freq_base, m.rope_scaling, neox=True)
    k = batch.rope(k, hp.n_rot, hp.rope_freq_base, m.rope_scaling, neox=True)
    out = batch.attend(il, q, k, v, kq_scale=1.0 / math.sqrt(hp.n_embd_head_k))
    return m.ops.matmul(out, lw.attn_output)

