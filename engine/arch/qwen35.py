"""qwen35moe, qwen35 and qwen3next: hybrid models where three of every four layers are a Gated
DeltaNet (linear attention with a recurrent state) and the rest gated full attention.

Forward (llama.cpp src/models/qwen35moe.cpp, qwen35.cpp, qwen3next.cpp):

    h = x + mixer(attn_norm(x))            mixer: DeltaNet (engine.arch.delta_net) or gated attention
    return h + ffn(post_attention_norm(h))

Gated attention: attn_q gives per head [q | gate]; per-head RMSNorm of q and k; rope on the first
n_rot dims only, NEOX pairs (IMROPE sections for qwen35*, which for text positions rotate every
pair whose section is one of the first three); softmax attention times sigmoid(gate).
The FFN of qwen35moe/qwen3next is a softmax top-k router with renormalised weights plus a shared
expert scaled by sigmoid(ffn_gate_inp_shexp . x); qwen35 has a dense SwiGLU FFN.
Flags, not files: qwen3next reads beta/alpha from one `ssm_ba` tensor and maps value head h to
key head h // (Hv/Hk); qwen35* have separate ssm_beta/ssm_alpha and tile the key heads (h % Hk).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf.constants import Keys

from engine.arch import delta_net, layers
from engine.arch.base import (HyperParamError, HyperParams, Metadata, RopeType, TensorSpec, blk,
                              dense_ffn_tensors, global_tensors, norm_tensor, routed_expert_tensors,
                              shared_expert_tensors)
from engine.arch.layers import Routing, moe_feed_forward, namespace, rms_norm, sigmoid

RECURRENT_LAYERS_KEY = "{arch}.attention.recurrent_layers"     # llama.cpp LLM_KV_ATTENTION_RECURRENT_LAYERS


@dataclass(frozen=True)
class Qwen35HyperParams(HyperParams):
    ssm_d_conv: int = 4             # conv kernel K
    ssm_d_inner: int = 0            # value heads x head size
    ssm_d_state: int = 0            # head size d of q, k and v
    ssm_dt_rank: int = 0            # value heads Hv
    ssm_n_group: int = 0            # key heads Hk
    recurrent: tuple[bool, ...] = ()
    rope_sections: tuple[int, ...] = ()   # empty: plain NEOX (qwen3next)
    n_ff_shexp: int = 0
    grouped_heads: bool = False     # value head h reads key head h // (Hv/Hk) (qwen3next), else h % Hk
    joint_beta_alpha: bool = False  # one ssm_ba tensor (qwen3next)

    def is_recurrent(self, il: int) -> bool:
        return self.recurrent[il]

    def n_embd_k_gqa(self, il: int) -> int:
        return 0 if self.recurrent[il] else super().n_embd_k_gqa(il)     # no KV cache on DeltaNet layers

    def n_embd_v_gqa(self, il: int) -> int:
        return 0 if self.recurrent[il] else super().n_embd_v_gqa(il)

    @property
    def conv_channels(self) -> int:
        """attn_qkv's width: q and k (Hk heads each) and v (Hv heads)."""
        return self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state

    def n_embd_r(self) -> int:
        """Conv state values per sequence and layer (llama_hparams::n_embd_r)."""
        return (self.ssm_d_conv - 1) * self.conv_channels

    def n_embd_s(self) -> int:
        """Delta-rule state values per sequence and layer: Hv states of d x d (llama_hparams::n_embd_s)."""
        return self.ssm_d_state * self.ssm_d_inner

    def is_moe_layer(self, il: int) -> bool:
        return self.n_expert > 0


def recurrent_layers(m: Metadata, n_layer: int) -> tuple[bool, ...]:
    """attention.recurrent_layers when present, else every layer but each interval-th."""
    flags = m.get(RECURRENT_LAYERS_KEY)
    if flags is not None:
        if len(flags) != n_layer:
            raise HyperParamError(f"{m.key(RECURRENT_LAYERS_KEY)} has {len(flags)} values for {n_layer} layers")
        return tuple(bool(f) for f in flags)
    interval = int(m.get(Keys.LLM.FULL_ATTENTION_INTERVAL, 4))
    return tuple((il + 1) % interval != 0 for il in range(n_layer))


def hyperparams(md) -> Qwen35HyperParams:
    fields = HyperParams.common_fields(md)
    m = Metadata(md)
    arch, n_layer = fields["arch"], fields["n_layer"]
    hp = Qwen35HyperParams(
        **fields, rope_type=RopeType.NEOX,
        ssm_d_conv=int(m.require(Keys.SSM.CONV_KERNEL)),
        ssm_d_inner=int(m.require(Keys.SSM.INNER_SIZE)),
        ssm_d_state=int(m.require(Keys.SSM.STATE_SIZE)),
        ssm_dt_rank=int(m.require(Keys.SSM.TIME_STEP_RANK)),
        ssm_n_group=int(m.require(Keys.SSM.GROUP_COUNT)),
        recurrent=recurrent_layers(m, n_layer),
        rope_sections=tuple(int(s) for s in m.get(Keys.Rope.DIMENSION_SECTIONS, ())) if arch != "qwen3next" else (),
        n_ff_shexp=int(m.get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0)),
        grouped_heads=arch == "qwen3next",
        joint_beta_alpha=arch == "qwen3next",
    )
    if hp.ssm_dt_rank % max(1, hp.ssm_n_group) or hp.ssm_d_inner != hp.ssm_dt_rank * hp.ssm_d_state:
        raise HyperParamError(f"{arch}: {hp.ssm_dt_rank} value heads of {hp.ssm_d_state} must fill ssm.inner_size "
                              f"{hp.ssm_d_inner} and be a multiple of the {hp.ssm_n_group} key heads")
    return hp


# --- tensors ------------------------------------------------------------------------------------


def delta_net_tensors(hp: Qwen35HyperParams, il: int) -> list[TensorSpec]:
    n_v_heads, d_inner = hp.ssm_dt_rank, hp.ssm_d_inner
    specs = [TensorSpec(blk(il, "attn_qkv"), (hp.conv_channels, hp.n_embd)),
             TensorSpec(blk(il, "attn_gate"), (d_inner, hp.n_embd)),
             TensorSpec(blk(il, "ssm_conv1d"), (hp.conv_channels, hp.ssm_d_conv)),
             TensorSpec(f"blk.{il}.ssm_dt.bias", (n_v_heads,)),
             TensorSpec(f"blk.{il}.ssm_a", (n_v_heads,)),
             norm_tensor(il, "ssm_norm", hp.ssm_d_state),
             TensorSpec(blk(il, "ssm_out"), (hp.n_embd, d_inner))]
    if hp.joint_beta_alpha:
        specs.append(TensorSpec(blk(il, "ssm_ba"), (2 * n_v_heads, hp.n_embd)))
    else:
        specs += [TensorSpec(blk(il, "ssm_beta"), (n_v_heads, hp.n_embd)),
                  TensorSpec(blk(il, "ssm_alpha"), (n_v_heads, hp.n_embd))]
    return specs


def gated_attention_tensors(hp: Qwen35HyperParams, il: int) -> list[TensorSpec]:
    head = hp.n_embd_head_k
    return [TensorSpec(blk(il, "attn_q"), (2 * head * hp.n_head, hp.n_embd)),     # per head [q | gate]
            TensorSpec(blk(il, "attn_k"), (hp.n_embd_k_gqa(il), hp.n_embd)),
            TensorSpec(blk(il, "attn_v"), (hp.n_embd_v_gqa(il), hp.n_embd)),
            TensorSpec(blk(il, "attn_output"), (hp.n_embd, hp.n_embd_head_v * hp.n_head)),
            norm_tensor(il, "attn_q_norm", head),
            norm_tensor(il, "attn_k_norm", head)]


def tensor_specs(hp: Qwen35HyperParams, tied_output: bool = False) -> list[TensorSpec]:
    specs = global_tensors(hp, tied_output)
    for il in range(hp.n_layer):
        specs += [norm_tensor(il, "attn_norm", hp.n_embd), norm_tensor(il, "post_attention_norm", hp.n_embd)]
        specs += delta_net_tensors(hp, il) if hp.is_recurrent(il) else gated_attention_tensors(hp, il)
        if hp.n_expert:
            specs += routed_expert_tensors(hp, il)
            specs += shared_expert_tensors(hp, il, hp.n_ff_shexp)
            # {n_embd, 1} as converted, {n_embd} after llama-quantize
            specs.append(TensorSpec(blk(il, "ffn_gate_inp_shexp"), (1, hp.n_embd), also=(hp.n_embd,)))
        else:
            specs += dense_ffn_tensors(hp, il)
    return specs


# --- forward ------------------------------------------------------------------------------------


def forward_layer(m, il: int, x, batch):
    lw, eps = m.layers[il], m.hparams.rms_eps
    mixer = delta_net_mixer if m.hparams.is_recurrent(il) else gated_attention
    h = x + mixer(m, il, rms_norm(x, lw.attn_norm, eps), batch)
    return h + feed_forward(m, il, rms_norm(h, lw.post_attention_norm, eps))


@lru_cache(maxsize=None)
def imrope_freq_factors(sections: tuple[int, ...], n_rot: int) -> np.ndarray | None:
    """IMROPE (ggml_rope_multi) for text positions (p, p, p, 0): pair i rotates with position p
    when s = i % sum(sections) falls in one of the first three interleaved sections, else with
    position 0. A frequency factor of infinity gives the rotation angle 0 of position 0; None when
    every pair rotates (sections that cover n_rot/2, as in the released models)."""
    if not sections:
        return None
    total = sum(sections)
    s = np.arange(n_rot // 2) % total
    rotates = ((s % 3 == 0) & (s < 3 * sections[0])) | ((s % 3 == 1) & (s < 3 * sections[1])) | \
              ((s % 3 == 2) & (s < 3 * sections[2]))
    if rotates.all():
        return None
    return np.where(rotates, 1.0, np.inf).astype(np.float32)


def gated_attention(m, il: int, x, batch):
    hp, lw, ops = m.hparams, m.layers[il], m.ops
    xp, n_tokens, head = namespace(x), x.shape[0], hp.n_embd_head_k
    q_gate = xp.reshape(ops.matmul(x, lw.attn_q), (n_tokens, hp.n_head, 2 * head))
    q = rms_norm(q_gate[..., :head], lw.attn_q_norm, hp.rms_eps)                     # (T, n_head, head)
    gate = xp.reshape(q_gate[..., head:], (n_tokens, hp.n_head * head))
    k = xp.reshape(ops.matmul(x, lw.attn_k), (n_tokens, hp.n_head_kv[il], head))
    k = rms_norm(k, lw.attn_k_norm, hp.rms_eps)
    v = xp.reshape(ops.matmul(x, lw.attn_v), (n_tokens, hp.n_head_kv[il], hp.n_embd_head_v))
    factors = imrope_freq_factors(hp.rope_sections, hp.n_rot)
    q = batch.rope(q, hp.n_rot, hp.rope_freq_base, m.rope_scaling, neox=True, freq_factors=factors)
    k = batch.rope(k, hp.n_rot, hp.rope_freq_base, m.rope_scaling, neox=True, freq_factors=factors)
    out = batch.attend(il, q, k, v, kq_scale=1.0 / math.sqrt(head))
    return ops.matmul(out * sigmoid(gate), lw.attn_output)


# The DeltaNet mixer runs on the layer's home device, next to its recurrent state: the backend's
# own mixer where it has one (engine.backends.protocol.DeltaNetBackend: CUDA), else the host's
# NumPy mixer on host copies of its inputs (the CPU itself; the simulated GPU, whose memory is the
# host's). The projections run on their weights' devices, as everywhere.

def beta_and_gate(m, il: int, x):
    """beta = sigmoid(ssm_beta x) and the log-decay g = ssm_a * softplus(ssm_alpha x + ssm_dt.bias),
    each (T, Hv) float32 on the home device, in value-head order."""
    hp, lw, ops = m.hparams, m.layers[il], m.ops
    xp, n_tokens, n_v_heads = namespace(x), x.shape[0], hp.ssm_dt_rank
    if hp.joint_beta_alpha:
        # ssm_ba rows per key-head group: [beta of its r value heads | alpha of the same]
        ba = xp.reshape(ops.matmul(x, lw.ssm_ba), (n_tokens, hp.ssm_n_group, 2, n_v_heads // hp.ssm_n_group))
        beta = xp.reshape(ba[:, :, 0, :], (n_tokens, n_v_heads))
        alpha = xp.reshape(ba[:, :, 1, :], (n_tokens, n_v_heads))
    else:
        beta, alpha = ops.matmul(x, lw.ssm_beta), ops.matmul(x, lw.ssm_alpha)
    return sigmoid(beta), lw.ssm_a * delta_net.softplus(alpha + lw.get("ssm_dt.bias"))


def delta_net_heads(hp: Qwen35HyperParams) -> delta_net.DeltaNetHeads:
    return delta_net.DeltaNetHeads(hp.ssm_n_group, hp.ssm_dt_rank, hp.ssm_d_state, hp.grouped_heads, hp.rms_eps)


def delta_net_mixer(m, il: int, x, batch):
    lw, ops = m.layers[il], m.ops
    inputs = (ops.matmul(x, lw.attn_qkv), *beta_and_gate(m, il, x), ops.matmul(x, lw.attn_gate))   # qkv, beta, g, z
    weights = (home_dense(ops, lw.ssm_conv1d), lw.ssm_norm)
    state, heads, home = batch.cache.recurrent.layers[il], delta_net_heads(m.hparams), ops.home_backend
    if hasattr(home, "delta_net"):
        out = home.delta_net(state, *inputs, *weights, heads)
    else:
        out = home.to_device(delta_net.mixer(state, *map(ops.to_host, inputs + weights), heads))
    return ops.matmul(out, lw.ssm_out)


def feed_forward(m, il: int, x):
    hp, lw, ops = m.hparams, m.layers[il], m.ops
    if not hp.n_expert:
        return layers.feed_forward(ops, x, lw.ffn_gate, lw.ffn_up, lw.ffn_down)
    routed = moe_feed_forward(ops, x, lw, Routing(hp.n_expert_used, gating="softmax", norm_weights=True),
                              m.expert_counts[il])
    shared = layers.feed_forward(ops, x, lw.ffn_gate_shexp, lw.ffn_up_shexp, lw.ffn_down_shexp)
    return routed + shared * sigmoid(shared_gate_logit(ops, x, lw.ffn_gate_inp_shexp))


def shared_gate_logit(ops, x, gate):
    """(T, 1): the shared expert's gate logit. The gate is F32 ({n_embd, 1}, or 1-D after
    llama-quantize, then a vector on the layer's device): llama.cpp multiplies it unrounded."""
    if hasattr(gate, "ggml_type"):          # a 2-D weight in its file encoding
        return ops.matmul(x, gate)
    xp = namespace(x)
    return xp.reshape(xp.sum(x * gate, axis=-1), (x.shape[0], 1))


_HOME_DENSE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def home_dense(ops, weight):
    """A small F32 tensor (the conv kernel) as float32 on the layer's home device, decoded once."""
    if weight not in _HOME_DENSE:
        _HOME_DENSE[weight] = ops.dequantize(weight)
    return _HOME_DENSE[weight]
