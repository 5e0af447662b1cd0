"""gemma3: sliding-window layers in a 5:1 pattern, q/k norms, pre- and post-norms, GeGLU,
embeddings scaled by sqrt(n_embd), tied output.

Forward (llama.cpp src/models/gemma3.cpp): the embedding is scaled by sqrt(n_embd); each block
normalises q and k per head before NEOX rope (sliding layers with their own base and no
frequency scaling), scales q by attention_scale, and RMS-normalises the attention and GeGLU
outputs (post_attention_norm, post_ffw_norm) before adding them to the residual. The norm
weights already include gemma's +1. Logits may be soft-capped.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gguf.constants import Keys

from engine.arch import layers
from engine.arch.base import (AttentionKind, HyperParams, Metadata, RopeType, TensorSpec, attention_tensors,
                              dense_ffn_tensors, global_tensors, norm_tensor, swa_layer_pattern)
from engine.arch.layers import geglu, qkv_projections, softcap

DEFAULT_SWA_PATTERN = 6
DEFAULT_ROPE_BASE_SWA = 10000.0


@dataclass(frozen=True)
class Gemma3HyperParams(HyperParams):
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    rope_freq_base_swa: float = DEFAULT_ROPE_BASE_SWA
    final_logit_softcapping: float = 0.0
    attention_scale: float = 0.0

    def attention_kind(self, il: int) -> AttentionKind:
        return AttentionKind.SLIDING if self.swa_layers[il] else AttentionKind.FULL

    @property
    def attention_window(self) -> int:
        return self.sliding_window


def hyperparams(md) -> Gemma3HyperParams:
    fields = HyperParams.common_fields(md)
    m = Metadata(md)
    window = int(m.get(Keys.Attention.SLIDING_WINDOW, 0))
    n_layer = fields["n_layer"]
    swa = swa_layer_pattern(md, n_layer, DEFAULT_SWA_PATTERN) if window > 0 else (False,) * n_layer
    # gemma 27B scales q by the width per head rather than the key length (llama.cpp matches
    # gemma_pytorch's config here)
    head_for_scale = fields["n_embd"] // fields["n_head"] if n_layer == 62 else fields["n_embd_head_k"]
    return Gemma3HyperParams(
        **fields, rope_type=RopeType.NEOX, sliding_window=window, swa_layers=swa,
        rope_freq_base_swa=float(m.get(Keys.Rope.FREQ_BASE_SWA, DEFAULT_ROPE_BASE_SWA)),
        final_logit_softcapping=float(m.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 0.0) or 0.0),
        attention_scale=head_for_scale ** -0.5)


def tensor_specs(hp: Gemma3HyperParams, tied_output: bool = True) -> list[TensorSpec]:
    specs = global_tensors(hp, tied_output)
    for il in range(hp.n_layer):
        specs += attention_tensors(hp, il, qk_norm=True)
        specs += [norm_tensor(il, "post_attention_norm", hp.n_embd),
                  norm_tensor(il, "ffn_norm", hp.n_embd),
                  norm_tensor(il, "post_ffw_norm", hp.n_embd)]
        specs += dense_ffn_tensors(hp, il)
    return specs


# --- forward ----------------------------------------------------------------------------------


def embed(m, tokens):
    return m.embed_tokens(tokens) * math.sqrt(m.hparams.n_embd)


def forward_layer(m, il: int, x, batch):
    lw, eps, ops = m.layers[il], m.hparams.rms_eps, m.ops
    # h = x + post_attention_norm(attention(attn_norm(x))); out = h + post_ffw_norm(ffn(ffn_norm(h)))
    h = ops.add_rms_norm(x, attention(m, il, ops.rms_norm(x, lw.attn_norm, eps), batch), lw.post_attention_norm, eps)
    ffn_out = layers.feed_forward(ops, ops.rms_norm(h, lw.ffn_norm, eps), lw.ffn_gate, lw.ffn_up, lw.ffn_down, geglu)
    return ops.add_rms_norm(h, ffn_out, lw.post_ffw_norm, eps)


def attention(m, il: int, x, batch):
    hp, lw, ops = m.hparams, m.layers[il], m.ops
    q, k, v = qkv_projections(ops, x, lw, hp.n_head, hp.n_head_kv[il], hp.n_embd_head_k, hp.n_embd_head_v)
    q = ops.rms_norm(q, lw.attn_q_norm, hp.rms_eps)
    k = ops.rms_norm(k, lw.attn_k_norm, hp.rms_eps)
    if hp.swa_layers[il]:       # llama_model::get_rope_freq_base/scale for sliding layers
        base, scaling = hp.rope_freq_base_swa, dataclasses.replace(m.rope_scaling, freq_scale=1.0)
    else:
        base, scaling = hp.rope_freq_base, m.rope_scaling
    q, k = batch.rope_qk(q, k, hp.n_rot, base, scaling, neox=hp.rope_type is RopeType.NEOX, q_scale=hp.attention_scale)
    out = batch.attend(il, q, k, v, kq_scale=1.0)
    return m.ops.matmul(out, lw.attn_output)


def output(m, x):
    logits = m.output_logits(x)
    cap = m.hparams.final_logit_softcapping
    return softcap(logits, cap) if cap else logits


def decode_plan(m):
    """forward_layer, embed and output as data, for a one-token step of kernels only
    (engine.arch.decode_plan)."""
    from engine.arch.decode_plan import BlockPlan, DecodePlan, RopePlan

    hp = m.hparams

    def block(il: int) -> BlockPlan:
        if hp.swa_layers[il]:
            rope = RopePlan(hp.n_rot, hp.rope_freq_base_swa, dataclasses.replace(m.rope_scaling, freq_scale=1.0), True)
        else:
            rope = RopePlan(hp.n_rot, hp.rope_freq_base, m.rope_scaling, True)
        return BlockPlan(rope, kq_scale=1.0, q_scale=hp.attention_scale, qk_norm=True, post_norms=True,
                         activation="geglu")
    return DecodePlan(tuple(block(il) for il in range(hp.n_layer)), embed_scale=math.sqrt(hp.n_embd),
                      logit_softcap=hp.final_logit_softcapping)
