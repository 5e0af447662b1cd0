"""offload-studio eval -m FILE --tokens 1,2,3 --logits-out out.npy [--incremental K]:
float32 logits [n_tokens, n_vocab] for every position (with K: a batched prefill of all but the
last K tokens, then K single-token steps, and only those K rows written)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.commands.model_args import ACCEPTS_LLAMA_ARGS, add_model_arguments, load_model  # noqa: F401


def add_arguments(p) -> None:
    add_model_arguments(p)
    tokens = p.add_mutually_exclusive_group(required=True)
    tokens.add_argument("--tokens", help="comma-separated token ids")
    tokens.add_argument("--tokens-file", help=".npy array of ids, or a text file of ids")
    p.add_argument("--logits-out", required=True, help="where to write the float32 logits (.npy)")
    p.add_argument("--incremental", type=int, default=0, metavar="K",
                   help="decode the last K tokens one at a time through the KV cache")


def read_tokens(args) -> np.ndarray:
    if args.tokens is not None:
        text = args.tokens
    elif args.tokens_file.endswith(".npy"):
        return np.load(args.tokens_file).astype(np.int32).reshape(-1)
    else:
        text = Path(args.tokens_file).read_text()
    try:
        return np.array([int(t) for t in text.replace(",", " ").split()], dtype=np.int32)
    except ValueError:
        raise ValueError("token ids must be whole numbers separated by commas or spaces") from None


def run(args) -> int:
    tokens = read_tokens(args)
    k = args.incremental
    if not 0 <= k <= len(tokens) - 1 and k:
        raise ValueError(f"--incremental {k} needs at least {k + 1} tokens")
    loaded = load_model(args, n_ctx_default=max(len(tokens), 1))
    model = loaded.model
    cache = model.new_cache()
    if k:
        model.eval_logits(tokens[:-k], cache, last_only=True)
        rows = [model.eval_logits(tokens[i:i + 1], cache) for i in range(len(tokens) - k, len(tokens))]
        logits = np.concatenate(rows)
    else:
        logits = model.eval_logits(tokens, cache)
    np.save(args.logits_out, logits.astype(np.float32))
    print(f"wrote {args.logits_out}: {logits.shape[0]} x {logits.shape[1]} float32 logits")
    return 0
