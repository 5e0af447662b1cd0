"""Which ggml type each tensor gets in a llama.cpp quantization mix (Q4_K_M, IQ4_XS, ...).

Follows llama.cpp's llama_tensor_get_type / llama_tensor_get_type_impl (src/llama-quant.cpp)
with llama-quantize's default parameters and no imatrix, so synthetic models and planning
inventories carry the per-tensor types a real `llama-quantize` run would give. Branches for
architectures this project does not know (falcon, glm5-next, bailingmoe3) are left out.

Tensors that are never quantized keep the type `convert_hf_to_gguf.py` gives them: F32 for
1-D tensors (norms, biases, exp_probs_b, rope_freqs) and ffn_gate_inp, the ftype's float type
for anything else.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from enum import Enum, auto
from typing import Iterable, Sequence

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

from engine import arch as arch_registry
from engine.arch.base import HyperParams

LAYER_RE = re.compile(r"^blk\.(\d+)\.")

# llama_ftype_get_default_type: the base type of each mix
DEFAULT_TYPE: dict[F, T] = {
    F.ALL_F32: T.F32, F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16,
    F.MOSTLY_Q4_0: T.Q4_0, F.MOSTLY_Q4_1: T.Q4_1, F.MOSTLY_Q5_0: T.Q5_0, F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q8_0: T.Q8_0, F.MOSTLY_MXFP4_MOE: T.MXFP4,
    F.MOSTLY_Q2_K_S: T.Q2_K, F.MOSTLY_Q2_K: T.Q2_K,
    F.MOSTLY_Q3_K_S: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q3_K, F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_S: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q5_K, F.MOSTLY_Q6_K: T.Q6_K,
    F.MOSTLY_TQ1_0: T.TQ1_0, F.MOSTLY_TQ2_0: T.TQ2_0,
    F.MOSTLY_IQ2_XXS: T.IQ2_XXS, F.MOSTLY_IQ2_XS: T.IQ2_XS, F.MOSTLY_IQ2_S: T.IQ2_XS,
    F.MOSTLY_IQ2_M: T.IQ2_S, F.MOSTLY_IQ3_XS: T.IQ3_S, F.MOSTLY_IQ3_XXS: T.IQ3_XXS,
    F.MOSTLY_IQ1_S: T.IQ1_S, F.MOSTLY_IQ1_M: T.IQ1_M, F.MOSTLY_IQ4_NL: T.IQ4_NL,
    F.MOSTLY_IQ4_XS: T.IQ4_XS, F.MOSTLY_IQ3_S: T.IQ3_S, F.MOSTLY_IQ3_M: T.IQ3_S,
}

# the names llama-quantize takes on its command line ("Q4_K_M", "F16", ...)
FTYPE_BY_NAME: dict[str, F] = {f.name.removeprefix("MOSTLY_").removeprefix("ALL_"): f for f in DEFAULT_TYPE}

_IQ1_IQ2 = {F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M}
_IQ2_S_M = {F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M}

# substrings of names llama.cpp never quantizes (tensor_allows_quantization), for the families
# we know and the common extras
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight",
                    ".position_embd", ".rel_pos", ".patch_embd", ".patch_merger")
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


def parse_ftype(ftype: str | int | F) -> F:
    """'Q4_K_M', 'q4_k_m', 15 or LlamaFileType.MOSTLY_Q4_K_M -> LlamaFileType.MOSTLY_Q4_K_M."""
    if isinstance(ftype, F):
        return ftype
    if isinstance(ftype, int):
        return F(ftype)
    name = str(ftype).upper().removeprefix("MOSTLY_").removeprefix("ALL_")
    try:
        return FTYPE_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown quantization {ftype!r}; known: {', '.join(FTYPE_BY_NAME)}") from None


def ftype_name(ftype: F) -> str:
    return ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")


class Category(Enum):
    """llama.cpp's tensor_category: broad roles the mix rules key on, from name substrings."""
    TOKEN_EMBD = auto()
    ATTENTION_Q = auto()
    ATTENTION_V = auto()
    ATTENTION_K = auto()
    ATTENTION_QKV = auto()
    ATTENTION_KV_B = auto()
    ATTENTION_OUTPUT = auto()
    FFN_UP = auto()
    FFN_GATE = auto()
    FFN_DOWN = auto()
    OUTPUT = auto()
    OTHER = auto()


_CATEGORY_PARTS = (("attn_qkv.weight", Category.ATTENTION_QKV), ("attn_kv_b.weight", Category.ATTENTION_KV_B),
                   ("attn_v.weight", Category.ATTENTION_V), ("attn_k.weight", Category.ATTENTION_K),
                   ("attn_q.weight", Category.ATTENTION_Q), ("attn_output.weight", Category.ATTENTION_OUTPUT),
                   ("ffn_up", Category.FFN_UP), ("ffn_gate", Category.FFN_GATE), ("ffn_down", Category.FFN_DOWN))


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for part, cat in _CATEGORY_PARTS:
        if part in name:
            return cat
    return Category.OTHER


def _is_attn_v_like(cat: Category) -> bool:
    return cat in (Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B)


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's tensor_allows_quantization with default parameters."""
    # ggml_n_dims: a {n, 1} tensor (numpy (1, n), as the gate of a sigmoid-gated shared expert) is 1-D
    return (len(shape) >= 2 and math.prod(shape[:-1]) > 1 and name.endswith("weight") and name not in _NEVER_QUANTIZED_NAMES
            and not any(part in name for part in _NEVER_QUANTIZED))


def source_type(name: str, shape: Sequence[int], ftype: F) -> T:
    """The type convert_hf_to_gguf.py writes for a tensor the quantizer leaves alone."""
    if len(shape) < 2 or "ffn_gate_inp" in name or "ssm_conv1d" in name:
        return T.F32
    default = DEFAULT_TYPE[ftype]
    return default if default in (T.F32, T.F16, T.BF16) else T.F16


@dataclass(frozen=True)
class MixModel:
    """What llama.cpp's quantize state knows about the whole model when it picks types."""
    arch: str
    n_layer: int
    n_expert: int
    n_gqa: int                  # n_head / n_head_kv of layer 0
    is_70b: bool                # llama.cpp's LLM_TYPE_70B (80-layer llama with GQA, qwen2 72B)
    tied_embeddings: bool       # no output.weight: token_embd doubles as the output
    n_attention_wv: int         # attn_v / attn_qkv / attn_kv_b tensors in the file

    @classmethod
    def from_hparams(cls, hp: HyperParams, tensor_names: Iterable[str]) -> MixModel:
        names = list(tensor_names)
        n_head_kv = hp.n_head_kv[0] if hp.n_head_kv else hp.n_head
        return cls(arch=hp.arch, n_layer=hp.n_layer, n_expert=hp.n_expert,
                   n_gqa=hp.n_head // n_head_kv if n_head_kv else 0,
                   is_70b=hp.n_layer == 80 and (hp.arch == "qwen2" or hp.arch == "llama" and hp.n_head != n_head_kv),
                   tied_embeddings="output.weight" not in names,
                   n_attention_wv=sum(_is_attn_v_like(category(n)) for n in names))


@dataclass
class _Counters:
    """The running counts llama.cpp keeps while it walks the tensors in file-sorted order."""
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers Q4_K_M / Q5_K_M give more bits: the first and last eighth and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def layer_of(name: str) -> int:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else -1


def _block(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def fallback_type(t: T, n_cols: int) -> T:
    """llama.cpp's tensor_type_fallback: a type whose block fits rows of n_cols values."""
    if n_cols % _block(t) == 0:
        return t
    if t in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS):
        t = T.IQ4_NL
    elif t in (T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0):
        t = T.Q4_0
    else:
        t = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(t, t)
        if _block(t) > 32:
            raise ValueError(f"no fallback type for {t.name} with rows of {n_cols} values")
    return t if n_cols % _block(t) == 0 else T.F16


def _output_type(t: T, n_cols: int, ftype: F) -> T:
    if ftype == F.MOSTLY_MXFP4_MOE or n_cols % _block(t):
        return T.Q8_0
    if ftype in _IQ1_IQ2 or ftype == F.MOSTLY_IQ3_XXS:
        return T.Q5_K
    return t if t == T.Q8_0 else T.Q6_K


def _token_embd_type(t: T, ftype: F) -> T:
    if ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
        return T.Q2_K
    if ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS):
        return T.IQ3_S
    if ftype in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0):
        return T.Q4_K
    return t


def _low_bit_type(t: T, cat: Category, ftype: F, model: MixModel, c: _Counters) -> T:
    """The IQ1/IQ2 mixes keep attention V, early ffn_down and attention output higher."""
    if _is_attn_v_like(cat):
        c.i_attention_wv += 1
        if model.n_gqa >= 4 or model.n_expert >= 4:
            return T.Q4_K
        return T.IQ3_S if ftype in _IQ2_S_M else T.Q2_K
    if model.n_expert == 8 and cat == Category.ATTENTION_K:
        return T.Q4_K
    if cat == Category.FFN_DOWN:
        # this branch counts ffn_down tensors, not layers (a MoE layer has two: exps and shexp)
        early = c.i_ffn_down < model.n_layer // 8
        c.i_ffn_down += 1
        if early:
            return T.IQ3_S if ftype in _IQ2_S_M else T.Q2_K
        return t
    if cat == Category.ATTENTION_OUTPUT:
        if model.n_expert == 8:
            return T.Q5_K
        if ftype in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            return T.IQ2_XXS
        if ftype in _IQ2_S_M:
            return T.IQ3_S
    return t


def _attn_v_type(t: T, ftype: F, model: MixModel, i_wv: int) -> T:
    gqa4 = model.n_gqa >= 4
    if ftype == F.MOSTLY_Q2_K:
        t = T.Q4_K if gqa4 else T.Q3_K
    elif ftype == F.MOSTLY_Q2_K_S and gqa4:
        t = T.Q4_K
    elif ftype == F.MOSTLY_IQ3_XXS:
        t = T.Q4_K if gqa4 else T.IQ3_S         # IQ3_XXS needs an imatrix; without one llama.cpp picks IQ3_S
    elif ftype in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and gqa4:
        t = T.Q4_K
    elif ftype == F.MOSTLY_IQ3_M:
        t = T.Q4_K
    elif ftype == F.MOSTLY_Q3_K_M:
        t = T.Q5_K if i_wv < 2 else T.Q4_K
    elif ftype == F.MOSTLY_Q3_K_L:
        t = T.Q5_K
    elif ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and gqa4:
        t = T.Q5_K
    elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i_wv, model.n_attention_wv):
        t = T.Q6_K
    elif ftype == F.MOSTLY_Q4_K_S and i_wv < 4:
        t = T.Q5_K
    if model.is_70b and t in (T.Q3_K, T.Q4_K):
        t = T.Q5_K      # 8 query heads share each V head: a few more bits cost little
    if model.n_expert == 8:
        t = T.Q8_0
    return t


def _ffn_down_type(t: T, ftype: F, model: MixModel, i_layer: int) -> T:
    n = model.n_layer
    if ftype == F.MOSTLY_Q2_K:
        return T.Q3_K
    if ftype == F.MOSTLY_Q2_K_S:
        return T.Q4_K if i_layer < n // 8 else t
    if ftype == F.MOSTLY_IQ3_XXS:
        return T.Q4_K if i_layer < n // 8 else T.Q3_K
    if ftype == F.MOSTLY_Q3_K_M:
        return T.Q5_K if i_layer < n // 16 else T.Q4_K
    if ftype == F.MOSTLY_IQ3_M and (i_layer < n // 8 or model.n_expert == 8 and use_more_bits(i_layer, n)):
        return T.Q4_K
    if ftype == F.MOSTLY_Q3_K_L:
        return T.Q5_K
    if ftype == F.MOSTLY_Q4_K_M:
        return T.Q6_K if use_more_bits(i_layer, n) else t
    if i_layer < n // 8 and ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS):
        return T.Q5_K
    if ftype == F.MOSTLY_Q5_K_M and use_more_bits(i_layer, n):
        return T.Q6_K
    if ftype == F.MOSTLY_Q4_K_S and i_layer < n // 8:
        return T.Q5_K
    return t


def _attn_output_type(t: T, ftype: F, model: MixModel) -> T:
    if model.n_expert == 8:
        bumped = (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M,
                  F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M,
                  F.MOSTLY_IQ4_XS)
        return T.Q5_K if ftype in bumped else t
    return {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_IQ3_XXS: T.IQ3_S, F.MOSTLY_Q3_K_M: T.Q4_K,
            F.MOSTLY_Q3_K_L: T.Q5_K, F.MOSTLY_IQ3_M: T.Q4_K}.get(ftype, t)


def _gate_up_type(t: T, ftype: F, model: MixModel, i_layer: int) -> T:
    n = model.n_layer
    if ftype == F.MOSTLY_IQ3_XS and n // 8 <= i_layer < 7 * n // 8:
        return T.IQ3_XXS
    return t


def _ffn_layer(name: str, counter: int, model: MixModel) -> int:
    # llama.cpp's layer_info: MoE files scatter a layer's FFN tensors, so the layer comes from the name
    return layer_of(name) if model.n_expert > 1 else counter


def _mix_type(t: T, name: str, shape: Sequence[int], ftype: F, model: MixModel, c: _Counters) -> T:
    """llama_tensor_get_type_impl: the mix's choice before the shape fallback."""
    cat = category(name)
    if cat == Category.OUTPUT or (model.tied_embeddings and cat == Category.TOKEN_EMBD):
        return _output_type(t, shape[-1], ftype)
    if ftype == F.MOSTLY_MXFP4_MOE:
        return T.MXFP4 if len(shape) >= 3 and shape[-3] > 1 else T.Q8_0
    if cat == Category.TOKEN_EMBD:
        return _token_embd_type(t, ftype)
    if ftype in _IQ1_IQ2:
        return _low_bit_type(t, cat, ftype, model, c)
    if _is_attn_v_like(cat):
        t = _attn_v_type(t, ftype, model, c.i_attention_wv)
        c.i_attention_wv += 1
        return t
    if cat == Category.ATTENTION_K:
        if model.n_expert == 8:
            return T.Q8_0
        return {F.MOSTLY_IQ3_XS: T.IQ3_XXS, F.MOSTLY_IQ3_XXS: T.IQ2_S}.get(ftype, t)
    if cat == Category.ATTENTION_Q:
        return {F.MOSTLY_IQ3_XS: T.IQ3_XXS, F.MOSTLY_IQ3_XXS: T.IQ2_S}.get(ftype, t)
    if cat == Category.FFN_DOWN:
        t = _ffn_down_type(t, ftype, model, _ffn_layer(name, c.i_ffn_down, model))
        c.i_ffn_down += 1
        return t
    if cat == Category.ATTENTION_OUTPUT:
        return _attn_output_type(t, ftype, model)
    if cat == Category.ATTENTION_QKV:
        return {F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q4_K, F.MOSTLY_IQ3_M: T.Q4_K,
                F.MOSTLY_Q4_K_M: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q6_K}.get(ftype, t)
    if cat == Category.FFN_GATE:
        t = _gate_up_type(t, ftype, model, _ffn_layer(name, c.i_ffn_gate, model))
        c.i_ffn_gate += 1
        return t
    if cat == Category.FFN_UP:
        t = _gate_up_type(t, ftype, model, _ffn_layer(name, c.i_ffn_up, model))
        c.i_ffn_up += 1
        return t
    return t


def _choose(name: str, shape: Sequence[int], ftype: F, model: MixModel, c: _Counters) -> T:
    if not allows_quantization(name, shape):
        return source_type(name, shape, ftype)
    default = DEFAULT_TYPE[ftype]
    if default in (T.F32, T.F16, T.BF16):
        return default
    return fallback_type(_mix_type(default, name, shape, ftype, model, c), shape[-1])


def _file_order(name: str) -> tuple[int, str]:
    # llama.cpp walks tensors by layer number, then by name (llama_model_loader's weights_map)
    return layer_of(name), name


def tensor_types(tensors: Iterable[tuple[str, Sequence[int]]], ftype: str | int | F,
                 hp: HyperParams) -> dict[str, T]:
    """The ggml type of every tensor of a model, given as (name, numpy-order shape) pairs.

    The mix depends on the whole file (tied embeddings, how many attn_v tensors there are, the
    order llama.cpp visits them in), so this is the exact form; `tensor_type_for` answers for one."""
    ftype = parse_ftype(ftype)
    tensors = [(name, tuple(shape)) for name, shape in tensors]
    model = MixModel.from_hparams(hp, (name for name, _ in tensors))
    counters = _Counters()
    chosen = {name: _choose(name, shape, ftype, model, counters)
              for name, shape in sorted(tensors, key=lambda t: _file_order(t[0]))}
    return {name: chosen[name] for name, _ in tensors}


@functools.lru_cache(maxsize=32)
def _family_types(hp: HyperParams, ftype: F, tied_output: bool | None) -> dict[str, tuple[tuple[int, ...], T]]:
    fam = arch_registry.family(hp.arch)
    specs = fam.tensor_specs(hp) if tied_output is None else fam.tensor_specs(hp, tied_output)
    types = tensor_types(((s.name, s.shape) for s in specs), ftype, hp)
    return {s.name: (tuple(s.shape), types[s.name]) for s in specs}


def tensor_type_for(name: str, shape: Sequence[int], ftype: str | int | F, hp: HyperParams,
                    tied_output: bool | None = None) -> T:
    """The ggml type llama-quantize gives one tensor (numpy-order shape) of a model with these
    hyperparameters. Tensors of the family's table (with all optional ones present, and the
    family's default tying unless `tied_output` says otherwise) get exactly the whole-model
    answer; another tensor is decided with its layer index standing in for llama.cpp's counters."""
    ftype = parse_ftype(ftype)
    shape = tuple(int(d) for d in shape)
    known = _family_types(hp, ftype, tied_output)
    if name in known and known[name][0] == shape:
        return known[name][1]
    model = MixModel.from_hparams(hp, known)
    layer = max(layer_of(name), 0)
    return _choose(name, shape, ftype, model, _Counters(layer, layer, layer, layer))
