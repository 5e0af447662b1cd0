"""An independent float64 NumPy reference of llama.cpp's llama4 forward pass (test support code).

Written from the architecture notes in the fixtures README and llama.cpp's
src/models/llama4.cpp; it shares nothing with `engine`: weights come from `gguf.GGUFReader` and
`gguf.quants.dequantize`, every activation is float64.

    h   = x + attn(rms_norm(x) * attn_norm)
    out = h + ffn(rms_norm(h) * ffn_norm)

* attention: GQA, kq scale 1/sqrt(head_dim). Rope layers ((il + 1) % 4 != 0) rotate adjacent
  pairs (RoPE NORM) with theta_i = pos * base^(-2i/n_rot) / rope_freqs[i] (base: rope.freq_base,
  or rope.freq_base_swa on chunked layers when the file has it), then normalise q and
  k per head without a weight (Llama4TextL2Norm = rms norm, eps = rms_eps) unless the model is
  the 128-expert Maverick. The other layers skip rope and multiply q by the attention
  temperature 1 + 0.1 * log(floor((pos + 1) / 8192) + 1).
* masks: layers il % 4 < 3 are chunked (a key at p0 is visible from p1 iff
  floor(p1 / 8192) * 8192 <= p0 <= p1); every 4th layer sees every earlier key.
* FFN: MoE on layers (il + 1) % interleave_moe_layer_step == 0: experts ranked by raw router
  logit, the chosen ones' input scaled by sigmoid(logit) before a SwiGLU expert, plus a shared
  SwiGLU expert on the unscaled input; dense SwiGLU elsewhere.

`Llama4Reference.forward` evaluates tokens after whatever its `Llama4Cache` already holds, so the
same code runs a whole sequence at once or one token at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

CHUNK = 8192                    # llama.cpp's n_swa for llama4 (the sliding_window key is absent)
PATTERN = 4                     # 3 chunked layers, then 1 full
NO_ROPE_STEP = 4                # every 4th layer has no rope
TEMP_FLOOR_SCALE = 8192
TEMP_SCALE = 0.1
MAVERICK_EXPERTS = 128          # llama.cpp's 17B_128E type: no q/k norm
QUERY_BLOCK = 256               # queries per score matrix; divides CHUNK, so blocks never straddle a chunk


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


@dataclass
class Llama4Config:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_expert: int
    n_expert_used: int
    moe_step: int
    rms_eps: float
    freq_base: float
    freq_base_chunked: float    # rope base of the chunked layers (rope.freq_base_swa, else freq_base)
    chunked: bool               # False when the file sets sliding_window = 0

    def is_chunked(self, il: int) -> bool:
        return self.chunked and il % PATTERN < PATTERN - 1

    def uses_rope(self, il: int) -> bool:
        step = NO_ROPE_STEP if self.chunked else self.n_layer
        return (il + 1) % step != 0

    def is_moe(self, il: int) -> bool:
        return self.moe_step > 0 and (il + 1) % self.moe_step == 0

    @property
    def use_kq_norm(self) -> bool:
        return self.n_expert != MAVERICK_EXPERTS


def read_config(reader: GGUFReader) -> Llama4Config:
    arch = _field(reader, "general.architecture")
    if arch != "llama4":
        raise ValueError(f"the reference implements llama4, the file is {arch}")

    def key(name, default=None):
        return _field(reader, f"llama4.{name}", default)

    if key("rope.scaling.factor", 0.0) not in (0.0, 1.0) or key("rope.scaling.type", "none") == "yarn":
        raise ValueError("the reference does not implement rope scaling")
    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    freq_base = float(key("rope.freq_base", 10000.0))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    return Llama4Config(
        n_layer=int(key("block_count")), n_embd=n_embd, n_head=n_head,
        n_head_kv=int(key("attention.head_count_kv", n_head)), head_dim=head_dim,
        n_rot=int(key("rope.dimension_count", head_dim)), n_expert=int(key("expert_count", 0)),
        n_expert_used=int(key("expert_used_count", 0)), moe_step=int(key("interleave_moe_layer_step", 1)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon")), freq_base=freq_base,
        freq_base_chunked=float(key("rope.freq_base_swa", freq_base)), chunked=key("attention.sliding_window") != 0)


def read_weights(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float64, numpy order (a GGUF {in, out} matrix is (out, in))."""
    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}


# --- the math ---------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def swiglu_ffn(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def rope_norm(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, factors: np.ndarray | None):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head of x (T, heads, head_dim)."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    inv_freq = base ** (-2.0 * i / n_rot)
    if factors is not None:
        inv_freq = inv_freq / factors[: n_rot // 2]
    theta = positions.astype(np.float64)[:, None] * inv_freq[None, :]       # (T, n_rot/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.copy()
    even, odd = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = even * cos - odd * sin
    out[..., 1:n_rot:2] = even * sin + odd * cos
    return out


def attention_temperature(positions: np.ndarray) -> np.ndarray:
    return 1.0 + TEMP_SCALE * np.log(np.floor((positions + 1.0) / TEMP_FLOOR_SCALE) + 1.0)


@dataclass
class Llama4Cache:
    """The reference's KV cache: keys (after rope and norm) and values of every evaluated
    position, per layer, float64; row j is position j."""

    k: list[np.ndarray] = field(default_factory=list)
    v: list[np.ndarray] = field(default_factory=list)
    # per MoE layer, each position's gap between the last chosen expert's router logit and the
    # best unchosen one: where it is tiny, float32 rounding may pick another expert
    router_margins: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def n_past(self) -> int:
        return 0 if not self.k else len(self.k[0])


class Llama4Reference:
    def __init__(self, path: str | Path):
        reader = GGUFReader(str(path))
        self.config = read_config(reader)
        self.w = read_weights(reader)

    def layer(self, il: int, name: str) -> np.ndarray:
        return self.w[f"blk.{il}.{name}.weight"]

    def new_cache(self) -> Llama4Cache:
        n = self.config.n_layer
        d_kv = self.config.n_head_kv * self.config.head_dim
        return Llama4Cache([np.zeros((0, d_kv))] * n, [np.zeros((0, d_kv))] * n)

    def forward(self, tokens, cache: Llama4Cache | None = None, logit_rows=None) -> np.ndarray:
        """float64 logits (n_rows, n_vocab) of the given tokens, evaluated after the cache's
        positions; `logit_rows` (indices into tokens) limits the output head to some rows."""
        tokens = np.asarray(tokens, dtype=np.int64)
        cache = cache if cache is not None else self.new_cache()
        positions = cache.n_past + np.arange(len(tokens))
        x = self.w["token_embd.weight"][tokens]
        for il in range(self.config.n_layer):
            h = x + self.attention(il, rms_norm(x, self.config.rms_eps) * self.layer(il, "attn_norm"), positions, cache)
            x = h + self.feed_forward(il, rms_norm(h, self.config.rms_eps) * self.layer(il, "ffn_norm"), cache)
        if logit_rows is not None:
            x = x[np.asarray(logit_rows)]
        output = self.w.get("output.weight", self.w["token_embd.weight"])
        return (rms_norm(x, self.config.rms_eps) * self.w["output_norm.weight"]) @ output.T

    def attention(self, il: int, x: np.ndarray, positions: np.ndarray, cache: Llama4Cache) -> np.ndarray:
        c = self.config
        n = len(x)
        q = (x @ self.layer(il, "attn_q").T).reshape(n, c.n_head, c.head_dim)
        k = (x @ self.layer(il, "attn_k").T).reshape(n, c.n_head_kv, c.head_dim)
        v = (x @ self.layer(il, "attn_v").T).reshape(n, c.n_head_kv, c.head_dim)
        if c.uses_rope(il):
            factors = self.w.get("rope_freqs.weight")
            base = c.freq_base_chunked if c.is_chunked(il) else c.freq_base
            q = rope_norm(q, positions, c.n_rot, base, factors)
            k = rope_norm(k, positions, c.n_rot, base, factors)
            if c.use_kq_norm:
                q, k = rms_norm(q, c.rms_eps), rms_norm(k, c.rms_eps)
        else:
            q = q * attention_temperature(positions)[:, None, None]
        cache.k[il] = np.concatenate([cache.k[il], k.reshape(n, -1)])
        cache.v[il] = np.concatenate([cache.v[il], v.reshape(n, -1)])
        keys = cache.k[il].reshape(-1, c.n_head_kv, c.head_dim)
        values = cache.v[il].reshape(-1, c.n_head_kv, c.head_dim)
        # blocks start at positions that are multiples of QUERY_BLOCK
        starts = np.union1d([0], np.nonzero(positions % QUERY_BLOCK == 0)[0])
        ends = np.append(starts[1:], n)
        out = np.concatenate([self.attend_block(il, q[s:e], positions[s:e], keys, values)
                              for s, e in zip(starts, ends)])
        return out.reshape(n, -1) @ self.layer(il, "attn_output").T

    def attend_block(self, il: int, q: np.ndarray, q_pos: np.ndarray, keys: np.ndarray, values: np.ndarray):
        """softmax(q k^T / sqrt(d) + mask) v for consecutive queries inside one QUERY_BLOCK-aligned
        block; cache row j holds position j.

        A query at p1 sees the keys [start, p1]: start = 0 on full layers, floor(p1 / CHUNK) * CHUNK
        on chunked ones. The block never straddles a chunk, so start is the same for all its
        queries, every key before the block is visible to all of it, and only the block's own keys
        need the causal mask."""
        c = self.config
        n = len(q)
        start = int(q_pos[0]) // CHUNK * CHUNK if c.is_chunked(il) else 0
        assert int(q_pos[-1]) // QUERY_BLOCK == int(q_pos[0]) // QUERY_BLOCK
        end = int(q_pos[-1]) + 1
        future = np.triu(np.ones((n, n), dtype=bool), k=1)        # query i, block key j > i
        group = c.n_head // c.n_head_kv
        out = np.empty((n, c.n_head, c.head_dim))
        for h in range(c.n_head):
            kh, vh = keys[start:end, h // group], values[start:end, h // group]
            scores = (q[:, h] @ kh.T) * (1.0 / np.sqrt(c.head_dim))     # (n, end - start)
            scores[:, end - start - n:][future] = -np.inf
            scores -= scores.max(axis=1, keepdims=True)
            np.exp(scores, out=scores)
            out[:, h] = (scores @ vh) / scores.sum(axis=1, keepdims=True)
        return out

    def feed_forward(self, il: int, x: np.ndarray, cache: Llama4Cache) -> np.ndarray:
        if not self.config.is_moe(il):
            return swiglu_ffn(x, self.layer(il, "ffn_gate"), self.layer(il, "ffn_up"), self.layer(il, "ffn_down"))
        shared = swiglu_ffn(x, self.layer(il, "ffn_gate_shexp"), self.layer(il, "ffn_up_shexp"),
                            self.layer(il, "ffn_down_shexp"))
        return shared + self.routed_experts(il, x, cache)

    def routed_experts(self, il: int, x: np.ndarray, cache: Llama4Cache) -> np.ndarray:
        k = self.config.n_expert_used
        logits = x @ self.layer(il, "ffn_gate_inp").T                               # (T, n_expert)
        chosen = np.argsort(-logits, axis=1, kind="stable")[:, :k]                  # ranked by raw logit
        ranked = -np.sort(-logits, axis=1)
        margin = ranked[:, k - 1] - ranked[:, k] if k < logits.shape[1] else np.full(len(x), np.inf)
        cache.router_margins[il] = np.concatenate([cache.router_margins.get(il, np.zeros(0)), margin])
        gate, up, down = (self.layer(il, n) for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
        out = np.zeros_like(x)
        for slot in range(chosen.shape[1]):
            for e in np.unique(chosen[:, slot]):
                rows = np.nonzero(chosen[:, slot] == e)[0]
                weight = sigmoid(logits[rows, e])[:, None]
                out[rows] += swiglu_ffn(x[rows] * weight, gate[e], up[e], down[e])
        return out

