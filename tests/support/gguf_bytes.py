"""GGUF files built byte by byte, for tests that need files no writer would produce: duplicate
keys, overlapping tensor data, absurd counts. Layout as in ggml's gguf.cpp (version 3)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gguf.constants import GGUFValueType

ALIGNMENT = 32
MAX_DATA_SECTION_BYTES = 1 << 24
_SCALAR_FORMATS = {GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
                   GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.BOOL: "<?",
                   GGUFValueType.UINT8: "<B", GGUFValueType.FLOAT64: "<d"}


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_bytes(key: str | bytes, vtype: GGUFValueType, value) -> bytes:
    """One metadata entry; `value` for ARRAY is (item_type, [items])."""
    return gguf_string(key) + struct.pack("<I", vtype) + value_bytes(vtype, value)


def value_bytes(vtype: GGUFValueType, value) -> bytes:
    if vtype == GGUFValueType.STRING:
        return gguf_string(value)
    if vtype == GGUFValueType.ARRAY:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(value_bytes(item_type, v) for v in items)
    return struct.pack(_SCALAR_FORMATS[vtype], value)


def auto_kv(key: str, value) -> bytes:
    """A metadata entry typed from its Python value (int -> UINT32 or UINT64, list -> ARRAY)."""
    if isinstance(value, bool):
        return kv_bytes(key, GGUFValueType.BOOL, value)
    if isinstance(value, int):
        return kv_bytes(key, GGUFValueType.UINT32 if 0 <= value < 1 << 32 else GGUFValueType.INT64
                        if value < 0 else GGUFValueType.UINT64, value)
    if isinstance(value, float):
        return kv_bytes(key, GGUFValueType.FLOAT32, value)
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return kv_bytes(key, GGUFValueType.ARRAY, (GGUFValueType.STRING, value))
        if all(isinstance(v, float) for v in value):
            return kv_bytes(key, GGUFValueType.ARRAY, (GGUFValueType.FLOAT32, value))
        return kv_bytes(key, GGUFValueType.ARRAY, (GGUFValueType.INT32, value))
    return kv_bytes(key, GGUFValueType.STRING, value)


@dataclass
class RawTensor:
    name: str
    ne: list[int]               # ggml order: ne[0] is the row length
    ggml_type: int = 0          # F32
    offset: int | None = None   # relative to the data section; None: packed after the previous one
    data: bytes | None = None   # default: zeros of the F32 size


@dataclass
class RawGGUF:
    kvs: list[bytes] = field(default_factory=list)
    tensors: list[RawTensor] = field(default_factory=list)
    version: int = 3

    def to_bytes(self) -> bytes:
        infos, blobs, next_offset = b"", [], 0
        for t in self.tensors:
            n_bytes = 4
            for d in t.ne:
                n_bytes *= d
            data = t.data if t.data is not None else bytes(n_bytes if t.ggml_type == 0 else 0)
            offset = next_offset if t.offset is None else t.offset
            infos += gguf_string(t.name) + struct.pack("<I", len(t.ne)) + b"".join(struct.pack("<Q", d) for d in t.ne)
            infos += struct.pack("<IQ", t.ggml_type % 2**32, offset % 2**64)     # claims past u64 wrap, as in a file
            blobs.append((offset, data))
            next_offset = max(next_offset, offset + -(-len(data) // ALIGNMENT) * ALIGNMENT)
        header = b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kvs))
        header += b"".join(self.kvs) + infos
        header += bytes(-len(header) % ALIGNMENT)
        blobs = [(o, d) for o, d in blobs if o + len(d) <= MAX_DATA_SECTION_BYTES]    # a huge claimed offset: header only
        section = bytearray(max([o + len(d) for o, d in blobs], default=0))
        for offset, data in blobs:
            section[offset:offset + len(data)] = data
        return header + bytes(section)

    def write(self, path) -> object:
        with open(path, "wb") as f:
            f.write(self.to_bytes())
        return path


def rewrite_gguf(src, dst, set_kv: dict | None = None, drop_kv=(), rename_tensors: dict | None = None,
                 drop_tensors=()) -> object:
    """A copy of the GGUF `src` at `dst` with metadata entries replaced, added or dropped and tensors
    renamed or dropped; tensor data is copied as it is. `set_kv` values are typed as in `auto_kv`,
    except that an existing key keeps its type when the new value has the same Python kind."""
    from engine.gguf.model_file import ModelFile
    set_kv, rename_tensors = dict(set_kv or {}), dict(rename_tensors or {})
    mf = ModelFile(src)
    raw = RawGGUF()
    for key, value in mf.metadata.items():
        if key in drop_kv:
            continue
        raw.kvs.append(auto_kv(key, set_kv.pop(key, value)))
    raw.kvs += [auto_kv(key, value) for key, value in set_kv.items()]
    for name, t in mf.tensors.items():
        if name in drop_tensors:
            continue
        data = bytes(mf.tensor_data(name).reshape(-1))
        raw.tensors.append(RawTensor(rename_tensors.get(name, name), list(reversed(t.shape)), t.ggml_type,
                                     data=data))
    mf.close()
    return raw.write(dst)
