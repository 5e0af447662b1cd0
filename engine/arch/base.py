"""What every architecture family shares: reading hyperparameters from metadata, the
per-layer attention kinds the KV cache cares about, and tensor-shape tables.

Names follow llama.cpp (`n_embd`, `n_head_kv`, `n_ff_exp`, ...) so that the designer, the
command line and llama.cpp's logs all say the same thing. Shapes are numpy order (rows first);
a GGUF `{n_embd, n_ff}` (ggml ne order) weight is `(n_ff, n_embd)` here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from gguf.constants import Keys


class HyperParamError(ValueError):
    pass


class AttentionKind(Enum):
    FULL = "full"
    SLIDING = "sliding"     # a key is visible while p1 - p0 < window (gemma3's sliding layers)
    CHUNKED = "chunked"     # a key is visible while it is in the query's chunk (llama4)


class RopeType(Enum):
    NORM = "norm"           # rotate adjacent pairs (llama)
    NEOX = "neox"           # rotate the two halves (qwen, gemma)


class Metadata:
    """Typed access to `{arch}.*` keys, with errors that name the missing key."""

    def __init__(self, md: Mapping[str, Any]):
        self.md = md
        self.arch = str(md.get(Keys.General.ARCHITECTURE, ""))

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def has(self, template: str) -> bool:
        return self.key(template) in self.md

    def get(self, template: str, default: Any = None) -> Any:
        return self.md.get(self.key(template), default)

    def require(self, template: str) -> Any:
        key = self.key(template)
        if key not in self.md:
            raise HyperParamError(f"metadata key {key!r} is missing")
        return self.md[key]

    def per_layer(self, template: str, n_layer: int, default: Any = None) -> tuple:
        """A key that llama.cpp accepts as one value or as an array with one value per layer."""
        value = self.get(template, default)
        if value is None:
            raise HyperParamError(f"metadata key {self.key(template)!r} is missing")
        if isinstance(value, list):
            if len(value) != n_layer:
                raise HyperParamError(f"{self.key(template)} has {len(value)} values for {n_layer} layers")
            return tuple(value)
        return (value,) * n_layer


def swa_layer_pattern(md: Mapping[str, Any], n_layer: int, default_pattern: int) -> tuple[bool, ...]:
    """Which layers slide (or chunk): llama.cpp's load_swa_pattern, an explicit per-layer array,
    or layers il % N < N - 1 for a period N."""
    m = Metadata(md)
    value = m.get(Keys.Attention.SLIDING_WINDOW_PATTERN, default_pattern)
    if isinstance(value, list):
        if len(value) != n_layer:
            raise HyperParamError(f"{m.key(Keys.Attention.SLIDING_WINDOW_PATTERN)} has {len(value)} values "
                                  f"for {n_layer} layers")
        return tuple(bool(v) for v in value)
    n = int(value)
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))


@dataclass(frozen=True)
class HyperParams:
    """Hyperparameters common to the transformer families; families add their own fields."""

    arch: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: tuple[int, ...]      # per layer
    n_embd_head_k: int
    n_embd_head_v: int
    n_ff: tuple[int, ...]           # per layer (dense FFN width; 0 where a layer has none)
    n_rot: int
    rms_eps: float
    rope_freq_base: float
    rope_freq_scale: float
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    rope_type: RopeType = RopeType.NORM

    @staticmethod
    def common_fields(md: Mapping[str, Any]) -> dict[str, Any]:
        m = Metadata(md)
        n_layer = int(m.require(Keys.LLM.BLOCK_COUNT))
        n_embd = int(m.require(Keys.LLM.EMBEDDING_LENGTH))
        n_head = int(m.require(Keys.Attention.HEAD_COUNT))
        n_head_kv = tuple(int(x) for x in m.per_layer(Keys.Attention.HEAD_COUNT_KV, n_layer, n_head))
        if n_head <= 0:
            raise HyperParamError(f"{m.key(Keys.Attention.HEAD_COUNT)} must be positive, got {n_head}")
        head_k = int(m.get(Keys.Attention.KEY_LENGTH, n_embd // n_head))
        head_v = int(m.get(Keys.Attention.VALUE_LENGTH, n_embd // n_head))
        vocab = md.get(m.key(Keys.LLM.VOCAB_SIZE)) or len(md.get(Keys.Tokenizer.LIST, ()))
        scale = float(m.get(Keys.Rope.SCALING_FACTOR, 0.0) or 0.0)
        return dict(
            arch=m.arch,
            n_vocab=int(vocab),
            n_ctx_train=int(m.get(Keys.LLM.CONTEXT_LENGTH, 4096)),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_embd_head_k=head_k,
            n_embd_head_v=head_v,
            n_ff=tuple(int(x) for x in m.per_layer(Keys.LLM.FEED_FORWARD_LENGTH, n_layer, 0)),
            n_rot=int(m.get(Keys.Rope.DIMENSION_COUNT, head_k)),
            rms_eps=float(m.get(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
            rope_freq_base=float(m.get(Keys.Rope.FREQ_BASE, 10000.0)),
            rope_freq_scale=1.0 / scale if scale else 1.0,
            n_expert=int(m.get(Keys.LLM.EXPERT_COUNT, 0)),
            n_expert_used=int(m.get(Keys.LLM.EXPERT_USED_COUNT, 0)),
            n_ff_exp=int(m.get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0)),
        )

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> HyperParams:
        return cls(**cls.common_fields(md))

    def replace(self, **changes) -> HyperParams:
        return dataclasses.replace(self, **changes)

    # --- what the KV cache needs (llama_hparams::n_embd_k_gqa and friends) -----------------

    def n_embd_k_gqa(self, il: int) -> int:
        """K values cached per token in layer il."""
        return self.n_embd_head_k * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        """V values cached per token in layer il (0 where V is a view of K, as with MLA)."""
        return self.n_embd_head_v * self.n_head_kv[il]

    def attention_kind(self, il: int) -> AttentionKind:
        return AttentionKind.FULL

    @property
    def attention_window(self) -> int:
        """Tokens in a sliding window or chunk (0 when every layer attends to all)."""
        return 0

    def is_moe_layer(self, il: int) -> bool:
        return self.n_expert > 0

    # --- what the recurrent state needs (hybrid DeltaNet families override these) ---------------

    def is_recurrent(self, il: int) -> bool:
        """Layer il keeps a recurrent state instead of a KV cache."""
        return False

    def n_embd_r(self) -> int:
        """Conv-state values per sequence in a recurrent layer (llama_hparams::n_embd_r)."""
        return 0

    def n_embd_s(self) -> int:
        """Recurrent-state values per sequence in a recurrent layer (llama_hparams::n_embd_s)."""
        return 0


# Tensor tables: name -> numpy-order shape. `optional` marks tensors llama.cpp does not require.

@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    optional: bool = False
    also: tuple[int, ...] | None = None     # a second shape llama.cpp accepts ({n} and {n, 1} alike)

    def accepts(self, shape) -> bool:
        return tuple(shape) == self.shape or (self.also is not None and tuple(shape) == self.also)


def blk(il: int, name: str) -> str:
    return f"blk.{il}.{name}.weight"


def global_tensors(hp: HyperParams, tied_output: bool = False) -> list[TensorSpec]:
    specs = [TensorSpec("token_embd.weight", (hp.n_vocab, hp.n_embd)),
             TensorSpec("output_norm.weight", (hp.n_embd,))]
    if not tied_output:
        specs.append(TensorSpec("output.weight", (hp.n_vocab, hp.n_embd), optional=True))
    return specs


def attention_tensors(hp: HyperParams, il: int, qk_norm: bool = False, bias: bool = False) -> list[TensorSpec]:
    q_dim = hp.n_embd_head_k * hp.n_head
    specs = [
        TensorSpec(blk(il, "attn_norm"), (hp.n_embd,)),
        TensorSpec(blk(il, "attn_q"), (q_dim, hp.n_embd)),
        TensorSpec(blk(il, "attn_k"), (hp.n_embd_k_gqa(il), hp.n_embd)),
        TensorSpec(blk(il, "attn_v"), (hp.n_embd_v_gqa(il), hp.n_embd)),
        TensorSpec(blk(il, "attn_output"), (hp.n_embd, hp.n_embd_head_v * hp.n_head)),
    ]
    if qk_norm:
        specs += [TensorSpec(blk(il, "attn_q_norm"), (hp.n_embd_head_k,)),
                  TensorSpec(blk(il, "attn_k_norm"), (hp.n_embd_head_k,))]
    if bias:
        specs += [TensorSpec(f"blk.{il}.attn_q.bias", (q_dim,)),
                  TensorSpec(f"blk.{il}.attn_k.bias", (hp.n_embd_k_gqa(il),)),
                  TensorSpec(f"blk.{il}.attn_v.bias", (hp.n_embd_v_gqa(il),))]
    return specs


def dense_ffn_tensors(hp: HyperParams, il: int, n_ff: int | None = None) -> list[TensorSpec]:
    n_ff = hp.n_ff[il] if n_ff is None else n_ff
    return [TensorSpec(blk(il, "ffn_gate"), (n_ff, hp.n_embd)),
            TensorSpec(blk(il, "ffn_up"), (n_ff, hp.n_embd)),
            TensorSpec(blk(il, "ffn_down"), (hp.n_embd, n_ff))]


def routed_expert_tensors(hp: HyperParams, il: int) -> list[TensorSpec]:
    n_ff_exp = hp.n_ff_exp or hp.n_ff[il]
    return [TensorSpec(blk(il, "ffn_gate_inp"), (hp.n_expert, hp.n_embd)),
            TensorSpec(blk(il, "ffn_gate_exps"), (hp.n_expert, n_ff_exp, hp.n_embd)),
            TensorSpec(blk(il, "ffn_up_exps"), (hp.n_expert, n_ff_exp, hp.n_embd)),
            TensorSpec(blk(il, "ffn_down_exps"), (hp.n_expert, hp.n_embd, n_ff_exp))]


def shared_expert_tensors(hp: HyperParams, il: int, n_ff_shexp: int) -> list[TensorSpec]:
    return [TensorSpec(blk(il, "ffn_gate_shexp"), (n_ff_shexp, hp.n_embd)),
            TensorSpec(blk(il, "ffn_up_shexp"), (n_ff_shexp, hp.n_embd)),
            TensorSpec(blk(il, "ffn_down_shexp"), (hp.n_embd, n_ff_shexp))]


def norm_tensor(il: int, name: str, size: int) -> TensorSpec:
    return TensorSpec(blk(il, name), (size,))
