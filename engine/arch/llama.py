"""llama: Llama 1-3 dense models and Mixtral-style MoE (llama with n_expert > 0)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.arch.base import (HyperParams, TensorSpec, attention_tensors, blk, dense_ffn_tensors,
                              global_tensors, norm_tensor, routed_expert_tensors)


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


__all__ = ["LlamaHyperParams", "hyperparams", "tensor_specs", "blk"]
