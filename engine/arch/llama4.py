"""llama4 (Scout/Maverick): MoE every interleave_moe_layer_step layers with a shared expert,
top-1 sigmoid routing, chunked attention in 3 of 4 layers and no rope in every 4th."""
from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import Keys

from engine.arch.base import (AttentionKind, HyperParams, Metadata, TensorSpec, attention_tensors,
                              dense_ffn_tensors, global_tensors, norm_tensor, routed_expert_tensors,
                              shared_expert_tensors)
from engine.arch.gemma3 import swa_layer_pattern

DEFAULT_CHUNK = 8192
DEFAULT_PATTERN = 4
N_EXPERT_MAVERICK = 128


@dataclass(frozen=True)
class Llama4HyperParams(HyperParams):
    n_moe_layer_step: int = 1
    attention_chunk: int = DEFAULT_CHUNK      # 0: every layer global, all with rope
    chunked_layers: tuple[bool, ...] = ()
    attn_temp_floor_scale: int = DEFAULT_CHUNK
    attn_temp_scale: float = 0.1
    use_kq_norm: bool = True

    def attention_kind(self, il: int) -> AttentionKind:
        return AttentionKind.CHUNKED if self.chunked_layers[il] else AttentionKind.FULL

    @property
    def attention_window(self) -> int:
        return self.attention_chunk

    def uses_rope(self, il: int) -> bool:
        # llama.cpp ties "no rope" to the non-chunked layers of the chunked pattern
        return self.attention_chunk == 0 or self.chunked_layers[il]

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
        use_kq_norm=fields["n_expert"] != N_EXPERT_MAVERICK)


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
