"""deepseek2: DeepSeek-V2/V2.5/V3/R1. Multi-head latent attention (MLA), leading dense blocks,
shared experts, softmax or sigmoid gating with a selection bias and grouped top-k, yarn rope.

Forward (llama.cpp src/models/deepseek2.cpp), absorbed MLA: q = q_b(norm(q_a(x))) per head
[nope | rope]; kv_a_mqa(x) = [latent | k_rope], the latent RMS-normed; NORM rope on the rope
parts only. The nope part of q is absorbed through attn_k_b into latent space, so attention is
multi-query over cached [latent | k_rope] keys whose values are the latent itself; attn_v_b
then maps each head's result back out. Files with the unsplit attn_kv_b decompress K and V
per head instead (plain multi-head attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

from gguf.constants import Keys

from engine.arch.base import (HyperParams, Metadata, TensorSpec, blk, dense_ffn_tensors, global_tensors,
                              norm_tensor, routed_expert_tensors, shared_expert_tensors)
from engine.arch.layers import RopeScaling, Routing, feed_forward, namespace, routed_and_shared_experts


class GatingFunc(IntEnum):      # llama.cpp's llama_expert_gating_func_type
    NONE = 0
    SOFTMAX = 1
    SIGMOID = 2


@dataclass(frozen=True)
class DeepSeek2HyperParams(HyperParams):
    n_layer_dense_lead: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    n_embd_head_k_mla: int = 0      # nope + rope per head, after decompression
    n_embd_head_v_mla: int = 0
    is_mla: bool = False            # both *_length_mla keys present: the absorbed form is cached
    n_expert_shared: int = 0
    n_expert_groups: int = 0
    n_group_used: int = 0
    expert_weights_scale: float = 1.0
    expert_weights_norm: bool = False
    expert_gating_func: GatingFunc = GatingFunc.SOFTMAX
    rope_yarn_log_mul: float = 0.0

    @property
    def n_embd_head_qk_nope(self) -> int:
        return self.n_embd_head_k_mla - self.n_rot

    def n_embd_k_gqa(self, il: int) -> int:
        if self.is_mla:
            return self.kv_lora_rank + self.n_rot     # the latent and the rope part of the key
        return super().n_embd_k_gqa(il)

    def n_embd_v_gqa(self, il: int) -> int:
        return 0 if self.is_mla else super().n_embd_v_gqa(il)   # with MLA, V is a view of the cached latent

    def is_moe_layer(self, il: int) -> bool:
        return il >= self.n_layer_dense_lead and self.n_expert > 0


def _is_lite(n_layer: int, n_vocab: int) -> bool:
    # the lite variants (DeepSeek-V2-Lite and kin) have no q_lora; llama.cpp tells them by shape
    return n_layer in (26, 27) or (n_layer == 48 and n_vocab == 128256)


def hyperparams(md) -> DeepSeek2HyperParams:
    fields = HyperParams.common_fields(md)
    m = Metadata(md)
    n_layer, n_vocab = fields["n_layer"], fields["n_vocab"]
    k_mla = int(m.get(Keys.Attention.KEY_LENGTH_MLA, 0))
    v_mla = int(m.get(Keys.Attention.VALUE_LENGTH_MLA, 0))
    is_mla = k_mla > 0 and v_mla > 0
    gating = GatingFunc(int(m.get(Keys.LLM.EXPERT_GATING_FUNC, 0)))
    if gating == GatingFunc.NONE:
        # DeepSeek V2/V2.5 GGUFs predate the key (GLM 4.7 Lite, shaped 47/48 layers x 154880, is sigmoid)
        gating = GatingFunc.SIGMOID if n_layer in (47, 48) and n_vocab == 154880 else GatingFunc.SOFTMAX
    log_mul = float(m.get(Keys.Rope.SCALING_YARN_LOG_MUL, 0.0) or 0.0)
    return DeepSeek2HyperParams(
        **fields,
        n_layer_dense_lead=int(m.get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0)),
        q_lora_rank=0 if _is_lite(n_layer, n_vocab) else int(m.get(Keys.Attention.Q_LORA_RANK, 0)),
        kv_lora_rank=int(m.require(Keys.Attention.KV_LORA_RANK)),
        # without the MLA keys, key/value_length are the decompressed per-head sizes
        n_embd_head_k_mla=k_mla if is_mla else fields["n_embd_head_k"],
        n_embd_head_v_mla=v_mla if is_mla else fields["n_embd_head_v"],
        is_mla=is_mla,
        n_expert_shared=int(m.get(Keys.LLM.EXPERT_SHARED_COUNT, 0)),
        n_expert_groups=int(m.get(Keys.LLM.EXPERT_GROUP_COUNT, 0)),
        n_group_used=int(m.get(Keys.LLM.EXPERT_GROUP_USED_COUNT, 0)),
        expert_weights_scale=float(m.get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0) or 1.0),
        expert_weights_norm=bool(m.get(Keys.LLM.EXPERT_WEIGHTS_NORM, False)),
        expert_gating_func=gating,
        # the converter stores 0.1 * the multiplier; llama.cpp divides the 0.1 back out
        rope_yarn_log_mul=log_mul / 0.1 if log_mul else 0.0,
    )


def attention_specs(hp: DeepSeek2HyperParams, il: int, unsplit_kv_b: bool) -> list[TensorSpec]:
    q_dim = hp.n_head * hp.n_embd_head_k_mla
    nope = hp.n_embd_head_qk_nope
    specs = [norm_tensor(il, "attn_norm", hp.n_embd), norm_tensor(il, "attn_kv_a_norm", hp.kv_lora_rank)]
    if hp.q_lora_rank:
        specs += [norm_tensor(il, "attn_q_a_norm", hp.q_lora_rank),
                  TensorSpec(blk(il, "attn_q_a"), (hp.q_lora_rank, hp.n_embd)),
                  TensorSpec(blk(il, "attn_q_b"), (q_dim, hp.q_lora_rank))]
    else:
        specs.append(TensorSpec(blk(il, "attn_q"), (q_dim, hp.n_embd)))
    specs.append(TensorSpec(blk(il, "attn_kv_a_mqa"), (hp.kv_lora_rank + hp.n_rot, hp.n_embd)))
    if unsplit_kv_b:
        specs.append(TensorSpec(blk(il, "attn_kv_b"), (hp.n_head * (nope + hp.n_embd_head_v_mla), hp.kv_lora_rank)))
    else:
        specs += [TensorSpec(blk(il, "attn_k_b"), (hp.n_head, hp.kv_lora_rank, nope)),
                  TensorSpec(blk(il, "attn_v_b"), (hp.n_head, hp.n_embd_head_v_mla, hp.kv_lora_rank))]
    specs.append(TensorSpec(blk(il, "attn_output"), (hp.n_embd, hp.n_head * hp.n_embd_head_v_mla)))
    return specs


def tensor_specs(hp: DeepSeek2HyperParams, tied_output: bool = False) -> list[TensorSpec]:
    specs = global_tensors(hp, tied_output)
    for il in range(hp.n_layer):
        specs += attention_specs(hp, il, unsplit_kv_b=not hp.is_mla)
        specs.append(norm_tensor(il, "ffn_norm", hp.n_embd))
        if hp.is_moe_layer(il):
            specs += routed_expert_tensors(hp, il)
            specs.append(TensorSpec(f"blk.{il}.exp_probs_b.bias", (hp.n_expert,), optional=True))
            specs += shared_expert_tensors(hp, il, hp.n_ff_exp * hp.n_expert_shared)
        else:
            specs += dense_ffn_tensors(hp, il)
    return specs


# --- forward ----------------------------------------------------------------------------------


def forward_layer(m, il: int, x, batch):
    lw, eps, ops = m.layers[il], m.hparams.rms_eps, m.ops
    h = x + attention(m, il, ops.rms_norm(x, lw.attn_norm, eps), batch)
    return h + feed_forward_block(m, il, ops.rms_norm(h, lw.ffn_norm, eps))


def rope_scaling(md, hp: DeepSeek2HyperParams) -> RopeScaling:
    """The model's rope scaling (computed once, by the model): YaRN with DeepSeek's mscale."""
    return RopeScaling.from_metadata(md, hp, yarn_mscale_is_log_mul=True, yarn_log_mul=hp.rope_yarn_log_mul)


def kq_scale(hp: DeepSeek2HyperParams, scaling: RopeScaling) -> float:
    """mscale^2 / sqrt(key length): the YaRN magnitude moved from rope into the scores."""
    log_inv_scale = math.log(1.0 / scaling.freq_scale)
    attn_factor_org = scaling.attn_factor * (1.0 + 0.1 * log_inv_scale)
    mscale = attn_factor_org * (1.0 + 0.1 * hp.rope_yarn_log_mul * log_inv_scale)
    return mscale * mscale / math.sqrt(hp.n_embd_head_k_mla)


def attention(m, il: int, x, batch):
    hp, lw, ops, xp = m.hparams, m.layers[il], m.ops, namespace(x)
    n_tokens, n_head, n_nope, kv_lora = x.shape[0], hp.n_head, hp.n_embd_head_qk_nope, hp.kv_lora_rank
    if hp.q_lora_rank:
        q = ops.matmul(ops.rms_norm(ops.matmul(x, lw.attn_q_a), lw.attn_q_a_norm, hp.rms_eps), lw.attn_q_b)
    else:
        q = ops.matmul(x, lw.attn_q)
    q = xp.reshape(q, (n_tokens, n_head, hp.n_embd_head_k_mla))    # per head [nope | rope]
    kv = ops.matmul(x, lw.attn_kv_a_mqa)                            # (T, kv_lora + n_rot)
    latent = ops.rms_norm(kv[:, :kv_lora], lw.attn_kv_a_norm, hp.rms_eps)
    q_rope, k_rope = batch.rope_qk(q[..., n_nope:], kv[:, None, kv_lora:], hp.n_rot, hp.rope_freq_base,
                                   m.rope_scaling, neox=False)                     # k_rope (T, 1, n_rot)
    scale = kq_scale(hp, m.rope_scaling)
    if hp.is_mla:
        q_latent = ops.head_matmul(q[..., :n_nope], lw.attn_k_b)                  # (T, n_head, kv_lora)
        q = xp.concat([q_latent, q_rope], axis=-1)
        k = xp.concat([latent[:, None, :], k_rope], axis=-1)                       # (T, 1, kv_lora + n_rot)
        out = batch.attend(il, q, k, None, scale, v_from_k=kv_lora)                # (T, n_head * kv_lora)
        out = ops.head_matmul(xp.reshape(out, (n_tokens, n_head, kv_lora)), lw.attn_v_b)
    else:
        kv_b = xp.reshape(ops.matmul(latent, lw.attn_kv_b), (n_tokens, n_head, n_nope + hp.n_embd_head_v_mla))
        q = xp.concat([q[..., :n_nope], q_rope], axis=-1)
        k = xp.concat([kv_b[..., :n_nope], xp.broadcast_to(k_rope, (n_tokens, n_head, hp.n_rot))], axis=-1)
        out = batch.attend(il, q, k, kv_b[..., n_nope:], scale)
    return ops.matmul(xp.reshape(out, (n_tokens, -1)), lw.attn_output)


def feed_forward_block(m, il: int, x):
    hp, lw = m.hparams, m.layers[il]
    if not hp.is_moe_layer(il):
        return feed_forward(m.ops, x, lw.ffn_gate, lw.ffn_up, lw.ffn_down)
    routing = Routing(hp.n_expert_used, gating="sigmoid" if hp.expert_gating_func == GatingFunc.SIGMOID else "softmax",
                      norm_weights=hp.expert_weights_norm, weights_scale=hp.expert_weights_scale,
                      n_groups=hp.n_expert_groups, n_groups_used=hp.n_group_used)
    return routed_and_shared_experts(m.ops, x, lw, routing, m.expert_counts[il])
