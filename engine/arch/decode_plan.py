"""A family's decoder block as data, for steps that cannot call back into Python in the middle.

A one-token step captured as a CUDA graph (engine.backends.cuda_decode) must be launches only,
so it cannot run the family's `forward_layer` (array math between backend calls). Instead the
family describes its block once with these records, next to `forward_layer` and from the same
hyperparameters, and the step assembles the shared pieces (norm, q/k/v with their biases,
per-head q/k norm, rope, attention over the cache, gated FFN or routed experts, post-norms) in
one place. A family without `decode_plan(model)` keeps direct launches.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.arch.layers import RopeScaling, Routing


@dataclass(frozen=True)
class RopePlan:
    n_dims: int
    base: float
    scaling: RopeScaling
    neox: bool
    freq_factors: str | None = None     # a global tensor dividing the frequencies, where the model has it


@dataclass(frozen=True)
class BlockPlan:
    """One block for one token:

        h = x + post_attention_norm?(attention(attn_norm(x)))
        return h + post_ffw_norm?(ffn(ffn_norm(h)))

    attention: q/k/v (biases where the layer has them), per-head q/k RMSNorm when qk_norm, rope,
    q times q_scale, softmax(kq_scale q K^T) V over the layer's cache; ffn: the gated FFN with
    `activation`, or the routed experts with `routing`."""

    rope: RopePlan
    kq_scale: float
    q_scale: float = 1.0
    qk_norm: bool = False
    post_norms: bool = False
    activation: str = "swiglu"          # "swiglu" or "geglu"
    routing: Routing | None = None


@dataclass(frozen=True)
class DecodePlan:
    blocks: tuple[BlockPlan, ...]       # one per layer
    embed_scale: float = 1.0            # the embedding row times this
    logit_softcap: float = 0.0          # cap * tanh(logits / cap) when set
