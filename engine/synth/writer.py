"""Synthetic GGUF models: a real model's layout, tensor types and byte sizes, with random weights.

`write_synthetic` writes every tensor the architecture's table lists, typed by llama.cpp's
quantization mix (engine.synth.quant_recipe), plus a small SentencePiece-style vocabulary. Weights are
random but valid: quantized blocks are drawn directly (random quants, fp16 scales chosen so the
dequantized values have std ~ gain/sqrt(fan_in) and no offset), which is far faster than
quantizing float weights and gives logits that are neither flat nor exploding.

With `sparse=True` only the header is written and the tensor data is left as a file hole: a
671B-parameter DeepSeek-V3 shape then costs a few MB of disk and opens like the real file
(reading it gives zeros), which is what the planner and the designer need.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import string
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from gguf import GGUFWriter
from gguf.constants import (GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType as T, GGUFValueType, Keys,
                            TokenType)
from gguf.quants import dequantize, quantize

from engine import arch as arch_registry
from engine.arch.base import HyperParams
from engine.files import atomic_path
from engine.synth.presets import PRESETS, preset as preset_metadata
from engine.synth.quant_recipe import FTYPE_BY_NAME, ftype_name, parse_ftype, tensor_types

CHUNK_BYTES = 32 << 20          # bytes generated and written at a time
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# optional tensors real files carry, written when the family table lists them
KEPT_OPTIONAL = ("output.weight", "exp_probs_b.bias")
KEPT_OPTIONAL_BY_ARCH = {"llama4": ("rope_freqs.weight",)}


@dataclass(frozen=True)
class SynthTensor:
    name: str
    shape: tuple[int, ...]      # numpy order
    ggml_type: T
    n_bytes: int


# --- the tensor table -----------------------------------------------------------------------

def resolve_metadata(preset: str | Mapping[str, Any]) -> dict[str, Any]:
    return preset_metadata(preset) if isinstance(preset, str) else dict(preset)


def with_layers(metadata: Mapping[str, Any], n_layer: int) -> dict[str, Any]:
    """The same model cut to its first n_layer blocks: full-width layers, experts, vocabulary
    and head, so that a big model's real shapes run (and benchmark) where all of it would not
    fit. Per-layer arrays (such as per-layer head counts) are cut with it."""
    arch = metadata[Keys.General.ARCHITECTURE]
    key = Keys.LLM.BLOCK_COUNT.format(arch=arch)
    n_total = int(metadata[key])
    if not 0 < n_layer <= n_total:
        raise ValueError(f"--layers must be between 1 and the model's {n_total} layers, not {n_layer}")
    cut = {k: (list(v)[:n_layer] if isinstance(v, (list, tuple)) and len(v) == n_total else v)
           for k, v in metadata.items()}
    cut[key] = n_layer
    return cut


def _kept(spec, arch: str) -> bool:
    if not spec.optional:
        return True
    kept = KEPT_OPTIONAL + KEPT_OPTIONAL_BY_ARCH.get(arch, ())
    return any(spec.name == k or spec.name.endswith("." + k) for k in kept)


def plan_tensors(metadata: Mapping[str, Any], quant: str | int = "Q4_K_M") -> tuple[HyperParams, list[SynthTensor]]:
    """The hyperparameters and the tensors (names, shapes, llama.cpp mix types, bytes) of a model."""
    hp = arch_registry.family(str(metadata.get(Keys.General.ARCHITECTURE))).hyperparams(metadata)
    specs = [s for s in arch_registry.family(hp.arch).tensor_specs(hp) if _kept(s, hp.arch)]
    types = tensor_types(((s.name, s.shape) for s in specs), quant, hp)
    tensors = []
    for s in specs:
        t = types[s.name]
        blck, type_size = GGML_QUANT_SIZES[t]
        n_bytes = math.prod(s.shape[:-1]) * (s.shape[-1] // blck) * type_size
        tensors.append(SynthTensor(s.name, tuple(s.shape), t, n_bytes))
    return hp, tensors


# --- random quantized blocks ----------------------------------------------------------------

def _q2_k_scales(blocks: np.ndarray, rng: np.random.Generator) -> None:
    # 16 bytes of (scale | min << 4); min = scale with dmin = 1.5 d centres q in 0..3
    sc = rng.integers(8, 16, size=(len(blocks), 16), dtype=np.uint8)
    blocks[:, 0:16] = sc | (sc << 4)


def _q3_k_scales(blocks: np.ndarray, rng: np.random.Generator) -> None:
    # 16 six-bit scales stored +32: low nibbles in bytes 0..7 (scale j and j+8 share a byte),
    # high 2-bit pairs in bytes 8..11 (byte 8 + j % 4, bits 2 * (j // 4))
    n = len(blocks)
    signed = rng.integers(8, 32, size=(n, 16)) * rng.choice(np.array([-1, 1]), size=(n, 16))
    u = (signed + 32).astype(np.uint8)
    low, high = u & 15, u >> 4
    blocks[:, 96:104] = low[:, :8] | (low[:, 8:] << 4)
    blocks[:, 104:108] = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)


def _k_scales(offset: int) -> Callable[[np.ndarray, np.random.Generator], None]:
    """Q4_K / Q5_K: eight 6-bit scales and mins in 12 bytes; min = scale centres the quants.

        bytes 0..3   mm ssssss   scale j (j < 4), top bits of scale j+4
        bytes 4..7   mm mmmmmm   min j, top bits of min j+4
        bytes 8..11  mmmm ssss   low nibbles of min j+4 and scale j+4
    """
    def fill(blocks: np.ndarray, rng: np.random.Generator) -> None:
        sc = rng.integers(32, 64, size=(len(blocks), 8), dtype=np.uint8)
        lo, hi = sc[:, :4], sc[:, 4:]
        packed = lo | ((hi >> 4) << 6)
        blocks[:, offset:offset + 4] = packed
        blocks[:, offset + 4:offset + 8] = packed
        blocks[:, offset + 8:offset + 12] = (hi & 15) | ((hi & 15) << 4)
    return fill


def _q6_k_scales(blocks: np.ndarray, rng: np.random.Generator) -> None:
    # 16 int8 sub-scales; a random sign cancels the -0.5 offset of the levels q - 32
    n = len(blocks)
    signed = rng.integers(32, 128, size=(n, 16)) * rng.choice(np.array([-1, 1]), size=(n, 16))
    blocks[:, 192:208] = signed.astype(np.int8).view(np.uint8)


@dataclass(frozen=True)
class _BlockLayout:
    d_offset: int                       # byte offset of the block's fp16 scale
    min_offset: int = -1                # fp16 min (K-quant dmin, or Q4_1/Q5_1's m)
    min_per_d: float = 0.0              # min = min_per_d * d keeps the values centred on 0
    sub_scales: Callable[[np.ndarray, np.random.Generator], None] | None = None


# d-first types whose other bytes may be anything: random quants and sub-scales are symmetric
# (the grid-indexed IQ types decode any index)
_D_FIRST = (T.Q8_0, T.Q4_0, T.Q5_0, T.IQ4_NL, T.IQ4_XS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S,
            T.IQ3_XXS, T.IQ3_S, T.IQ1_S)
BLOCK_LAYOUTS: dict[T, _BlockLayout] = {
    **{t: _BlockLayout(0) for t in _D_FIRST},
    T.Q4_1: _BlockLayout(0, 2, -7.5),
    T.Q5_1: _BlockLayout(0, 2, -15.5),
    T.Q2_K: _BlockLayout(80, 82, 1.5, _q2_k_scales),
    T.Q3_K: _BlockLayout(108, sub_scales=_q3_k_scales),
    T.Q4_K: _BlockLayout(0, 2, 7.5, _k_scales(4)),
    T.Q5_K: _BlockLayout(0, 2, 15.5, _k_scales(4)),
    T.Q6_K: _BlockLayout(208, sub_scales=_q6_k_scales),
}
# random block scales in [0.5, 1.5); dividing by their rms keeps the tensor's std on target
_JITTER_RMS = math.sqrt(13 / 12)


def _raw_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    type_size = GGML_QUANT_SIZES[qtype][1]
    n_bytes = n_blocks * type_size
    words = rng.bit_generator.random_raw(-(-n_bytes // 8))
    return words.view(np.uint8)[:n_bytes].reshape(n_blocks, type_size)


def _set_scales(blocks: np.ndarray, layout: _BlockLayout, d: np.ndarray) -> None:
    n = len(blocks)
    blocks[:, layout.d_offset:layout.d_offset + 2] = d.astype("<f2").view(np.uint8).reshape(n, 2)
    if layout.min_offset >= 0:
        m = (d * layout.min_per_d).astype("<f2")
        blocks[:, layout.min_offset:layout.min_offset + 2] = m.view(np.uint8).reshape(n, 2)


@functools.lru_cache(maxsize=None)
def unit_rms(qtype: T) -> float:
    """RMS of the dequantized values of random blocks with d = 1 (the scale is linear in d)."""
    layout = BLOCK_LAYOUTS[qtype]
    rng = np.random.Generator(np.random.SFC64(12345))
    blocks = _raw_blocks(qtype, 256, rng)
    if layout.sub_scales:
        layout.sub_scales(blocks, rng)
    _set_scales(blocks, layout, np.ones(len(blocks), dtype=np.float32))
    return float(np.sqrt(np.mean(np.square(dequantize(blocks, qtype), dtype=np.float64))))


def random_blocks(qtype: T, n_blocks: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """`n_blocks` valid blocks of `qtype` (uint8, one row per block) whose values have ~`std`."""
    layout = BLOCK_LAYOUTS.get(qtype)
    if layout is None:
        raise ValueError(f"random {qtype.name} blocks are not supported; write the model with sparse=True")
    blocks = _raw_blocks(qtype, n_blocks, rng)
    if layout.sub_scales:
        layout.sub_scales(blocks, rng)
    jitter = rng.uniform(0.5, 1.5, size=n_blocks).astype(np.float32) / _JITTER_RMS
    if layout.min_offset < 0:
        # a signed d (as llama.cpp's quantizers produce) cancels the offset of formats whose
        # levels are not symmetric, such as Q4_0's -8..7
        jitter *= rng.choice(np.array([-1, 1], dtype=np.float32), size=n_blocks)
    _set_scales(blocks, layout, jitter * np.float32(std / unit_rms(qtype)))
    return blocks


# --- weight values --------------------------------------------------------------------------

_QK_GAIN = ("attn_q", "attn_k", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b")


def _base_name(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def weight_std(name: str, shape: Sequence[int], hp: HyperParams) -> float:
    """std = gain / sqrt(fan_in); q/k projections 1.6, the router 3, embeddings and output 2
    (gemma3's tied embedding 1.25: its input rows are scaled up by sqrt(n_embd))."""
    base = _base_name(name)
    if base in ("token_embd", "output"):
        return (1.25 if hp.arch == "gemma3" else 2.0) / math.sqrt(hp.n_embd)
    gain = 3.0 if base == "ffn_gate_inp" else 1.6 if base in _QK_GAIN else 1.0
    return gain / math.sqrt(shape[-1])


def llama3_rope_factors(n_rot: int, freq_base: float, factor: float = 8.0, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, original_ctx: int = 8192) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1/4's rope scaling (stored as rope_freqs.weight)."""
    freqs = freq_base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    wavelen = 2 * np.pi / freqs
    smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original_ctx / high_freq_factor, 1.0,
                   np.where(wavelen > original_ctx / low_freq_factor, factor, blended))
    return out.astype(np.float32)


def float_values(name: str, shape: Sequence[int], hp: HyperParams, rng: np.random.Generator) -> np.ndarray:
    """Float32 values of a tensor stored unquantized (norms ~1, biases, router, ...)."""
    base = _base_name(name)
    if base == "rope_freqs":
        return llama3_rope_factors(2 * shape[0], hp.rope_freq_base)
    if base == "ssm_a":         # -A, A log-uniform in [0.05, 3]: per-token decays between ~0.2 and ~0.999
        return -np.exp(rng.uniform(np.log(0.05), np.log(3.0), size=shape)).astype(np.float32)
    if base == "ssm_dt":        # the bias of the decay's softplus
        return rng.uniform(-3.0, -1.0, size=shape).astype(np.float32)
    if base.endswith("_norm"):
        centre = 2.0 if hp.arch == "gemma3" and base.startswith("post_") else 1.0
        return rng.uniform(0.9 * centre, 1.1 * centre, size=shape).astype(np.float32)
    if len(shape) == 1:
        return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(0.1)
    return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(weight_std(name, shape, hp))


def _encode_floats(values: np.ndarray, ggml_type: T) -> np.ndarray:
    if ggml_type == T.F32:
        return values.astype("<f4")
    if ggml_type == T.F16:
        return values.astype("<f2")
    return quantize(values, T.BF16)


def tensor_chunks(tensor: SynthTensor, hp: HyperParams, rng: np.random.Generator):
    """The tensor's bytes, in row chunks of about CHUNK_BYTES."""
    n_rows = math.prod(tensor.shape[:-1])
    n_cols = tensor.shape[-1]
    row_bytes = tensor.n_bytes // n_rows
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    for first in range(0, n_rows, rows_per_chunk):
        rows = min(rows_per_chunk, n_rows - first)
        if tensor.ggml_type in FLOAT_TYPES:
            shape = (rows, n_cols) if len(tensor.shape) > 1 else tensor.shape
            yield _encode_floats(float_values(tensor.name, shape, hp, rng), tensor.ggml_type)
        else:
            n_blocks = rows * (n_cols // GGML_QUANT_SIZES[tensor.ggml_type][0])
            yield random_blocks(tensor.ggml_type, n_blocks, weight_std(tensor.name, tensor.shape, hp), rng)


# --- vocabulary -----------------------------------------------------------------------------

SPACE = "\u2581"    # SentencePiece's word-start marker
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
COMMON_WORDS = ("the of and to in is it that for was on are as with he be at by this have from or one had "
                "not but what all were when we there can an your which their said if do will each about how "
                "up out them then she many some so these would other into has more her two like him see time "
                "could no make than first been its who now people my made over did down only way find use may "
                "water long little very after words called just where most know get through back much before "
                "go good new write our used me man too any day same right look think also around another came "
                "come work three word must because does part even place well such here take why things help "
                "put years different away again off went old number great tell men say small every found still "
                "between name should home big give air line set own under read last never us left end along "
                "while might next sound below saw something thought both few those always looked show large "
                "often together asked house world going want school important until form food keep children "
                "feet land side without boy once animals life enough took sometimes four head above kind began "
                "almost live page got earth need far hand high year mother light parts country father let night "
                "following picture being study second eyes soon times story boys since white days ever paper hard "
                "near sentence better best across during today others however sure means knew its try told young "
                "miles sun ways thing whole hear example heard several change answer room sea against top turned "
                "learn point city play toward five using himself usually").split()


def _normal_pieces():
    """Word-like pieces, most common first, without end: words, letters, then letter strings."""
    yield SPACE
    yield from (SPACE + w for w in COMMON_WORDS)
    yield from string.punctuation
    yield from string.digits
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            piece = "".join(letters)
            yield piece
            yield SPACE + piece


def _unique(items):
    seen = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item


def vocab_metadata(n_vocab: int) -> dict[str, Any]:
    """A SentencePiece-style ('llama') vocabulary of n_vocab pieces: <unk>, <s>, </s>, the 256
    byte pieces <0x00>..<0xFF>, then word-like pieces with decreasing scores."""
    n_fixed = len(SPECIAL_PIECES) + 256
    if n_vocab <= n_fixed:
        raise ValueError(f"a vocabulary needs more than {n_fixed} tokens, the model has {n_vocab}")
    pieces = list(SPECIAL_PIECES) + [f"<0x{b:02X}>" for b in range(256)]
    pieces += itertools.islice(_unique(_normal_pieces()), n_vocab - n_fixed)
    n_normal = n_vocab - n_fixed
    scores = [0.0] * n_fixed + [-float(i) / n_normal * 10.0 for i in range(n_normal)]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    types += [int(TokenType.BYTE)] * 256 + [int(TokenType.NORMAL)] * n_normal
    return {Keys.Tokenizer.MODEL: "llama", Keys.Tokenizer.LIST: pieces, Keys.Tokenizer.SCORES: scores,
            Keys.Tokenizer.TOKEN_TYPE: types, Keys.Tokenizer.BOS_ID: 1, Keys.Tokenizer.EOS_ID: 2,
            Keys.Tokenizer.UNK_ID: 0, Keys.Tokenizer.ADD_BOS: True, Keys.Tokenizer.ADD_EOS: False}


# --- writing --------------------------------------------------------------------------------

def _value_type(value: Any) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if 0 <= value < 1 << 32 else GGUFValueType.INT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY
    raise ValueError(f"metadata value {value!r} has a type GGUF cannot store")


def _add_metadata(writer: GGUFWriter, metadata: Mapping[str, Any]) -> None:
    for key, value in metadata.items():
        if key != Keys.General.ARCHITECTURE:        # the writer adds it first
            writer.add_key_value(key, list(value) if isinstance(value, tuple) else value, _value_type(value))


def _seeded_rng(seed: int, name: str) -> np.random.Generator:
    # one generator per tensor: a tensor's values do not depend on which other tensors exist
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def _pad_to(f, alignment: int) -> None:
    f.write(bytes(-f.tell() % alignment))


def write_synthetic(path: str | Path, preset: str | Mapping[str, Any], quant: str = "Q4_K_M",
                    sparse: bool = False, seed: int = 0, vocab: bool = True,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a GGUF of `preset`'s shape (a PRESETS name or GGUF metadata) in llama.cpp's `quant`
    mix. `progress(done_bytes, total_bytes)` is called as tensor data is written."""
    path = Path(path)
    ftype = parse_ftype(quant)
    metadata = resolve_metadata(preset)
    hp, tensors = plan_tensors(metadata, ftype)
    if not sparse:
        unsupported = sorted({t.ggml_type.name for t in tensors
                              if t.ggml_type not in FLOAT_TYPES and t.ggml_type not in BLOCK_LAYOUTS})
        if unsupported:
            raise ValueError(f"random weights in {', '.join(unsupported)} are not supported; use sparse=True")
    metadata[Keys.General.FILE_TYPE] = int(ftype)
    metadata[Keys.General.QUANTIZATION_VERSION] = GGML_QUANT_VERSION
    if vocab:
        metadata.update(vocab_metadata(hp.n_vocab))

    with atomic_path(path) as tmp_path:     # a full disk or Ctrl-C leaves any earlier file as it was
        _write_gguf(tmp_path, hp, metadata, tensors, sparse, seed, progress)
    return path


def _write_gguf(path: Path, hp: HyperParams, metadata: dict[str, Any], tensors: list[SynthTensor], sparse: bool,
                seed: int, progress: Callable[[int, int], None] | None) -> None:
    writer = GGUFWriter(path, hp.arch)
    _add_metadata(writer, metadata)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    f = writer.fout[0]
    alignment = writer.data_alignment
    total_bytes = sum(t.n_bytes for t in tensors)
    try:
        if sparse:
            data_start = f.tell() + (-f.tell() % alignment)
            f.truncate(data_start + sum(t.n_bytes + (-t.n_bytes % alignment) for t in tensors))
            if progress:
                progress(total_bytes, total_bytes)
        else:
            _write_data(f, tensors, hp, seed, alignment, total_bytes, progress)
    finally:
        writer.close()


def _write_data(f, tensors: list[SynthTensor], hp: HyperParams, seed: int, alignment: int, total_bytes: int,
                progress: Callable[[int, int], None] | None) -> None:
    done = 0
    _pad_to(f, alignment)
    for t in tensors:
        rng = _seeded_rng(seed, t.name)
        for chunk in tensor_chunks(t, hp, rng):
            f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            done += chunk.nbytes
            if progress:
                progress(done, total_bytes)
        _pad_to(f, alignment)


# --- command line ---------------------------------------------------------------------------

def _preset_list() -> str:
    return ", ".join(f"{name} ({md[Keys.General.ARCHITECTURE]})" for name, md in sorted(PRESETS.items()))


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), metavar="NAME",
                        help=f"model shape, one of: {_preset_list()}")
    parser.add_argument("--arch", help="architecture the preset must have (a check; optional)")
    parser.add_argument("--quant", default="Q4_K_M", type=str.upper, choices=list(FTYPE_BY_NAME), metavar="TYPE",
                        help=f"llama.cpp quantization mix (default Q4_K_M): {', '.join(FTYPE_BY_NAME)}")
    parser.add_argument("-o", "--output", required=True, help="GGUF file to write")
    parser.add_argument("--sparse", action="store_true",
                        help="leave tensor data as a file hole: exact layout and sizes, almost no disk, not runnable")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--layers", type=int, metavar="N",
                        help="keep only the first N layers (real widths, experts and vocabulary): a slice "
                             "of a big model that runs on a small machine")
    parser.add_argument("--no-vocab", action="store_true", help="write no tokenizer metadata")


def run_synth(args: argparse.Namespace) -> int:
    metadata = resolve_metadata(args.preset)
    preset_arch = metadata[Keys.General.ARCHITECTURE]
    if args.arch and args.arch != preset_arch:
        raise ValueError(f"preset {args.preset!r} has architecture {preset_arch!r}, not {args.arch!r}")
    if getattr(args, "layers", None):
        metadata = with_layers(metadata, args.layers)
    start = time.perf_counter()
    path = write_synthetic(args.output, metadata, quant=args.quant, sparse=args.sparse, seed=args.seed,
                           vocab=not args.no_vocab)
    _, tensors = plan_tensors(metadata, args.quant)
    size_gib = sum(t.n_bytes for t in tensors) / (1 << 30)
    kind = "sparse " if args.sparse else ""
    print(f"wrote {kind}{path}: {args.preset} ({preset_arch}) {ftype_name(parse_ftype(args.quant))}, "
          f"{len(tensors)} tensors, {size_gib:.2f} GiB of tensor data in {time.perf_counter() - start:.1f} s")
    return 0


def synth_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offload-studio synth",
                                     description="write a synthetic GGUF of a real model's shape")
    add_synth_arguments(parser)
    return run_synth(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(synth_main())
