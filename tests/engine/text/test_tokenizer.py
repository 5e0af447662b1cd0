"""Tokenizer tests: llama.cpp's vocab fixtures bit for bit, special tokens, detokenizing, streaming."""
from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path

import pytest

from engine.text import pretokenize
from engine.gguf.model_file import ModelFile
from engine.text.tokenizer import StreamingDetokenizer, Tokenizer

VOCAB_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures" / "vocab"
VOCAB_NAMES = sorted(p.name[len("ggml-vocab-"):-len(".gguf")] for p in VOCAB_DIR.glob("ggml-vocab-*.gguf"))
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


@functools.lru_cache(maxsize=None)
def metadata(name: str) -> dict:
    path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"vocab fixture {path} not found")
    return ModelFile(path).metadata


@functools.lru_cache(maxsize=None)
def vocab(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(metadata(name))


def fixture_cases(name: str) -> list[tuple[str, list[int]]]:
    """The .inp/.out pairs, split the way llama.cpp's test-tokenizer-0 splits them."""
    base = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    raw = base.with_name(base.name + ".inp").read_bytes().decode("utf-8")
    texts = raw.split(TEST_SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()
    lines = base.with_name(base.name + ".out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines) > 0
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines)]


def mismatches(tok: Tokenizer, cases: list[tuple[str, list[int]]]) -> list[tuple[str, list[int], list[int]]]:
    return [(text, expected, got) for text, expected in cases if (got := tok.encode(text)) != expected]


# ---- llama.cpp's vocab fixtures ----

@pytest.mark.parametrize("name", VOCAB_NAMES)
def test_vocab_fixture_is_bit_exact(name):
    assert mismatches(vocab(name), fixture_cases(name)) == []


@pytest.mark.parametrize("name", [n for n in VOCAB_NAMES if n not in ("llama-spm", "phi-3")])
def test_python_merge_loop_matches_fixtures_too(name):
    tok = copy.copy(vocab(name))
    assert tok.vocab_type == "BPE" and tok._hf_bpe is not None
    tok._hf_bpe, tok._word_cache = None, {}          # the exact fallback used when `tokenizers` refuses a merge list
    assert mismatches(tok, fixture_cases(name)) == []


def test_every_vocab_fixture_is_covered():
    assert {"llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2", "deepseek-llm"} <= set(VOCAB_NAMES)


@pytest.mark.parametrize("name", VOCAB_NAMES)
def test_pieces_give_back_the_text(name):
    tok = vocab(name)
    for text, expected in fixture_cases(name):
        if tok.clean_spaces:     # decode() would also apply llama.cpp's space clean-up: compare raw pieces
            assert b"".join(tok.token_to_piece(i) for i in expected) == text.encode("utf-8")
        else:
            assert tok.decode(expected) == text


# ---- special tokens ----

def test_special_ids_and_end_of_generation():
    llama3 = vocab("llama-bpe")
    assert (llama3.bos_id, llama3.eos_id, llama3.eot_id) == (128000, 128001, 128009)
    assert llama3.eog_ids == {128001, 128009}
    qwen = vocab("qwen2")
    assert {151643, 151645} <= qwen.eog_ids and qwen.is_eog(151645) and not qwen.is_eog(198)
    starcoder = vocab("starcoder")
    assert [starcoder.special_ids[k] for k in ("fim_pre", "fim_suf", "fim_mid", "fim_pad")] == [1, 3, 2, 4]
    assert starcoder.eog_ids == {0, 4}
    spm = vocab("llama-spm")
    assert (spm.bos_id, spm.eos_id, spm.unk_id, spm.eot_id, spm.nl_id) == (1, 2, 0, None, 13)
    assert spm.eog_ids == {2}
    phi3 = vocab("phi-3")
    assert phi3.eog_ids == {2, 32000, 32007} and phi3.eot_id == 32007   # <|end|> is listed before <|endoftext|>


def test_add_special_follows_the_vocab():
    spm = vocab("llama-spm")
    plain = spm.encode("Hello world")
    assert spm.encode("Hello world", add_special=True) == [1] + plain
    assert spm.encode("", add_special=True) == [1] and spm.encode("") == []
    assert vocab("llama-bpe").encode("Hello", add_special=True) == [128000, 9906]   # llama3 default: BOS
    gpt2 = vocab("gpt-2")
    assert gpt2.add_bos is False and gpt2.encode("Hello", add_special=True) == gpt2.encode("Hello")
    with_eos = Tokenizer.from_metadata({**metadata("llama-spm"), "tokenizer.ggml.add_eos_token": True,
                                        "tokenizer.ggml.add_bos_token": False})
    assert with_eos.encode("Hello world", add_special=True) == plain + [2]


def test_parse_special_recognises_control_tokens_only_when_asked():
    tok = vocab("llama-bpe")
    assert tok.encode("<|begin_of_text|>Hello", parse_special=True) == [128000, 9906]
    as_text = tok.encode("<|begin_of_text|>Hello")
    assert as_text == [27, 91, 7413, 3659, 4424, 91, 29, 9906]
    assert tok.decode(as_text) == "<|begin_of_text|>Hello"


def test_phi3_special_tokens_swallow_following_spaces():
    tok = vocab("phi-3")      # llama.cpp gives phi-3's special tokens RSTRIP
    ids = tok.encode("<|user|>  hi", parse_special=True)
    assert ids == [32010] + tok.encode("hi") == [32010, 7251]
    assert ids != [32010] + tok.encode("  hi")


def test_token_to_piece():
    spm = vocab("llama-spm")
    assert spm.token_to_piece(1) == b"" and spm.token_to_piece(1, special=True) == b"<s>"
    assert spm.token_to_piece(13) == b"\n"                       # <0x0A>
    assert spm.token_to_piece(spm.encode("Hello")[0]) == b" Hello"
    assert spm.token_to_piece(spm.encode("Hello")[0], lstrip=1) == b"Hello"
    gpt2 = vocab("gpt-2")
    assert gpt2.token_text(995) == "\u0120world" and gpt2.token_to_piece(995) == b" world"
    assert gpt2.token_to_piece(50256) == b"" and gpt2.token_to_piece(50256, special=True) == b"<|endoftext|>"
    with pytest.raises(IndexError):
        gpt2.token_to_piece(gpt2.n_vocab)


def test_clean_spaces_on_decode():
    tok = vocab("gpt-2")
    assert tok.clean_spaces
    text = "Hello , world ! it 's a ' b ' c 't x ' ' y"
    assert tok.decode(tok.encode(text)) == "Hello, world! it's a'b'c 't x'' y"


# ---- streaming ----

def test_streaming_holds_back_a_split_character():
    tok = vocab("llama-spm")
    ids = tok.encode("\U0001f999")                 # no piece for it: space + four byte tokens
    assert ids == [29871, 243, 162, 169, 156]
    stream = StreamingDetokenizer(tok)
    assert [stream.add_token(i) for i in ids] == [" ", "", "", "", "\U0001f999"]
    assert stream.finalize() == "" and stream.text == " \U0001f999"
    stripped = StreamingDetokenizer(tok, strip_first_space=True)
    assert "".join(stripped.add_token(i) for i in ids) == "\U0001f999"


def test_streaming_byte_level_text_matches_decode():
    tok = vocab("qwen2")
    text = "Emoji \U0001f999 and caf\u00e9 and \u4f60\u597d!"
    ids = tok.encode(text)
    stream = StreamingDetokenizer(tok)
    segments = [stream.add_token(i) for i in ids]
    assert "".join(segments) == text and stream.text == text
    assert "" in segments and not any("\ufffd" in s for s in segments)


def test_streaming_flushes_an_unfinished_character():
    tok = vocab("llama-spm")
    stream = StreamingDetokenizer(tok)
    assert stream.add_token(243) == "" and stream.add_token(162) == ""
    assert stream.finalize() == "\ufffd"


# ---- Gemma 3 (262k SPM vocab with user-defined tokens) ----

@pytest.fixture(scope="module")
def gemma(gemma_path):
    return Tokenizer.from_metadata(ModelFile(gemma_path).metadata)


def test_gemma3_hello_world(gemma):
    ids = gemma.encode("Hello world", add_special=True)
    assert ids == [2, 9259, 1902]
    assert [gemma.token_text(i) for i in ids] == ["<bos>", "Hello", "\u2581world"]
    assert gemma.decode(ids) == "Hello world" and gemma.decode(ids, special=True) == "<bos>Hello world"
    assert (gemma.n_vocab, gemma.add_bos, gemma.add_space_prefix, gemma.eot_id) == (262144, True, False, 106)
    assert {1, 106} <= gemma.eog_ids


def test_gemma3_user_defined_tokens_are_always_cut_out(gemma):
    text = "<start_of_turn>user\nHi\n\n"
    assert gemma.encode(text, parse_special=True) == [105, 2364, 107, 10979, 108]
    as_text = gemma.encode(text)
    assert 105 not in as_text and as_text[-3:] == [107, 10979, 108]    # "\n" and "\n\n" are user-defined
    assert gemma.decode(as_text) == text


# ---- errors ----

def test_unknown_tokenizer_model_is_named():
    with pytest.raises(ValueError, match=r"'bert'.*supported: llama, gpt2"):
        Tokenizer.from_metadata({**metadata("gpt-2"), "tokenizer.ggml.model": "bert"})


def test_unknown_pre_tokenizer_is_named_with_the_supported_list():
    with pytest.raises(ValueError, match=r"'no-such-pre'.*supported:.*llama-bpe.*qwen2"):
        Tokenizer.from_metadata({**metadata("gpt-2"), "tokenizer.ggml.pre": "no-such-pre"})


def test_missing_pre_tokenizer_falls_back_to_default(caplog):
    md = {k: v for k, v in metadata("gpt-2").items() if k != "tokenizer.ggml.pre"}
    with caplog.at_level(logging.WARNING, logger="engine.text.tokenizer"):
        tok = Tokenizer.from_metadata(md)
    assert "default" in caplog.text and tok.pre == "default"
    text = "Hello, y'all! 12345 $x+y"
    default = Tokenizer.from_metadata({**metadata("gpt-2"), "tokenizer.ggml.pre": "default"})
    assert tok.encode(text) == default.encode(text) != vocab("gpt-2").encode(text)


# ---- pre-tokenizer regexes ----

def split(pre: str, text: str) -> list[str]:
    return pretokenize.split_words(text, pretokenize.compiled_regexes(pretokenize.PRE_TOKENIZERS[pre]))


def test_llama3_split():
    assert split("llama-bpe", "Hello, it'S y'ALL! 12345\n\n  x") == [
        "Hello", ",", " it", "'S", " y", "'ALL", "!", " ", "123", "45", "\n\n", " ", " x"]


def test_deepseek_v3_split():
    assert split("deepseek-v3", "Hello, \u4e16\u754c! 12345 caf\u00e9") == [
        "Hello", ",", " ", "\u4e16\u754c", "!", " ", "123", "45", " caf\u00e9"]


def test_whitespace_is_llamas_not_pythons():
    # \x1c is whitespace to Python's re but not to llama.cpp; U+3000 is whitespace to both
    assert split("gpt-2", "a \x1cb") == ["a", " \x1c", "b"]
    assert split("gpt-2", "a\u3000b") == ["a", "\u3000", "b"]


def test_unicode_15_letters_count_as_letters():
    assert pretokenize.major_category(0x31350) == "L" and pretokenize.major_category(0x1F6DC) == "S"
    assert split("gpt-2", "x\U00031350y") == ["x\U00031350y"]


def test_dollar_means_end_of_input():
    pattern, on_collapsed = pretokenize.translate_pattern("a$")
    assert pattern.search("a\n") is None and pattern.search("ba") is not None and not on_collapsed
