"""Hypothesis strategies for hostile input: GGUF headers, metadata values, tensor tables and
saved JSON files. Each file strategy starts from a tiny valid llama model (a few tens of kB, so
thousands of examples stay cheap) and breaks one thing or several."""
from __future__ import annotations

import struct

from hypothesis import strategies as st

from gguf_bytes import RawGGUF, RawTensor, auto_kv

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_VOCAB, N_LAYER = 32, 4, 2, 8, 64, 16, 2


def tiny_llama_metadata() -> dict:
    return {
        "general.architecture": "llama", "general.name": "tiny",
        "llama.context_length": 128, "llama.embedding_length": N_EMBD, "llama.block_count": N_LAYER,
        "llama.feed_forward_length": N_FF, "llama.attention.head_count": N_HEAD,
        "llama.attention.head_count_kv": N_HEAD_KV, "llama.rope.dimension_count": HEAD_DIM,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(13)],
        "tokenizer.ggml.scores": [0.0] * N_VOCAB, "tokenizer.ggml.token_type": [2, 3, 3] + [1] * 13,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    }


def tiny_llama_tensors() -> list[RawTensor]:
    """ggml order (ne[0] = row length); F32 zeros."""
    tensors = [RawTensor("token_embd.weight", [N_EMBD, N_VOCAB]), RawTensor("output_norm.weight", [N_EMBD])]
    kv = N_HEAD_KV * HEAD_DIM
    for il in range(N_LAYER):
        for name, ne in [("attn_norm", [N_EMBD]), ("attn_q", [N_EMBD, N_EMBD]), ("attn_k", [N_EMBD, kv]),
                         ("attn_v", [N_EMBD, kv]), ("attn_output", [N_EMBD, N_EMBD]), ("ffn_norm", [N_EMBD]),
                         ("ffn_gate", [N_EMBD, N_FF]), ("ffn_up", [N_EMBD, N_FF]), ("ffn_down", [N_FF, N_EMBD])]:
            tensors.append(RawTensor(f"blk.{il}.{name}.weight", ne))
    return tensors


def tiny_llama(metadata: dict | None = None, tensors: list[RawTensor] | None = None) -> RawGGUF:
    md = tiny_llama_metadata() if metadata is None else metadata
    return RawGGUF([auto_kv(k, v) for k, v in md.items()], tiny_llama_tensors() if tensors is None else tensors)


HOSTILE_TEXT = st.text(alphabet=st.sampled_from(list("ab.\x1b[]0;\x07\n\u202e{}%") + ["\x00"]), max_size=40)
HOSTILE_INTS = st.one_of(st.integers(-2**63, 2**64 - 1), st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**32 - 1, 10**9,
                                                                          2**63, 2**64 - 1]))
HOSTILE_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0]))
NAMES = st.sampled_from(["llama", "gpt2", "bert", "qwen2", "qwen3moe", "gemma3", "llama4", "deepseek2", "default"])
SCALARS = st.one_of(HOSTILE_INTS, HOSTILE_FLOATS, st.booleans(), HOSTILE_TEXT, NAMES)
VALUES = st.one_of(SCALARS, st.lists(st.one_of(st.integers(-2**31, 2**31 - 1)), max_size=8),
                   st.lists(HOSTILE_TEXT, max_size=8), st.lists(st.floats(width=32), max_size=20))
KEYS = st.sampled_from(list(tiny_llama_metadata()) + [
    "llama.expert_count", "llama.expert_used_count", "llama.attention.key_length", "llama.attention.value_length",
    "llama.vocab_size", "llama.rope.scaling.factor", "split.count", "split.no", "split.tensors.count",
    "general.alignment", "llama.attention.sliding_window", "tokenizer.ggml.pre", "tokenizer.ggml.merges"])


@st.composite
def metadata_changes(draw) -> RawGGUF:
    """The tiny model with some metadata values replaced, added or dropped."""
    md = tiny_llama_metadata()
    for key, value in draw(st.dictionaries(KEYS, st.one_of(VALUES, st.none()), min_size=1, max_size=4)).items():
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value
    return tiny_llama(md)


@st.composite
def tensor_table_changes(draw) -> RawGGUF:
    """The tiny model with tensors renamed, reshaped, retyped, moved or dropped."""
    tensors = tiny_llama_tensors()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(tensors) - 1))
        t = tensors[i]
        change = draw(st.sampled_from(["name", "shape", "type", "offset", "drop"]))
        if change == "name":
            t.name = draw(st.one_of(HOSTILE_TEXT, st.builds("blk.{}.attn_q.weight".format, HOSTILE_INTS),
                                    st.sampled_from(["token_embd.weight", "blk.0.attn_q.weight", ""])))
        elif change == "shape":
            t.ne = draw(st.lists(st.integers(0, 2**40), min_size=0, max_size=5))
            t.data = b""
        elif change == "type":
            t.ggml_type = draw(st.integers(0, 200))
        elif change == "offset":
            t.offset = draw(st.one_of(st.integers(0, 2**20), st.integers(0, 2**64 - 1)))
        else:
            del tensors[i]
    return tiny_llama(tensors=tensors)


@st.composite
def header_bytes(draw) -> bytes:
    """A valid tiny model's bytes with its header fields overwritten, bytes flipped or a cut."""
    raw = bytearray(tiny_llama().to_bytes())
    kind = draw(st.sampled_from(["counts", "flip", "cut", "splice"]))
    if kind == "counts":
        raw[4:24] = struct.pack("<IQQ", draw(st.integers(0, 2**32 - 1)), draw(HOSTILE_INTS.map(lambda x: x % 2**64)),
                                draw(HOSTILE_INTS.map(lambda x: x % 2**64)))
    elif kind == "flip":
        header_end = min(len(raw), 4096)
        for _ in range(draw(st.integers(1, 16))):
            at = draw(st.integers(0, header_end - 1))
            raw[at] = draw(st.integers(0, 255))
    elif kind == "cut":
        del raw[draw(st.integers(0, len(raw))):]
    else:
        at = draw(st.integers(24, min(len(raw), 4096)))
        raw[at:at + 8] = struct.pack("<Q", draw(HOSTILE_INTS.map(lambda x: x % 2**64)))
    return bytes(raw)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), HOSTILE_TEXT),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children,
                                                                               max_size=4)),
    max_leaves=20)


@st.composite
def saved_json_text(draw, known_keys: list[str]) -> str:
    """Text of a saved JSON file: a dict over the schema's keys with arbitrary values, any JSON
    value, deep nesting, or text that is not JSON at all."""
    import json
    kind = draw(st.sampled_from(["schema", "any", "deep", "garbage"]))
    if kind == "schema":
        keys = st.one_of(st.sampled_from(known_keys), st.text(max_size=8))
        return json.dumps(draw(st.dictionaries(keys, JSON_VALUES, max_size=len(known_keys) + 2)))
    if kind == "any":
        return json.dumps(draw(JSON_VALUES))
    if kind == "deep":
        depth = draw(st.integers(100, 200_000))
        return "[" * depth + "]" * depth
    return draw(st.text(max_size=200))


# ---- running hostile input and checking how it ends ----

import os
import time
import tracemalloc
from collections import Counter
from contextlib import contextmanager

from hypothesis import HealthCheck, settings

PEAK_BYTES = 256 << 20      # generous: the inputs are tens of kB; a count taken from a file would be GBs
HANG_GUARD_S = 60.0         # not a speed test: a hang or a quadratic blow-up exceeds it by far
MAX_MESSAGE_CHARS = 700
OUTCOMES: Counter = Counter()   # (property, outcome) -> examples; reported by the long run


def fuzz_settings(ci_examples: int) -> settings:
    """CI: `ci_examples` derandomized examples (a few seconds). Long runs:
    FUZZ_EXAMPLES=5000 python -m pytest -q tests/fuzz -p no:cacheprovider
    (random examples; FUZZ_STATS=path writes the outcome counts as JSON)."""
    long_examples = int(os.environ.get("FUZZ_EXAMPLES", "0"))
    return settings(max_examples=long_examples or ci_examples, derandomize=not long_examples, deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                          HealthCheck.function_scoped_fixture,
                                                          HealthCheck.filter_too_much])


@contextmanager
def bounded(name: str):
    """Run hostile input: it may succeed or raise one of our user errors with a one-line,
    printable, bounded message; nothing else, within the memory bound and the hang guard."""
    from engine.errors import is_user_error, user_error_message
    tracemalloc.start()
    start_s = time.monotonic()
    outcome = "ok"
    try:
        yield
    except Exception as error:      # noqa: BLE001 -- the point is to sort every exception
        assert is_user_error(error), f"{type(error).__name__} is not a user error: {error!r}"[:2000]
        message = user_error_message(error)
        assert "\n" not in message and "\x1b" not in message and len(message) <= MAX_MESSAGE_CHARS, message[:2000]
        outcome = type(error).__name__
    finally:
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed_s = time.monotonic() - start_s
    assert peak_bytes < PEAK_BYTES, f"{peak_bytes >> 20} MiB allocated"
    assert elapsed_s < HANG_GUARD_S, f"took {elapsed_s:.0f} s"
    OUTCOMES[(name, outcome)] += 1
