"""The KL-divergence base file: log-probabilities of a base model, saved by one run for a later one.

The layout is llama.cpp's own --kl-divergence-base file (written by its perplexity tool), so bases
are interchangeable with llama-perplexity:

    "_logits_" | uint32 n_ctx | int32 n_vocab | int32 n_chunk | int32 tokens[n_chunk * n_ctx]
    per chunk, n_ctx-1-n_ctx//2 rows of 2*((n_vocab+1)//2)+4 uint16:
        float32 scale | float32 min_log_prob | uint16 code[n_vocab] | (uint16 pad when n_vocab is odd)
    log_prob = scale * code + min_log_prob, codes spanning the row's top 16 nats (all little-endian)

The row math the codes are made from (log-normalizers of logit rows, taken in blocks of bounded
size) is here too, and engine.eval.perplexity scores with the same functions. The format lives apart from
engine.eval.perplexity, which uses it and re-exports its public names, because it knows nothing of
scoring or statistics.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.files import check_output_path
from engine.run.sampling import check_finite

BASE_MAGIC = b"_logits_"
BASE_WINDOW_NATS = 16.0        # a base row codes log-probs within this distance of its maximum
_ROW_BLOCK_VALUES = 1 << 21    # logits converted to float64 at a time (16 MiB)


# ---- log-probabilities of logit rows -------------------------------------------------------------

def _row_blocks(n_rows: int, n_vocab: int) -> Iterator[slice]:
    step = max(1, _ROW_BLOCK_VALUES // max(n_vocab, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _log_normalizers(rows: np.ndarray, context: str) -> np.ndarray:
    """log(sum_j exp(logit_j)) of each row (n_rows,) in float64, so that log p_i = logit_i - this."""
    shifted = rows.astype(np.float64)
    row_max = shifted.max(axis=1, keepdims=True)
    shifted -= row_max
    log_norm = row_max[:, 0] + np.log(np.exp(shifted, out=shifted).sum(axis=1))
    if not np.isfinite(log_norm).all():
        check_finite(rows, context)
    return log_norm


# ---- the base file -------------------------------------------------------------------------------

def base_row_values(n_vocab: int) -> int:
    """uint16 values per base row: scale and min_log_prob (two float32) + the codes, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_base_rows(rows: np.ndarray) -> np.ndarray:
    """Compact log-probabilities of float32 logits (n_rows, n_vocab) as llama.cpp's perplexity writes
    them (its log_softmax with a uint16 output): codes 0..65535 span [max - 16 nats, max] of each row,
    rounded to nearest even in float32; anything lower reads back as the row's min_log_prob."""
    rows = rows.astype(np.float32, copy=False)
    n_rows, n_vocab = rows.shape
    max_logit = rows.max(axis=1)
    min_logit = np.maximum(rows.min(axis=1), max_logit - np.float32(BASE_WINDOW_NATS))
    log_sum = (_log_normalizers(rows, "KL-divergence base") - max_logit).astype(np.float32)
    scale = (max_logit - min_logit) / np.float32(65535)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    codes = rows - min_logit[:, None]
    codes *= inv_scale[:, None]
    np.rint(codes, out=codes)
    np.clip(codes, 0, 65535, out=codes)         # logits below the window give <= 0: code 0
    records = np.zeros((n_rows, base_row_values(n_vocab)), dtype="<u2")
    header = np.stack([scale, min_logit - max_logit - log_sum], axis=1).astype("<f4")   # (n_rows, 2)
    records[:, :4] = header.view("<u2")
    records[:, 4:4 + n_vocab] = codes
    return records


def decode_base_rows(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """float32 log-probabilities (n_rows, n_vocab) of base records."""
    header = np.ascontiguousarray(records[:, :4]).view("<f4")             # (n_rows, 2)
    return header[:, :1] * records[:, 4:4 + n_vocab].astype(np.float32) + header[:, 1:2]


@dataclass(frozen=True)
class KLBase:
    """A base file, memory-mapped."""
    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray          # int32 (n_chunk * n_ctx,), as tokenized (no BOS substitution)
    records: np.ndarray         # uint16 (n_chunk, n_ctx - 1 - n_ctx//2, base_row_values(n_vocab))


_BASE_HEADER_BYTES = len(BASE_MAGIC) + 12


def read_kl_base(path: str | os.PathLike) -> KLBase:
    path = Path(path)
    with open(path, "rb") as file:
        head = file.read(_BASE_HEADER_BYTES)
    if len(head) < _BASE_HEADER_BYTES or head[:len(BASE_MAGIC)] != BASE_MAGIC:
        raise ValueError(f"{path} does not look like a file of base log-probabilities "
                         "(written by a perplexity run with a KL-divergence base, or llama-perplexity "
                         "--kl-divergence-base)")
    n_ctx = int(np.frombuffer(head, "<u4", 1, len(BASE_MAGIC))[0])
    n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, "<i4", 2, len(BASE_MAGIC) + 4))
    if n_ctx < 3 or n_vocab < 1 or n_chunk < 1:
        raise ValueError(f"{path}: bad header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})")
    n_rows = n_ctx - 1 - n_ctx // 2
    tokens_bytes = 4 * n_chunk * n_ctx
    expected_bytes = _BASE_HEADER_BYTES + tokens_bytes + 2 * n_chunk * n_rows * base_row_values(n_vocab)
    size_bytes = path.stat().st_size
    if size_bytes < expected_bytes:
        raise ValueError(f"{path} is truncated: {size_bytes} bytes where {n_chunk} chunks of {n_ctx} tokens "
                         f"over a vocabulary of {n_vocab} need {expected_bytes}")
    tokens = np.memmap(path, "<i4", "r", _BASE_HEADER_BYTES, (n_chunk * n_ctx,))
    records = np.memmap(path, "<u2", "r", _BASE_HEADER_BYTES + tokens_bytes,
                        (n_chunk, n_rows, base_row_values(n_vocab)))
    return KLBase(path, n_ctx, n_vocab, n_chunk, tokens, records)


class _BaseWriter:
    """Writes a base file under a temporary name; it takes its real name only when complete."""

    def __init__(self, path: Path, tokens: np.ndarray, n_ctx: int, n_chunk: int):
        if not path.parent.is_dir():
            raise FileNotFoundError(2, "No such directory", str(path.parent))
        check_output_path(path)         # a device or a folder would only fail at the final rename
        self.path, self.tokens, self.n_ctx, self.n_chunk = path, tokens, n_ctx, n_chunk
        self.partial_path = path.with_name(path.name + ".partial")
        self._file = None
        self._n_vocab = 0

    def write_chunk(self, rows: np.ndarray) -> None:
        if self._file is None:
            self._n_vocab = rows.shape[1]
            self._file = open(self.partial_path, "wb")
            self._file.write(BASE_MAGIC + np.array([self.n_ctx], "<u4").tobytes()
                             + np.array([self._n_vocab, self.n_chunk], "<i4").tobytes()
                             + self.tokens.astype("<i4").tobytes())
        if rows.shape[1] != self._n_vocab:
            raise ValueError(f"eval_chunk returned {rows.shape[1]} logits per row after {self._n_vocab}")
        for block in _row_blocks(len(rows), rows.shape[1]):
            self._file.write(encode_base_rows(rows[block]).tobytes())

    def finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())   # the bytes are on disk before the rename makes them the base
        self._file.close()
        self._file = None
        os.replace(self.partial_path, self.path)

    def abandon(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.partial_path.unlink(missing_ok=True)
