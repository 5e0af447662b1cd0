"""How a model is run: the settings that the memory estimate and the engine both read."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# KV cache types llama.cpp accepts for -ctk/-ctv
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


@dataclass(frozen=True)
class RunConfig:
    n_ctx: int = 4096               # -c; 0 means the model's training context
    n_batch: int = 2048             # -b
    n_ubatch: int = 512             # -ub
    type_k: str = "f16"             # -ctk
    type_v: str = "f16"             # -ctv
    flash_attn: str = "auto"        # -fa: on / off / auto
    n_seq: int = 1                  # --parallel
    split_mode: str = "layer"       # -sm: none / layer / row
    main_gpu: int = 0               # -mg
    n_threads: int = 0              # -t; 0: all physical cores
    # "llama.cpp": round matmul inputs as llama.cpp's CPU backend does (Q8_0/Q8_K blocks for
    # quantized weights, f16 for f16 weights), so perplexity and logits match it; "f32": exact
    activations: str = "llama.cpp"
    # one-token steps of the layers a CUDA device holds whole run as a captured CUDA graph
    # (--no-cuda-graphs, or llama.cpp's GGML_CUDA_DISABLE_GRAPHS=1, launches every kernel directly)
    cuda_graphs: bool = True

    def __post_init__(self):
        for name in ("type_k", "type_v"):
            value = getattr(self, name)
            if value not in KV_CACHE_TYPES:
                raise ValueError(f"unknown KV cache type {value!r} for {name}; "
                                 f"choose one of {', '.join(KV_CACHE_TYPES)}")
        if self.activations not in ("llama.cpp", "f32"):
            raise ValueError(f"activations must be 'llama.cpp' or 'f32', not {self.activations!r}")
        if self.n_ctx < 0 or self.n_ubatch <= 0 or self.n_batch <= 0 or self.n_seq <= 0:
            raise ValueError("context, batch, ubatch and sequence counts must be positive")

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def context_length(self, n_ctx_train: int) -> int:
        """The context llama.cpp allocates: -c (or the training context for -c 0) padded to 256."""
        n_ctx = self.n_ctx or n_ctx_train
        return -(-n_ctx // 256) * 256
