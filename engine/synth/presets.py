"""Real model shapes as GGUF metadata, for synthetic models and for planning hardware we lack.

Each preset is the metadata llama.cpp's converter writes for that model (less the vocabulary);
`tiny-*` presets keep an architecture's structure at a size that runs in tests.
"""
from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": {
        "general.architecture": "deepseek2", "general.name": "DeepSeek-V3 (shape)",
        "deepseek2.vocab_size": 129280, "deepseek2.context_length": 163840,
        "deepseek2.embedding_length": 7168, "deepseek2.block_count": 61,
        "deepseek2.feed_forward_length": 18432, "deepseek2.expert_feed_forward_length": 2048,
        "deepseek2.attention.head_count": 128, "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.key_length": 576, "deepseek2.attention.value_length": 512,
        "deepseek2.attention.key_length_mla": 192, "deepseek2.attention.value_length_mla": 128,
        "deepseek2.attention.q_lora_rank": 1536, "deepseek2.attention.kv_lora_rank": 512,
        "deepseek2.attention.layer_norm_rms_epsilon": 1e-6,
        "deepseek2.rope.dimension_count": 64, "deepseek2.rope.freq_base": 10000.0,
        "deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 40.0,
        "deepseek2.rope.scaling.original_context_length": 4096,
        "deepseek2.rope.scaling.yarn_log_multiplier": 0.1,
        "deepseek2.leading_dense_block_count": 3, "deepseek2.expert_count": 256,
        "deepseek2.expert_used_count": 8, "deepseek2.expert_shared_count": 1,
        "deepseek2.expert_weights_scale": 2.5, "deepseek2.expert_weights_norm": True,
        "deepseek2.expert_gating_func": 2, "deepseek2.expert_group_count": 8,
        "deepseek2.expert_group_used_count": 4,
    },
    "llama-4-scout": {
        "general.architecture": "llama4", "general.name": "Llama-4-Scout-17B-16E (shape)",
        "llama4.vocab_size": 202048, "llama4.context_length": 10485760,
        "llama4.embedding_length": 5120, "llama4.block_count": 48,
        "llama4.feed_forward_length": 16384, "llama4.expert_feed_forward_length": 8192,
        "llama4.attention.head_count": 40, "llama4.attention.head_count_kv": 8,
        "llama4.attention.key_length": 128, "llama4.attention.value_length": 128,
        "llama4.attention.layer_norm_rms_epsilon": 1e-5, "llama4.rope.dimension_count": 128,
        "llama4.rope.freq_base": 500000.0, "llama4.expert_count": 16, "llama4.expert_used_count": 1,
        "llama4.interleave_moe_layer_step": 1,
    },
    "llama-4-maverick": {
        "general.architecture": "llama4", "general.name": "Llama-4-Maverick-17B-128E (shape)",
        "llama4.vocab_size": 202048, "llama4.context_length": 1048576,
        "llama4.embedding_length": 5120, "llama4.block_count": 48,
        "llama4.feed_forward_length": 16384, "llama4.expert_feed_forward_length": 8192,
        "llama4.attention.head_count": 40, "llama4.attention.head_count_kv": 8,
        "llama4.attention.key_length": 128, "llama4.attention.value_length": 128,
        "llama4.attention.layer_norm_rms_epsilon": 1e-5, "llama4.rope.dimension_count": 128,
        "llama4.rope.freq_base": 500000.0, "llama4.expert_count": 128, "llama4.expert_used_count": 1,
        "llama4.interleave_moe_layer_step": 2,
    },
    "qwen3-30b-a3b": {
        "general.architecture": "qwen3moe", "general.name": "Qwen3-30B-A3B (shape)",
        "qwen3moe.vocab_size": 151936, "qwen3moe.context_length": 40960,
        "qwen3moe.embedding_length": 2048, "qwen3moe.block_count": 48,
        "qwen3moe.feed_forward_length": 6144, "qwen3moe.expert_feed_forward_length": 768,
        "qwen3moe.attention.head_count": 32, "qwen3moe.attention.head_count_kv": 4,
        "qwen3moe.attention.key_length": 128, "qwen3moe.attention.value_length": 128,
        "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6, "qwen3moe.rope.freq_base": 1000000.0,
        "qwen3moe.expert_count": 128, "qwen3moe.expert_used_count": 8,
    },
    "qwen3-235b-a22b": {
        "general.architecture": "qwen3moe", "general.name": "Qwen3-235B-A22B (shape)",
        "qwen3moe.vocab_size": 151936, "qwen3moe.context_length": 40960,
        "qwen3moe.embedding_length": 4096, "qwen3moe.block_count": 94,
        "qwen3moe.feed_forward_length": 12288, "qwen3moe.expert_feed_forward_length": 1536,
        "qwen3moe.attention.head_count": 64, "qwen3moe.attention.head_count_kv": 4,
        "qwen3moe.attention.key_length": 128, "qwen3moe.attention.value_length": 128,
        "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6, "qwen3moe.rope.freq_base": 1000000.0,
        "qwen3moe.expert_count": 128, "qwen3moe.expert_used_count": 8,
    },
    "mixtral-8x7b": {
        "general.architecture": "llama", "general.name": "Mixtral-8x7B (shape)",
        "llama.vocab_size": 32000, "llama.context_length": 32768, "llama.embedding_length": 4096,
        "llama.block_count": 32, "llama.feed_forward_length": 14336,
        "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.dimension_count": 128,
        "llama.rope.freq_base": 1000000.0, "llama.expert_count": 8, "llama.expert_used_count": 2,
    },
    "llama-3-8b": {
        "general.architecture": "llama", "general.name": "Llama-3-8B (shape)",
        "llama.vocab_size": 128256, "llama.context_length": 8192, "llama.embedding_length": 4096,
        "llama.block_count": 32, "llama.feed_forward_length": 14336,
        "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.dimension_count": 128,
        "llama.rope.freq_base": 500000.0,
    },
    "gemma-3-1b": {
        "general.architecture": "gemma3", "general.name": "Gemma-3-1B (shape)",
        "gemma3.vocab_size": 262144, "gemma3.context_length": 32768, "gemma3.embedding_length": 1152,
        "gemma3.block_count": 26, "gemma3.feed_forward_length": 6912,
        "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.sliding_window": 512,
        "gemma3.rope.freq_base": 1000000.0,
    },
    # hybrids: three Gated DeltaNet layers (ssm.*) to one gated full-attention layer
    "qwen3.5-35b-a3b": {
        "general.architecture": "qwen35moe", "general.name": "Qwen3.5-35B-A3B (shape)",
        "qwen35moe.vocab_size": 248320, "qwen35moe.context_length": 262144,
        "qwen35moe.embedding_length": 2048, "qwen35moe.block_count": 40,
        "qwen35moe.attention.head_count": 16, "qwen35moe.attention.head_count_kv": 2,
        "qwen35moe.attention.key_length": 256, "qwen35moe.attention.value_length": 256,
        "qwen35moe.attention.layer_norm_rms_epsilon": 1e-6, "qwen35moe.rope.dimension_count": 64,
        "qwen35moe.rope.freq_base": 10000000.0, "qwen35moe.rope.dimension_sections": [11, 11, 10, 0],
        "qwen35moe.full_attention_interval": 4, "qwen35moe.ssm.conv_kernel": 4,
        "qwen35moe.ssm.state_size": 128, "qwen35moe.ssm.group_count": 16, "qwen35moe.ssm.time_step_rank": 32,
        "qwen35moe.ssm.inner_size": 4096, "qwen35moe.expert_count": 256, "qwen35moe.expert_used_count": 8,
        "qwen35moe.expert_feed_forward_length": 512, "qwen35moe.expert_shared_feed_forward_length": 512,
    },
    "qwen3.5-9b": {
        "general.architecture": "qwen35", "general.name": "Qwen3.5-9B (shape)",
        "qwen35.vocab_size": 248320, "qwen35.context_length": 262144,
        "qwen35.embedding_length": 4096, "qwen35.block_count": 32, "qwen35.feed_forward_length": 12288,
        "qwen35.attention.head_count": 16, "qwen35.attention.head_count_kv": 4,
        "qwen35.attention.key_length": 256, "qwen35.attention.value_length": 256,
        "qwen35.attention.layer_norm_rms_epsilon": 1e-6, "qwen35.rope.dimension_count": 64,
        "qwen35.rope.freq_base": 10000000.0, "qwen35.rope.dimension_sections": [11, 11, 10, 0],
        "qwen35.full_attention_interval": 4, "qwen35.ssm.conv_kernel": 4, "qwen35.ssm.state_size": 128,
        "qwen35.ssm.group_count": 16, "qwen35.ssm.time_step_rank": 32, "qwen35.ssm.inner_size": 4096,
    },
    "qwen3-next-80b-a3b": {
        "general.architecture": "qwen3next", "general.name": "Qwen3-Next-80B-A3B (shape)",
        "qwen3next.vocab_size": 151936, "qwen3next.context_length": 262144,
        "qwen3next.embedding_length": 2048, "qwen3next.block_count": 48,
        "qwen3next.attention.head_count": 16, "qwen3next.attention.head_count_kv": 2,
        "qwen3next.attention.key_length": 256, "qwen3next.attention.value_length": 256,
        "qwen3next.attention.layer_norm_rms_epsilon": 1e-6, "qwen3next.rope.dimension_count": 64,
        "qwen3next.rope.freq_base": 10000000.0, "qwen3next.full_attention_interval": 4,
        "qwen3next.ssm.conv_kernel": 4, "qwen3next.ssm.state_size": 128, "qwen3next.ssm.group_count": 16,
        "qwen3next.ssm.time_step_rank": 32, "qwen3next.ssm.inner_size": 4096,
        "qwen3next.expert_count": 512, "qwen3next.expert_used_count": 10,
        "qwen3next.expert_feed_forward_length": 512, "qwen3next.expert_shared_feed_forward_length": 512,
    },
}


def _tiny(base: str, arch: str, **overrides: Any) -> dict[str, Any]:
    md = {k.replace(f"{PRESETS[base]['general.architecture']}.", f"{arch}."): v for k, v in PRESETS[base].items()}
    md["general.architecture"] = arch
    md["general.name"] = f"tiny {base} (shape)"
    md.update({f"{arch}.{k}" if "." not in k or not k.startswith("general") else k: v
               for k, v in overrides.items()})
    return md


# Tiny models keep each family's structure (MLA, shared experts, groups, dense lead, SWA
# pattern, MoE interleave) at a size that quantizes, writes and runs in a test.
PRESETS.update({
    "tiny-deepseek-v3": _tiny(
        "deepseek-v3", "deepseek2", vocab_size=512, context_length=4096, embedding_length=256,
        block_count=4, feed_forward_length=512, expert_feed_forward_length=256,
        **{"attention.head_count": 4, "attention.key_length": 320, "attention.value_length": 256,
           "attention.key_length_mla": 96, "attention.value_length_mla": 64,
           "attention.q_lora_rank": 256, "attention.kv_lora_rank": 256, "rope.dimension_count": 64,
           "leading_dense_block_count": 1, "expert_count": 16, "expert_used_count": 4,
           "expert_group_count": 4, "expert_group_used_count": 2}),
    "tiny-llama-4": _tiny(
        "llama-4-maverick", "llama4", vocab_size=512, context_length=32768, embedding_length=256,
        block_count=4, feed_forward_length=512, expert_feed_forward_length=256,
        **{"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
           "attention.value_length": 64, "rope.dimension_count": 64, "expert_count": 8}),
    "tiny-qwen3-moe": _tiny(
        "qwen3-30b-a3b", "qwen3moe", vocab_size=512, embedding_length=256, block_count=4,
        feed_forward_length=512, expert_feed_forward_length=256,
        **{"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
           "attention.value_length": 64, "expert_count": 16, "expert_used_count": 4}),
    "tiny-mixtral": _tiny(
        "mixtral-8x7b", "llama", vocab_size=512, embedding_length=256, block_count=4,
        feed_forward_length=256,
        **{"attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 64,
           "expert_count": 8, "expert_used_count": 2}),
    "tiny-gemma-3": _tiny(
        "gemma-3-1b", "gemma3", vocab_size=512, embedding_length=256, block_count=6,
        feed_forward_length=512, **{"attention.head_count": 2, "attention.head_count_kv": 1,
                                    "attention.sliding_window": 32}),
    **{tiny: _tiny(
        name, arch, vocab_size=512, context_length=4096, embedding_length=256, block_count=4,
        **{"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
           "attention.value_length": 64, "rope.dimension_count": 16, "ssm.state_size": 64,
           "ssm.group_count": 2, "ssm.time_step_rank": 4, "ssm.inner_size": 256, **extra})
       for tiny, name, arch, extra in (
           ("tiny-qwen3.5-moe", "qwen3.5-35b-a3b", "qwen35moe", {
               "rope.dimension_sections": [3, 3, 2, 0], "expert_count": 8, "expert_used_count": 2,
               "expert_feed_forward_length": 256, "expert_shared_feed_forward_length": 256}),
           ("tiny-qwen3.5", "qwen3.5-9b", "qwen35", {
               "rope.dimension_sections": [3, 3, 2, 0], "feed_forward_length": 512}),
           ("tiny-qwen3-next", "qwen3-next-80b-a3b", "qwen3next", {
               "expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 256,
               "expert_shared_feed_forward_length": 256}))},
})


def preset(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
