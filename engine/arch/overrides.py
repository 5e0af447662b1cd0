"""Metadata overrides: llama.cpp's `--override-kv KEY=TYPE:VALUE[,KEY=TYPE:VALUE...]`.

    parse_override_kv("llama4.expert_used_count=int:2")  -> MetadataOverride
    apply_overrides(metadata, overrides)                 -> a new metadata dict

llama.cpp (common/common.cpp string_parse_kv_override, src/llama-model-loader.cpp) splits at the
first '=', takes one of the prefixes int:, float:, bool: (true/false), str: (at most 127 bytes)
and, when the loader reads the key, uses the override only if its type matches the C++ type read:
`int:` for any integer key (uint32, int32...), `float:` for float keys; a mismatch is logged and
the file's value kept. Here every problem is an error instead, raised before anything loads:
a malformed override, a key that is neither in the file nor a known key of the architecture
(close matches suggested), a type mismatch, and values llama.cpp would assert on or that could
not match the file's tensors (block_count, expert_count, head counts, widths...).
"""
from __future__ import annotations

import csv
import difflib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Mapping

from gguf.constants import Keys

from engine import arch as arch_registry

OVERRIDE_TYPES = ("int", "float", "bool", "str")
MAX_KEY_BYTES = 127         # llama_model_kv_override::key is char[128]
MAX_STR_BYTES = 127         # and val_str too
EXAMPLE = "llama4.expert_used_count=int:2"
FORM = "KEY=TYPE:VALUE with TYPE one of int, float, bool, str"
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")     # LLAMA_ROPE_SCALING_TYPES

INT32_RANGE = (-(1 << 31), (1 << 31) - 1)
UINT32_RANGE = (0, (1 << 32) - 1)
INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


class OverrideError(ValueError):
    """An override that cannot be parsed or applied; the message says which and why."""


@dataclass(frozen=True)
class MetadataOverride:
    key: str
    type: str                       # "int", "float", "bool" or "str"
    value: int | float | bool | str

    def __str__(self) -> str:
        value = str(self.value).lower() if self.type == "bool" else self.value
        return f"{self.key}={self.type}:{value}"


# --- parsing ------------------------------------------------------------------------------------


def parse_override_kv(text: str) -> MetadataOverride:
    """One `KEY=TYPE:VALUE` (string_parse_kv_override), with strict values: llama.cpp's atol/atof
    would turn `int:2x` into 2 and `int:two` into 0 without a word."""
    key, sep, typed = text.partition("=")
    if not sep or not key:
        raise OverrideError(f"malformed override {text!r}: expected {FORM}, e.g. {EXAMPLE}")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise OverrideError(f"override key {key[:40]!r}... is {len(key.encode())} bytes; llama.cpp allows "
                            f"at most {MAX_KEY_BYTES}")
    type_name, colon, raw = typed.partition(":")
    if not colon or type_name not in OVERRIDE_TYPES:
        raise OverrideError(f"malformed override {text!r}: the value must start with int:, float:, bool: or str: "
                            f"(expected {FORM}, e.g. {EXAMPLE})")
    return MetadataOverride(key, type_name, _parse_value(text, type_name, raw))


def _parse_value(text: str, type_name: str, raw: str) -> int | float | bool | str:
    if type_name == "int":
        try:
            value = int(raw, 10)
        except ValueError:
            raise OverrideError(f"override {text!r}: {raw!r} is not an integer") from None
        if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            raise OverrideError(f"override {text!r}: {raw} does not fit a 64-bit integer")
        return value
    if type_name == "float":
        try:
            value = float(raw)
        except ValueError:
            raise OverrideError(f"override {text!r}: {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise OverrideError(f"override {text!r}: the value must be a finite number")
        return value
    if type_name == "bool":
        if raw not in ("true", "false"):
            raise OverrideError(f"override {text!r}: a bool is written true or false, not {raw!r}")
        return raw == "true"
    if len(raw.encode()) > MAX_STR_BYTES:
        raise OverrideError(f"override {text!r}: a str value cannot exceed {MAX_STR_BYTES} bytes "
                            f"(this one has {len(raw.encode())})")
    return raw


def parse_override_kv_list(text: str) -> list[MetadataOverride]:
    """A comma-separated `--override-kv` argument; a field in double quotes may hold commas."""
    fields = next(csv.reader([text]))
    return [parse_override_kv(f) for f in fields]


# --- what llama.cpp knows about each key --------------------------------------------------------

# gguf.Keys groups of a model file (adapter, imatrix and mmproj keys are not model metadata)
_KEY_GROUPS = (Keys.General, Keys.LLM, Keys.Attention, Keys.Attention.Indexer, Keys.Rope, Keys.Split, Keys.SSM,
               Keys.KDA, Keys.WKV, Keys.PosNet, Keys.ConvNext, Keys.Classifier, Keys.ShortConv, Keys.Tokenizer)

# the value type of each known key as gguf-py writes it (GGUFWriter.add_*); keys not listed are
# uint32, General.* keys not listed are strings
_FLOAT_KEYS = {
    Keys.General.SAMPLING_TOP_P, Keys.General.SAMPLING_MIN_P, Keys.General.SAMPLING_XTC_PROBABILITY,
    Keys.General.SAMPLING_XTC_THRESHOLD, Keys.General.SAMPLING_TEMP, Keys.General.SAMPLING_PENALTY_REPEAT,
    Keys.General.SAMPLING_MIROSTAT_TAU, Keys.General.SAMPLING_MIROSTAT_ETA,
    Keys.LLM.LOGIT_SCALE, Keys.LLM.ATTN_LOGIT_SOFTCAPPING, Keys.LLM.ROUTER_LOGIT_SOFTCAPPING,
    Keys.LLM.FINAL_LOGIT_SOFTCAPPING, Keys.LLM.EXPERT_WEIGHTS_SCALE, Keys.LLM.EXPERT_GROUP_SCALE,
    Keys.LLM.RESIDUAL_SCALE, Keys.LLM.EMBEDDING_SCALE,
    Keys.Attention.MAX_ALIBI_BIAS, Keys.Attention.CLAMP_KQV, Keys.Attention.LAYERNORM_EPS,
    Keys.Attention.LAYERNORM_RMS_EPS, Keys.Attention.GROUPNORM_EPS, Keys.Attention.SCALE,
    Keys.Attention.OUTPUT_SCALE, Keys.Attention.TEMPERATURE_SCALE,
    Keys.Rope.FREQ_BASE, Keys.Rope.FREQ_BASE_SWA, Keys.Rope.SCALING_FACTOR, Keys.Rope.SCALING_ALPHA,
    Keys.Rope.SCALING_ATTN_FACTOR, Keys.Rope.SCALING_YARN_LOG_MUL, Keys.Rope.SCALING_YARN_EXT_FACTOR,
    Keys.Rope.SCALING_YARN_ATTN_FACTOR, Keys.Rope.SCALING_YARN_BETA_FAST, Keys.Rope.SCALING_YARN_BETA_SLOW,
}
_BOOL_KEYS = {
    Keys.LLM.USE_PARALLEL_RESIDUAL, Keys.LLM.EXPERT_WEIGHTS_NORM, Keys.LLM.SWIN_NORM, Keys.Attention.CAUSAL,
    Keys.Rope.SCALING_FINETUNED, Keys.SSM.DT_B_C_RMS, Keys.Tokenizer.ADD_BOS, Keys.Tokenizer.ADD_EOS,
    Keys.Tokenizer.ADD_SEP, Keys.Tokenizer.ADD_PREFIX, Keys.Tokenizer.REMOVE_EXTRA_WS,
}
_STRING_KEYS = {
    Keys.LLM.TENSOR_DATA_LAYOUT, Keys.Rope.SCALING_TYPE, Keys.Tokenizer.MODEL, Keys.Tokenizer.PRE,
    Keys.Tokenizer.CHAT_TEMPLATE, Keys.Tokenizer.CHAT_TEMPLATE_N, Keys.Tokenizer.HF_JSON, Keys.Tokenizer.RWKV,
}
_ARRAY_KEYS = {
    Keys.General.TAGS, Keys.General.LANGUAGES, Keys.LLM.ACTIVATION_SPARSITY_SCALE, Keys.LLM.SWIGLU_CLAMP_EXP,
    Keys.LLM.SWIGLU_CLAMP_SHEXP, Keys.Rope.DIMENSION_SECTIONS, Keys.Tokenizer.LIST, Keys.Tokenizer.MERGES,
    Keys.Tokenizer.TOKEN_TYPE, Keys.Tokenizer.SCORES, Keys.Tokenizer.PRECOMPILED_CHARSMAP,
    Keys.Tokenizer.CHAT_TEMPLATES, Keys.Classifier.OUTPUT_LABELS,
}
_INT32_KEYS = {Keys.General.SAMPLING_TOP_K, Keys.General.SAMPLING_PENALTY_LAST_N, Keys.General.SAMPLING_MIROSTAT}
_GENERAL_UINT32_KEYS = {Keys.General.QUANTIZATION_VERSION, Keys.General.ALIGNMENT, Keys.General.FILE_TYPE,
                        Keys.General.BASE_MODEL_COUNT, Keys.General.DATASET_COUNT}

# special token ids: llama.cpp ignores one outside the vocabulary (llama_vocab::impl::load)
_TOKEN_ID_KEYS = {Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID,
                  Keys.Tokenizer.UNK_ID, Keys.Tokenizer.SEP_ID, Keys.Tokenizer.PAD_ID, Keys.Tokenizer.MASK_ID,
                  Keys.Tokenizer.FIM_PRE_ID, Keys.Tokenizer.FIM_SUF_ID, Keys.Tokenizer.FIM_MID_ID,
                  Keys.Tokenizer.FIM_PAD_ID, Keys.Tokenizer.FIM_REP_ID, Keys.Tokenizer.FIM_SEP_ID,
                  Keys.Tokenizer.PREFIX_ID, Keys.Tokenizer.SUFFIX_ID, Keys.Tokenizer.MIDDLE_ID}
# keys that must stay > 0 for the math to mean anything
_POSITIVE_FLOAT_KEYS = (Keys.Rope.FREQ_BASE, Keys.Rope.FREQ_BASE_SWA, Keys.Attention.LAYERNORM_RMS_EPS,
                        Keys.Attention.LAYERNORM_EPS)


def _templates() -> list[str]:
    return [v for group in _KEY_GROUPS for name, v in vars(group).items()
            if not name.startswith("_") and isinstance(v, str)]


def _kind_of_template(template: str) -> str:
    """'int', 'int32', 'float', 'bool', 'str' or 'array'."""
    for kind, keys in (("float", _FLOAT_KEYS), ("bool", _BOOL_KEYS), ("str", _STRING_KEYS),
                       ("array", _ARRAY_KEYS), ("int32", _INT32_KEYS), ("int", _GENERAL_UINT32_KEYS)):
        if template in keys:
            return kind
    return "str" if template.startswith("general.") else "int"


@lru_cache(maxsize=None)
def _known_keys(arch: str) -> tuple[dict[str, str], list[tuple[re.Pattern, str]]]:
    """(exact key -> kind, [(pattern, kind)] for templates with {id}, {name} ... slots)."""
    exact: dict[str, str] = {}
    patterns: list[tuple[re.Pattern, str]] = []
    for template in _templates():
        kind = _kind_of_template(template)
        key = template.replace("{arch}", arch)
        if "{" in key:
            patterns.append((re.compile(re.sub(r"\\\{\w+\\\}", r"[^.]+", re.escape(key)) + "$"), kind))
        else:
            exact[key] = kind
    return exact, patterns


def known_key_kind(arch: str, key: str) -> str | None:
    """The value kind of a key llama.cpp knows for `arch` ('int', 'int32', 'float', 'bool',
    'str', 'array'), or None for a key it does not know."""
    exact, patterns = _known_keys(arch)
    if key in exact:
        return exact[key]
    return next((kind for pattern, kind in patterns if pattern.match(key)), None)


def value_kind(value: Any) -> str:
    """The override type of a parsed metadata value: int, float, bool, str, or array."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "array"


# --- applying -----------------------------------------------------------------------------------


def apply_overrides(metadata: Mapping[str, Any], overrides: Iterable[MetadataOverride | str]) -> dict[str, Any]:
    """A copy of `metadata` with the overrides applied, every one checked first (strings are
    parsed with parse_override_kv)."""
    overrides = [parse_override_kv(o) if isinstance(o, str) else o for o in overrides]
    arch = str(metadata.get(Keys.General.ARCHITECTURE, ""))
    seen: set[str] = set()
    result = dict(metadata)
    for o in overrides:
        if o.key in seen:
            # llama.cpp keeps the first and silently drops the rest (a std::map insert)
            raise OverrideError(f"{o.key} is overridden more than once; give each key once")
        seen.add(o.key)
        result[o.key] = _checked_value(metadata, arch, o)
    if overrides:
        _check_consistency(metadata, result, arch, {o.key for o in overrides})
    return result


def _checked_value(metadata: Mapping[str, Any], arch: str, o: MetadataOverride) -> int | float | bool | str:
    if o.key in metadata:
        kind = value_kind(metadata[o.key])
        if kind == "int" and known_key_kind(arch, o.key) == "int32":
            kind = "int32"
    else:
        kind = known_key_kind(arch, o.key)
        if kind is None:
            raise OverrideError(_unknown_key_message(metadata, arch, o.key))
    if kind == "array":
        raise OverrideError(f"{o.key} holds an array; llama.cpp reads arrays without overrides, so it cannot be "
                            "overridden")
    expected = "int" if kind in ("int", "int32") else kind
    if o.type != expected:
        raise OverrideError(f"{o.key} is {_KIND_WORDS[kind]} but the override gives {str(o).partition('=')[2]}, which "
                            f"llama.cpp would ignore; write {o.key}={expected}:{_converted(o.value, expected)}")
    if kind in ("int", "int32"):
        _check_int_range(metadata, o, kind)
    return o.value


def _converted(value: int | float | bool | str, kind: str) -> str:
    """The value written for `kind` where that is obvious (2.0 -> 2, 10000 -> 10000.0), else VALUE."""
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return str(int(value))
    if kind == "float" and type(value) is int:
        return str(float(value))
    if kind == "str" and not isinstance(value, bool):
        return str(value)
    return "VALUE"


_KIND_WORDS = {"int": "an integer key", "int32": "an integer key", "float": "a float key",
               "bool": "a bool key", "str": "a string key", "array": "an array key"}


def _check_int_range(metadata: Mapping[str, Any], o: MetadataOverride, kind: str) -> None:
    low, high = INT32_RANGE if kind == "int32" else UINT32_RANGE
    current = metadata.get(o.key)
    if isinstance(current, int) and not low <= current <= high:
        low, high = INT64_RANGE         # the file stores it wider
    if o.value < 0 <= low:
        raise OverrideError(f"{o.key}={o.value} is negative, but the key is unsigned "
                            f"(llama.cpp would wrap it to {o.value % (high + 1)})")
    if not low <= o.value <= high:
        raise OverrideError(f"{o.key}={o.value} is out of range: the key holds {low}..{high}")


def _unknown_key_message(metadata: Mapping[str, Any], arch: str, key: str) -> str:
    candidates = set(metadata) | set(_known_keys(arch)[0])
    close = difflib.get_close_matches(key, sorted(candidates), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown metadata key {key!r}: not in this file and not a known {arch or 'model'} key{hint}"


# --- values that the rest of the model must agree with -------------------------------------------


def _check_consistency(before: Mapping[str, Any], after: Mapping[str, Any], arch: str, changed: set[str]) -> None:
    if after.get(Keys.General.ARCHITECTURE) != before.get(Keys.General.ARCHITECTURE):
        raise OverrideError(f"{Keys.General.ARCHITECTURE} cannot be overridden: the tensors belong to "
                            f"{before.get(Keys.General.ARCHITECTURE)!r}")

    def key(template: str) -> str:
        return template.format(arch=arch)

    def value(template: str, default: Any = 0) -> Any:
        return after.get(key(template), default)

    block_count = key(Keys.LLM.BLOCK_COUNT)
    if block_count in changed and after.get(block_count) != before.get(block_count):
        raise OverrideError(f"{block_count} cannot change ({before.get(block_count)} -> {after.get(block_count)}): "
                            "the file's tensors are laid out for its own layer count")
    context = key(Keys.LLM.CONTEXT_LENGTH)
    if context in changed and after[context] < 1:
        raise OverrideError(f"{context} must be at least 1, got {after[context]}")
    if changed & {key(t) for t in _EXPERT_KEYS}:
        _check_experts(key, value)
    for template in _POSITIVE_FLOAT_KEYS:
        if key(template) in changed and not after[key(template)] > 0:
            raise OverrideError(f"{key(template)} must be positive, got {after[key(template)]}")
    scaling = key(Keys.Rope.SCALING_TYPE)
    if scaling in changed and after[scaling] not in ROPE_SCALING_TYPES:
        raise OverrideError(f"{scaling}={after[scaling]!r} is not a rope scaling type llama.cpp knows: "
                            f"{', '.join(ROPE_SCALING_TYPES)}")
    _check_token_ids(after, changed)
    _check_tensor_shapes(before, after, arch, changed)


_EXPERT_KEYS = (Keys.LLM.EXPERT_COUNT, Keys.LLM.EXPERT_USED_COUNT, Keys.LLM.EXPERT_GROUP_COUNT,
                Keys.LLM.EXPERT_GROUP_USED_COUNT)


def _check_experts(key, value) -> None:
    """The asserts of llama_model::load_hparams on expert counts."""
    n_expert, n_used = int(value(Keys.LLM.EXPERT_COUNT)), value(Keys.LLM.EXPERT_USED_COUNT)
    if isinstance(n_used, list):
        n_used = max(n_used, default=0)
    used_key = key(Keys.LLM.EXPERT_USED_COUNT)
    if n_expert > 0 and not 1 <= n_used <= n_expert:
        raise OverrideError(f"{used_key}={n_used} is out of range: the model has {n_expert} experts, "
                            f"so it must be 1..{n_expert}")
    if n_expert == 0 and n_used != 0:
        raise OverrideError(f"{used_key}={n_used} needs experts, and this model has none")
    groups, groups_used = int(value(Keys.LLM.EXPERT_GROUP_COUNT)), int(value(Keys.LLM.EXPERT_GROUP_USED_COUNT))
    if groups > 1 and not 0 < groups_used < groups:
        raise OverrideError(f"{key(Keys.LLM.EXPERT_GROUP_USED_COUNT)}={groups_used} is out of range: with {groups} "
                            f"expert groups it must be 1..{groups - 1}")


def _check_token_ids(after: Mapping[str, Any], changed: set[str]) -> None:
    n_vocab = len(after.get(Keys.Tokenizer.LIST, ()))
    for k in sorted(changed & _TOKEN_ID_KEYS):
        if n_vocab and not 0 <= after[k] < n_vocab:
            raise OverrideError(f"{k}={after[k]} is not a token of the vocabulary (ids 0..{n_vocab - 1})")


def _check_tensor_shapes(before: Mapping[str, Any], after: Mapping[str, Any], arch: str, changed: set[str]) -> None:
    """Refuse an override that changes the tensors the architecture expects (a width, a head
    count, the MoE interleave...): the file's tensors would no longer fit."""
    if not arch_registry.is_supported(arch):
        return
    family = arch_registry.family(arch)
    try:
        old_specs = family.tensor_specs(family.hyperparams(before))
    except (ValueError, KeyError):
        return          # the file itself does not load; the loader reports that, not the override
    try:
        new_specs = family.tensor_specs(family.hyperparams(after))
    except (ValueError, KeyError) as e:
        raise OverrideError(f"overriding {', '.join(sorted(changed))} leaves metadata the model cannot use: "
                            f"{e}") from None
    overridden = ", ".join(sorted(changed))
    old = {s.name: s.shape for s in old_specs}
    new = {s.name: s.shape for s in new_specs}
    for name in [*old, *(n for n in new if n not in old)]:     # the model's own tensor order
        if old.get(name) != new.get(name):
            if name not in new:
                problem = f"the model would no longer use {name}, which the file holds"
            elif name not in old:
                problem = f"{name} would be needed with shape {new[name]}, and the file has none"
            else:
                problem = f"{name} would need shape {new[name]}, the file's is {old[name]}"
            raise OverrideError(f"overriding {overridden} changes the tensors the model needs: {problem}")
