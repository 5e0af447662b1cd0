"""gemma3: sliding-window layers in a 5:1 pattern, q/k norms, pre- and post-norms, GeGLU,
embeddings scaled by sqrt(n_embd), tied output."""
from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import Keys

from engine.arch.base import (AttentionKind, HyperParams, Metadata, RopeType, TensorSpec,
                              attention_tensors, dense_ffn_tensors, global_tensors, norm_tensor)

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


def swa_layer_pattern(md, n_layer: int, default_pattern: int) -> tuple[bool, ...]:
    """llama.cpp's load_swa_pattern: an explicit per-layer array, or layers il % N < N - 1 slide."""
    m = Metadata(md)
    value = m.get(Keys.Attention.SLIDING_WINDOW_PATTERN, default_pattern)
    if isinstance(value, list):
        return tuple(bool(v) for v in value)
    n = int(value)
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))


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
