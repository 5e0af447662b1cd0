"""An independent float64 NumPy reference of llama.cpp's qwen2 forward pass (test support code).

Written from llama.cpp's src/models/qwen2.cpp; it shares nothing with `engine`: weights come from
`gguf.GGUFReader` and `gguf.quants.dequantize`, every activation is float64.

    h   = x + attn(rms_norm(x) * attn_norm)
    out = h + W_down (silu(W_gate y) * W_up y),  y = rms_norm(h) * ffn_norm

* attention: q/k/v projections with biases, rope on NEOX pairs (x[i], x[i + n_rot/2]) with
  theta_i = pos * base^(-2i/n_rot), grouped-query heads, causal mask, kq scale 1/sqrt(head_dim).
* output: rms_norm * output_norm, then `output` (or the tied `token_embd`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def read(path: Path) -> tuple[dict, dict]:
    """(metadata without the arch prefix, tensors float64 in numpy order) of a GGUF."""
    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    metadata = {key[len(arch) + 1:]: field.contents() for key, field in reader.fields.items()
                if key.startswith(arch + ".")}
    tensors = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    return metadata, tensors


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def neox_rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float) -> np.ndarray:
    """x (T, heads, head_dim): the first n_rot values rotated in (i, i + n_rot/2) pairs."""
    half = n_rot // 2
    theta = positions[:, None] * base ** (-2.0 * np.arange(half) / n_rot)        # (T, half)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.copy()
    out[..., :half] = x[..., :half] * c - x[..., half:n_rot] * s
    out[..., half:n_rot] = x[..., :half] * s + x[..., half:n_rot] * c
    return out


def forward(path: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits (T, n_vocab) float64 of a whole sequence from position 0."""
    md, w = read(path)
    eps, base = float(md["attention.layer_norm_rms_epsilon"]), float(md.get("rope.freq_base", 10000.0))
    n_head, n_head_kv = int(md["attention.head_count"]), int(md["attention.head_count_kv"])
    n_layer, head_dim = int(md["block_count"]), int(md["attention.key_length"])
    n_rot = int(md.get("rope.dimension_count", head_dim))
    positions = np.arange(len(tokens), dtype=np.float64)
    x = w["token_embd.weight"][tokens]
    for il in range(n_layer):
        p = f"blk.{il}."
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)

        def project(name: str, heads: int) -> np.ndarray:
            y = h @ w[p + name + ".weight"].T + w[p + name + ".bias"]
            return y.reshape(len(tokens), heads, head_dim)
        q = neox_rope(project("attn_q", n_head), positions, n_rot, base)
        k = neox_rope(project("attn_k", n_head_kv), positions, n_rot, base)
        v = project("attn_v", n_head_kv)
        out = np.zeros_like(q)
        causal = np.tril(np.ones((len(tokens), len(tokens)), dtype=bool))
        for head in range(n_head):
            kv = head // (n_head // n_head_kv)
            scores = np.where(causal, q[:, head] @ k[:, kv].T / np.sqrt(head_dim), -np.inf)
            probs = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[:, head] = (probs / probs.sum(axis=1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(len(tokens), -1) @ w[p + "attn_output.weight"].T
        y = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = y @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * (y @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head_weight = w.get("output.weight", w["token_embd.weight"])
    return rms_norm(x, w["output_norm.weight"], eps) @ head_weight.T
