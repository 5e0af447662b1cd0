"""qwen2, qwen3 and qwen3moe: NEOX rope; qwen2 has q/k/v biases, qwen3 per-head q/k norms,
qwen3moe routes over experts of width expert_feed_forward_length."""
from __future__ import annotations

from dataclasses import dataclass

from engine.arch.base import (HyperParams, RopeType, TensorSpec, attention_tensors, dense_ffn_tensors,
                              global_tensors, norm_tensor, routed_expert_tensors)


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
