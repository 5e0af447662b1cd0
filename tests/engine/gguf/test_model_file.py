import struct

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from engine.gguf import model_file as model_file_module
from engine.gguf.model_file import ModelFile, ModelFileError
from engine.plan.inventory import Inventory


def write_gguf(path, tensors=None, metadata=None, arch="llama"):
    writer = GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    for name, array in (tensors or {"a.weight": np.arange(1024, dtype=np.float32).reshape(4, 256)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def type_field_offset(path, tensor_name):
    """Byte offset of a tensor's ggml type field in the header."""
    reader = GGUFReader(str(path))
    field = next(t for t in reader.tensors if t.name == tensor_name).field
    return int(field.offset + sum(p.nbytes for p in field.parts[:4]))


def patch_u32(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", value))


def error_of(path) -> str:
    with pytest.raises(ModelFileError) as info:
        ModelFile(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message or path.name in message
    return message


def test_reads_metadata_tensors_and_bytes(tmp_path):
    data = np.arange(1024, dtype=np.float32).reshape(4, 256)
    path = write_gguf(tmp_path / "m.gguf", {"a.weight": data}, {"llama.block_count": 1})
    mf = ModelFile(path)
    assert mf.architecture == "llama"
    assert mf.metadata["llama.block_count"] == 1
    t = mf.tensors["a.weight"]
    assert (t.type_name, t.shape, t.n_bytes) == ("F32", (4, 256), 4096)
    assert np.array_equal(mf.tensor_data("a.weight").view(np.float32), data)
    with pytest.raises(ValueError):
        mf.tensor_data("a.weight")[0, 0] = 1     # read-only


def test_expert_byte_range(tmp_path):
    experts = np.random.default_rng(0).standard_normal((3, 2, 32)).astype(np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up_exps.weight": experts})
    mf = ModelFile(path)
    file, offset, length = mf.expert_byte_range("blk.0.ffn_up_exps.weight", 2)
    assert length == 2 * 32 * 4
    raw = np.fromfile(file, dtype=np.uint8)[offset:offset + length]
    assert np.array_equal(raw.view(np.float32).reshape(2, 32), experts[2])
    with pytest.raises(IndexError):
        mf.expert_byte_range("blk.0.ffn_up_exps.weight", 3)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, I am a text file pretending to be a model")
    assert "not a GGUF file" in error_of(path)


def test_missing_file(tmp_path):
    assert "no such file" in error_of(tmp_path / "absent.gguf")


def test_truncated_header(tmp_path):
    full = write_gguf(tmp_path / "full.gguf", metadata={"general.name": "x" * 200})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:120])
    assert "truncated header" in error_of(cut)


def test_tiny_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    assert "truncated header" in error_of(path)


def test_tensor_data_past_end_of_file(tmp_path):
    full = write_gguf(tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:-1000])
    message = error_of(cut)
    assert "a.weight" in message and "truncated" in message


@pytest.mark.parametrize("field_offset, what", [(8, "tensors"), (16, "metadata entries")])
def test_absurd_header_counts_are_refused_before_parsing(tmp_path, field_offset, what):
    path = write_gguf(tmp_path / "m.gguf")
    with open(path, "r+b") as f:
        f.seek(field_offset)
        f.write(struct.pack("<Q", 1 << 60))
    message = error_of(path)
    assert f"claims {1 << 60} {what}" in message


def test_absurd_array_length(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", metadata={"general.name": "abc"})
    raw = bytearray(path.read_bytes())
    # an array whose header claims 2**50 strings: nothing may be allocated for it
    key = b"general.name"
    at = raw.index(key) + len(key)
    raw[at:at + 4] = struct.pack("<I", 9)                       # type ARRAY
    raw[at + 4:at + 16] = struct.pack("<I", 8) + struct.pack("<Q", 1 << 50)[:8]
    path.write_bytes(bytes(raw))
    assert "runs past the end" in error_of(path)


def test_unknown_type_id(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    patch_u32(path, type_field_offset(path, "a.weight"), 77)
    message = error_of(path)
    assert "unknown ggml type id 77" in message and "a.weight" in message


def test_ik_llama_type_is_named_and_sized(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up_exps.weight": np.zeros((2, 4, 256), np.float32)})
    patch_u32(path, type_field_offset(path, "blk.0.ffn_up_exps.weight"), 339)     # IQ4_K_R4
    mf = ModelFile(path)
    t = mf.tensors["blk.0.ffn_up_exps.weight"]
    assert t.type_name == "IQ4_K_R4"
    assert t.n_bytes == 2 * 4 * 144        # 144 bytes per 256-value IQ4_K block
    reason = mf.unsupported_types()["blk.0.ffn_up_exps.weight"]
    assert reason == "uses ik_llama.cpp's IQ4_K_R4 type; only ik_llama.cpp can run it"
    inventory = Inventory.from_model_file(mf)
    assert inventory.by_name["blk.0.ffn_up_exps.weight"].expert_bytes == 4 * 144
    assert not inventory.runnable


def write_split(tmp_path, count_claims=(2, 2), numbers=(0, 1)):
    paths = []
    for i, (count, number) in enumerate(zip(count_claims, numbers)):
        path = tmp_path / f"model-{i + 1:05d}-of-00002.gguf"
        write_gguf(path, {f"t{i}.weight": np.full((2, 32), i, np.float32)},
                   {"split.no": number, "split.count": count, "split.tensors.count": 2})
        paths.append(path)
    return paths


def test_split_set_opens_from_any_part(tmp_path):
    first, second = write_split(tmp_path)
    for path in (first, second):
        mf = ModelFile(path)
        assert set(mf.tensors) == {"t0.weight", "t1.weight"}
        assert mf.tensors["t1.weight"].file_index == 1
        assert np.all(mf.tensor_data("t1.weight").view(np.float32) == 1)


def test_split_set_missing_part(tmp_path):
    first, second = write_split(tmp_path)
    second.unlink()
    assert "missing 1 part(s): model-00002-of-00002.gguf" in error_of(first)


def test_split_set_mismatched_parts(tmp_path):
    first, second = write_split(tmp_path, count_claims=(2, 3))
    with pytest.raises(ModelFileError) as info:
        ModelFile(first)
    assert info.value.path == str(second)       # the message names the part that does not belong
    assert "part 1 of 3" in str(info.value) and "different sets" in str(info.value)


@pytest.mark.parametrize("name", ["llama-dense/Q4_K_M", "llama-moe/F32", "qwen3/Q5_K_M", "qwen3moe/Q4_K_M",
                                  "gemma3/Q8_0", "llama4/Q4_K_M", "deepseek2/Q4_K_M", "deepseek2/F16",
                                  "llama-dense/F16", "llama-dense/Q6_K", "llama-dense/Q8_0", "llama-dense/Q4_0",
                                  "llama-dense/F32", "llama-moe/Q4_K_M", "qwen3/F32", "qwen3moe/F16",
                                  "gemma3/F16", "llama4/F16"])
def test_inventory_total_matches_the_data_section(fixtures_dir, name):
    check_data_section(fixtures_dir / f"{name}.gguf")


def test_gemma_inventory_total_matches_the_data_section(gemma_path):
    check_data_section(gemma_path)


def check_data_section(path):
    mf = ModelFile(path)
    inventory = Inventory.from_model_file(mf)
    assert inventory.total_bytes == sum(t.n_bytes for t in mf.tensors.values())
    assert inventory.total_bytes == sum(layer.n_bytes for layer in inventory.layers) + \
        sum(t.n_bytes for t in inventory.globals)
    # tensors tile the data section: in order, without overlap, each gap only alignment padding
    alignment = mf.metadata.get("general.alignment", 32)
    spans = sorted((t.offset, t.n_bytes) for t in mf.tensors.values())
    position = mf.data_offsets[0]
    for offset, n_bytes in spans:
        assert position <= offset < position + alignment
        position = offset + n_bytes
    assert mf.file_bytes - alignment < position <= mf.file_bytes
    data_section = mf.file_bytes - mf.data_offsets[0]
    assert data_section - len(spans) * alignment <= inventory.total_bytes <= data_section


def page_faults_reading(mf: ModelFile) -> int:
    """Minor page faults taken while reading one byte of every page of every tensor."""
    import resource
    views = [mf.tensor_data(name).reshape(-1) for name in mf.tensors]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for view in views:
        int(view[::1024].sum(dtype=np.uint64))
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(model_file_module._Populator._madvise is None, reason="populating maps needs Linux")
def test_maps_are_populated_in_the_background(tmp_path, monkeypatch):
    tensors = {f"t{i}.weight": np.full((256, 4096), i, dtype=np.float32) for i in range(8)}     # 32 MiB
    path = write_gguf(tmp_path / "m.gguf", tensors)
    with ModelFile(path) as mf:
        mf.tensor_data("t0.weight")         # maps the file
        assert mf.populated(timeout=60)
        assert page_faults_reading(mf) < 16     # the reads' own few allocations at most
    monkeypatch.setattr(model_file_module, "POPULATE_MAX_MEMORY_FRACTION", 0.0)
    with ModelFile(path) as mf:             # what it spares: a fault per few pages read
        mf.tensor_data("t0.weight")
        assert mf.populated(timeout=0)
        assert page_faults_reading(mf) > 32


def test_closing_stops_the_population(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"a.weight": np.ones((256, 4096), dtype=np.float32)})
    mf = ModelFile(path)
    mf.tensor_data("a.weight")
    populators = list(mf._populators.values())
    mf.close()
    assert all(not p.thread.is_alive() for p in populators)
    assert mf.populated(timeout=0)
