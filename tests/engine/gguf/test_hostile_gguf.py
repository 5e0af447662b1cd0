"""GGUF files made to break the parser: each ends in one bounded, printable ModelFileError."""
import pytest
from gguf.constants import GGUFValueType

from engine.gguf.model_file import ModelFile, ModelFileError
from engine.gguf.quoting import printable
from gguf_bytes import RawGGUF, RawTensor, auto_kv, kv_bytes


def error_of(path) -> str:
    with pytest.raises(ModelFileError) as info:
        ModelFile(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 1000
    return message


def two_tensors(**second) -> RawGGUF:
    return RawGGUF([auto_kv("general.architecture", "llama")],
                   [RawTensor("a.weight", [32, 2]), RawTensor("b.weight", [32, 2], **second)])


def test_raw_builder_makes_files_we_read(tmp_path):
    mf = ModelFile(two_tensors().write(tmp_path / "ok.gguf"))
    assert mf.tensors["b.weight"].offset - mf.tensors["a.weight"].offset == 256


def test_duplicate_metadata_key_is_refused(tmp_path):
    raw = RawGGUF([auto_kv("general.architecture", "llama"), auto_kv("general.name", "a"),
                   auto_kv("general.name", "b")], [RawTensor("a.weight", [32])])
    assert "duplicate metadata key 'general.name'" in error_of(raw.write(tmp_path / "dup.gguf"))


def test_empty_metadata_key_is_refused(tmp_path):
    raw = RawGGUF([auto_kv("", "x")], [RawTensor("a.weight", [32])])
    assert "metadata key 0 is empty" in error_of(raw.write(tmp_path / "empty.gguf"))


def test_overlapping_tensor_data_is_refused(tmp_path):
    message = error_of(two_tensors(offset=0).write(tmp_path / "overlap.gguf"))
    assert "'b.weight'" in message and "overlaps" in message


def test_misaligned_tensor_data_is_refused(tmp_path):
    message = error_of(two_tensors(offset=260).write(tmp_path / "misaligned.gguf"))
    assert "not aligned to 32 bytes" in message


def test_gap_between_tensors_is_refused(tmp_path):
    assert "leaves a gap" in error_of(two_tensors(offset=512).write(tmp_path / "gap.gguf"))


def test_row_not_a_multiple_of_the_block_is_refused(tmp_path):
    raw = RawGGUF([auto_kv("general.architecture", "llama")], [RawTensor("q.weight", [33, 2], ggml_type=8)])
    assert "not a multiple of the block size 32" in error_of(raw.write(tmp_path / "q8.gguf"))


def test_zero_part_split_name_is_refused(tmp_path):
    path = two_tensors().write(tmp_path / "m-00001-of-00000.gguf")
    assert "part 1 of 0" in error_of(path)


def test_huge_split_count_gives_a_short_message(tmp_path):
    path = two_tensors().write(tmp_path / "m-00001-of-99999.gguf")
    message = error_of(path)
    assert "missing 99998 part(s)" in message and "(and 99995 more)" in message and len(message) < 400


@pytest.mark.parametrize("value", ["two", 2.5, True])
def test_non_integer_split_count_is_refused(tmp_path, value):
    raw = two_tensors()
    raw.kvs.append(auto_kv("split.count", value))
    assert "split.count must be an integer" in error_of(raw.write(tmp_path / "m.gguf"))


def test_long_tensor_name_is_quoted_briefly(tmp_path):
    raw = RawGGUF([auto_kv("general.architecture", "llama")], [RawTensor("x" * 200_000, [32], ggml_type=77)])
    message = error_of(raw.write(tmp_path / "long.gguf"))
    assert "more characters" in message


def test_control_characters_in_messages_are_escaped(tmp_path):
    raw = RawGGUF([auto_kv("general.architecture", "llama")], [RawTensor("\x1b]0;owned\x07", [32], ggml_type=77)])
    assert "\\x1b]0;owned\\x07" in error_of(raw.write(tmp_path / "esc.gguf"))


def test_printable_escapes_terminal_and_bidi_controls():
    assert printable("a\x1b[2Jb\x9b\u202e") == "a\\x1b[2Jb\\x9b\\u202e"
    assert printable("line\nnext\ttab", keep_lines=True) == "line\nnext\ttab"
    assert printable("ok" * 10, max_chars=4) == "okok... (16 more characters)"


def test_a_string_typed_alignment_is_refused(tmp_path):
    raw = two_tensors()
    raw.kvs.append(kv_bytes("general.alignment", GGUFValueType.STRING, "32"))
    assert "general.alignment" in error_of(raw.write(tmp_path / "m.gguf"))
