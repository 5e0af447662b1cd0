"""offload-studio eval -m FILE --tokens 1,2,3 --logits-out out.npy [--incremental K]:
float32 logits [n_tokens, n_vocab] for every position (with K: a batched prefill of all but the
last K tokens, then K single-token steps, and only those K rows written). The logits are
streamed to a temporary file beside the output a ubatch at a time and renamed over it when
complete; a disk too small for them is refused before the model runs."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.files import atomic_write, check_output_path
from engine.units import format_bytes
from app.commands.model_args import ACCEPTS_LLAMA_ARGS, add_model_arguments, load_model  # noqa: F401


def add_arguments(p) -> None:
    add_model_arguments(p)
    tokens = p.add_mutually_exclusive_group(required=True)
    tokens.add_argument("--tokens", help="comma-separated token ids")
    tokens.add_argument("--tokens-file", help=".npy array of ids, or a text file of ids")
    p.add_argument("--logits-out", required=True, help="where to write the float32 logits (.npy)")
    p.add_argument("--incremental", type=int, default=0, metavar="K",
                   help="decode the last K tokens one at a time through the KV cache")


MAX_TOKEN_ID = (1 << 31) - 1      # llama_token is an int32
LOGITS_BLOCK_BYTES = 64 << 20     # logits held in memory at once


def read_tokens(args) -> np.ndarray:
    """The ids, checked to be whole numbers in 0..2^31-1 before they become int32 (a cast alone
    would wrap 2^31 to a negative id, or 2^32 + 5 to 5)."""
    if args.tokens is not None:
        values = _parse_ids(args.tokens)
    elif args.tokens_file.endswith(".npy"):
        values = np.load(args.tokens_file, allow_pickle=False).reshape(-1)
        if values.dtype.kind not in "iu":
            raise ValueError(f"{args.tokens_file}: token ids must be integers, not {values.dtype}")
    else:
        values = _parse_ids(Path(args.tokens_file).read_text())
    out_of_range = values[(values < 0) | (values > MAX_TOKEN_ID)] if values.dtype.kind == "i" else \
        values[values > MAX_TOKEN_ID]
    if len(out_of_range):
        raise ValueError(f"token id {int(out_of_range[0])} is outside 0..{MAX_TOKEN_ID}")
    return values.astype(np.int32)


def _parse_ids(text: str) -> np.ndarray:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError("token ids must be whole numbers separated by commas or spaces") from None
    if any(not -(1 << 63) <= i < 1 << 63 for i in ids):
        raise ValueError(f"a token id is outside 0..{MAX_TOKEN_ID}")
    return np.array(ids, dtype=np.int64)


def check_room(path: Path, n_bytes: int) -> None:
    """Refuse before computing when the logits cannot fit on the output's disk."""
    folder = path.parent if path.parent.is_dir() else Path(".")
    free_bytes = shutil.disk_usage(folder).free
    if n_bytes > free_bytes:
        raise ValueError(f"{path}: the logits need {format_bytes(n_bytes)} and the disk has "
                         f"{format_bytes(free_bytes)} free")


def logit_blocks(model, tokens: np.ndarray, k: int) -> Iterator[np.ndarray]:
    """The logits a block of positions at a time (one ubatch), so that memory holds one block
    rather than n_tokens x n_vocab floats; with k, only the last k positions, one at a time."""
    cache = model.new_cache()
    if k:
        model.eval_logits(tokens[:-k], cache, last_only=True)
        for i in range(len(tokens) - k, len(tokens)):
            yield model.eval_logits(tokens[i:i + 1], cache)
        return
    # a ubatch of rows of a 262k vocabulary is 256 MiB of logits; keep a block under the cap
    step = max(1, min(cache.n_ubatch, LOGITS_BLOCK_BYTES // (4 * model.hparams.n_vocab)))
    for start in range(0, len(tokens), step):
        yield model.eval_logits(tokens[start:start + step], cache)


def run(args) -> int:
    tokens = read_tokens(args)
    k = args.incremental
    if not 0 <= k <= len(tokens) - 1 and k:
        raise ValueError(f"--incremental {k} needs at least {k + 1} tokens")
    out = Path(args.logits_out)
    check_output_path(out)
    loaded = load_model(args, n_ctx_default=max(len(tokens), 1))
    model = loaded.model
    n_rows, n_vocab = (k or len(tokens)), model.hparams.n_vocab
    check_room(out, n_rows * n_vocab * 4)
    with atomic_write(out, "wb") as f:      # the exact path given: np.save would add ".npy"
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n_rows, n_vocab)})
        for block in logit_blocks(model, tokens, k):
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
    print(f"wrote {out}: {n_rows} x {n_vocab} float32 logits")
    return 0
