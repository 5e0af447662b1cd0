"""Open GGUF files (single files and split sets) and expose metadata, tensors and raw bytes.

Every count and size the header claims is checked against the file's real size before it is
used, so a corrupt or hostile file gets a one-line `ModelFileError`, never a hang or a huge
allocation. Constants (value types, keys, block sizes) come from the `gguf` package.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType, Keys

from engine.gguf import ggml_types
from engine.gguf.quoting import printable

SPLIT_NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_QUOTED_PATH_CHARS = 300       # what an error quotes of a path or of a problem found in a file
MAX_QUOTED_PROBLEM_CHARS = 400
MAX_LISTED_PARTS = 3

# The smallest encodings a header entry can have; a count that needs more bytes than the file
# holds is rejected before anything is parsed or allocated.
MIN_KV_BYTES = 8 + 1 + 4 + 1          # key length, one key byte, value type, one value byte
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8   # name length, one byte, n_dims, one dim, type, offset
HEADER_BYTES = 4 + 4 + 8 + 8          # magic, version, n_tensors, n_kv


class ModelFileError(Exception):
    """A GGUF file (or split set) that cannot be used; the message names the file and the problem."""

    def __init__(self, path: os.PathLike[str] | str, problem: str):
        self.path = str(path)
        self.problem = printable(problem, MAX_QUOTED_PROBLEM_CHARS)
        super().__init__(f"{printable(self.path, MAX_QUOTED_PATH_CHARS)}: {self.problem}")


class ModelFileChangedError(ModelFileError):
    """The file was truncated, replaced or rewritten while its memory map was in use."""

    def __init__(self, path: os.PathLike[str] | str, detail: str):
        super().__init__(path, f"the model file changed on disk while it was in use ({detail}); open it again")


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# Mapped pages are entered into the page table as they are first read: with a MoE model each
# newly chosen expert's pages fault in during decode (about 2.5 us per fault of up to 64 KiB,
# hundreds per token over the first tokens). llama.cpp maps with MAP_POPULATE, which makes the
# load wait for the whole file; here a background thread populates the map after it is made
# (madvise MADV_POPULATE_READ, Linux 5.14+, in steps so that close() can stop it), and the load
# returns at once. Files larger than half the memory are left alone: populating them would
# evict the pages a decode needs next.
_MADV_POPULATE_READ = 22
POPULATE_STEP_BYTES = 64 << 20
POPULATE_MAX_MEMORY_FRACTION = 0.5


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class _Populator:
    """Enters a read-only map's pages into the page table on a background thread (ctypes drops
    the GIL during each madvise). Stops at the first refusal: an older kernel, or a file that
    shrank (the syscall reports the missing pages instead of raising SIGBUS)."""

    _madvise = _madvise()

    def __init__(self, buf: mmap.mmap):
        view = np.frombuffer(buf, dtype=np.uint8)
        address, self.size = view.ctypes.data, view.size
        del view        # no buffer export may outlive this: mmap.close() refuses while one exists
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(buf, address), name="populate model map", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, buf: mmap.mmap) -> _Populator | None:
        if cls._madvise is None or len(buf) > POPULATE_MAX_MEMORY_FRACTION * _memory_bytes():
            return None
        return cls(buf)

    def _run(self, buf: mmap.mmap, address: int) -> None:
        # buf is held here so that the map outlives the thread unless close() stops it first
        for start in range(0, self.size, POPULATE_STEP_BYTES):
            if self.stopped.is_set():
                return
            if self._madvise(address + start, min(POPULATE_STEP_BYTES, self.size - start), _MADV_POPULATE_READ):
                return

    def wait(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]      # numpy order: rows first; a routed-expert tensor is (n_expert, rows, cols)
    n_bytes: int
    file_index: int             # which part of a split set
    offset: int                 # absolute byte offset in that file

    @property
    def type_name(self) -> str:
        return ggml_types.type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def n_experts(self) -> int:
        """Leading dimension of a 3-D expert tensor; 0 for ordinary tensors."""
        return self.shape[0] if len(self.shape) == 3 else 0

    @property
    def expert_bytes(self) -> int:
        return self.n_bytes // self.shape[0] if len(self.shape) == 3 else 0


def _check_header_counts(path: Path, file_bytes: int) -> None:
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 4 or struct.unpack("<I", head[:4])[0] != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if len(head) < HEADER_BYTES:
        raise ModelFileError(path, f"truncated header: the file is only {file_bytes} bytes")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3):
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    room = file_bytes - HEADER_BYTES
    if n_kv * MIN_KV_BYTES > room:
        raise ModelFileError(path, f"header claims {n_kv} metadata entries, more than the {file_bytes}-byte file can hold")
    if n_tensors * MIN_TENSOR_INFO_BYTES > room:
        raise ModelFileError(path, f"header claims {n_tensors} tensors, more than the {file_bytes}-byte file can hold")


class _HeaderParser:
    """Bounds-checked reader of the GGUF header (key/values and tensor infos).

    Written here rather than using `gguf.GGUFReader` because that reader takes ~10 s on a
    262k-token vocabulary (one numpy view per string), refuses ggml types it does not know and
    does not check sizes against the file; this one reads the same format in well under a second.
    """

    SCALARS = {
        GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
        GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
        GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
        GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
    }

    def __init__(self, path: Path, buf):
        self.path, self.buf, self.pos = path, buf, HEADER_BYTES

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes < 0 or self.pos + n_bytes > len(self.buf):
            raise ModelFileError(self.path, f"truncated header: {what} at byte {self.pos} runs past the end "
                                            f"of the {len(self.buf)}-byte file")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key}")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        fmt = self.SCALARS.get(vtype)
        if fmt is None:
            raise ModelFileError(self.path, f"metadata {key!r} has unknown value type {vtype}")
        return self.scalar(fmt, f"value of {key}")

    def array(self, key: str) -> list:
        item_type = self.scalar("<I", f"array type of {key}")
        count = self.scalar("<Q", f"array length of {key}")
        if item_type == GGUFValueType.STRING:
            self.need(count * 8, f"array {key} ({count} strings)")
            return [self.string(f"element of {key}") for _ in range(count)]
        fmt = self.SCALARS.get(item_type)
        if fmt is None:
            raise ModelFileError(self.path, f"metadata array {key!r} has unsupported element type {item_type}")
        dtype = np.dtype(_NUMPY_OF[fmt])
        self.need(count * dtype.itemsize, f"array {key} ({count} elements)")
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
        self.pos += count * dtype.itemsize
        return values

    def metadata(self, n_kv: int) -> dict[str, Any]:
        md: dict[str, Any] = {}
        for i in range(n_kv):
            key = self.string("metadata key")
            # gguf_init_from_file_impl refuses both: a later duplicate would silently win here
            if not key:
                raise ModelFileError(self.path, f"metadata key {i} is empty")
            if key in md:
                raise ModelFileError(self.path, f"duplicate metadata key {key!r} (entry {i})")
            md[key] = self.value(self.scalar("<I", f"type of {key}"), key)
        return md

    def tensor_infos(self, n_tensors: int) -> list[tuple[str, list[int], int, int]]:
        infos = []
        for _ in range(n_tensors):
            name = self.string("tensor name")
            n_dims = self.scalar("<I", f"dimension count of {name}")
            if n_dims > 8:
                raise ModelFileError(self.path, f"tensor {name!r} claims {n_dims} dimensions (at most 8 are allowed)")
            ne = [self.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
            type_id = self.scalar("<I", f"type of {name}")
            rel_offset = self.scalar("<Q", f"offset of {name}")
            infos.append((name, ne, type_id, rel_offset))
        return infos


_NUMPY_OF = {"<B": "<u1", "<b": "<i1", "<H": "<u2", "<h": "<i2", "<I": "<u4", "<i": "<i4",
             "<f": "<f4", "<Q": "<u8", "<q": "<i8", "<d": "<f8", "<?": "?"}


def _read_part(path: Path, file_index: int) -> tuple[dict[str, Any], list[TensorInfo], int]:
    try:
        file_bytes = path.stat().st_size
    except OSError as e:
        raise ModelFileError(path, f"cannot open: {e.strerror or e}") from None
    _check_header_counts(path, file_bytes)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        parser = _HeaderParser(path, buf)
        metadata = parser.metadata(n_kv)
        infos = parser.tensor_infos(n_tensors)
        header_end = parser.pos
    alignment = metadata.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(path, f"invalid general.alignment {alignment!r}: must be a power of two")
    data_offset = -(-header_end // alignment) * alignment
    tensors = [_tensor_info(path, file_index, info, data_offset, file_bytes) for info in infos]
    _check_data_layout(path, tensors, data_offset, alignment)
    return metadata, tensors, data_offset


def _check_data_layout(path: Path, tensors: list[TensorInfo], data_offset: int, alignment: int) -> None:
    """Each tensor's data starts where the previous one's ends, padded to the alignment, as
    gguf_init_from_file_impl requires: data that overlaps another tensor's, or is misaligned, is
    refused rather than read as two tensors sharing bytes."""
    expected = 0           # relative to the data section; None once a size is unknown (ik types)
    for t in tensors:
        rel_offset = t.offset - data_offset
        if rel_offset % alignment:
            raise ModelFileError(path, f"tensor {t.name!r} data at offset {rel_offset} is not aligned to "
                                       f"{alignment} bytes")
        if expected is not None and rel_offset != expected:
            how = "overlaps the previous tensor's data" if rel_offset < expected else "leaves a gap after the previous tensor"
            raise ModelFileError(path, f"tensor {t.name!r} data at offset {rel_offset} {how} "
                                       f"(expected offset {expected})")
        expected = None if expected is None or t.n_bytes < 0 else expected + -(-t.n_bytes // alignment) * alignment


def _tensor_info(path: Path, file_index: int, info, data_offset: int, file_bytes: int) -> TensorInfo:
    name, ne, type_id, rel_offset = info     # ne: ggml order, ne[0] is the row length
    if not ggml_types.is_known(type_id):
        raise ModelFileError(path, f"tensor {name!r} has unknown ggml type id {type_id}")
    if any(d <= 0 or d > 1 << 40 for d in ne):
        raise ModelFileError(path, f"tensor {name!r} has an invalid shape {ne}")
    row = ggml_types.row_bytes(type_id, ne[0]) if ne else None
    if row is None and ne and not ggml_types.is_ik_only(type_id):
        raise ModelFileError(path, f"tensor {name!r} of type {ggml_types.type_name(type_id)} has {ne[0]} elements "
                                   f"per row, not a multiple of the block size {ggml_types.block_size(type_id)}")
    n_bytes = -1 if row is None else row * int(np.prod(ne[1:], dtype=object))   # -1: layout unknown
    offset = data_offset + rel_offset
    if n_bytes > 0 and offset + n_bytes > file_bytes:
        raise ModelFileError(path, f"tensor {name!r} data ({n_bytes} bytes at offset {offset}) lies past the "
                                   f"end of the file ({file_bytes} bytes): the file is truncated")
    return TensorInfo(name, type_id, tuple(reversed(ne)), n_bytes, file_index, offset)


def split_paths(path: Path) -> list[Path]:
    """All parts of a split set named like `model-00001-of-00005.gguf`, or just `path`."""
    m = SPLIT_NAME_RE.match(path.name)
    if not m:
        return [path]
    number, count = int(m["no"]), int(m["count"])
    if count == 0 or not 1 <= number <= count:
        raise ModelFileError(path, f"the name says part {number} of {count}, which no split set has")
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _listed(names: list[str]) -> str:
    """A few names and how many more: a split set can claim 99,999 parts."""
    shown = ", ".join(names[:MAX_LISTED_PARTS])
    return shown + (f" (and {len(names) - MAX_LISTED_PARTS} more)" if len(names) > MAX_LISTED_PARTS else "")


class ModelFile:
    """A GGUF model: one file or a split set opened through its first (or any) part."""

    def __init__(self, path: os.PathLike[str] | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "no such file" if not self.path.exists() else "not a regular file")
        self.paths = split_paths(self.path)
        missing = [p.name for p in self.paths if not p.exists()]
        if missing:
            raise ModelFileError(self.path, f"split set of {len(self.paths)} files is missing {len(missing)} "
                                            f"part(s): {_listed(missing)}")
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._data_offsets: list[int] = []
        for index, part in enumerate(self.paths):
            metadata, tensors, data_offset = _read_part(part, index)
            self._data_offsets.append(data_offset)
            self._check_split_part(part, index, metadata)
            if index == 0:
                self.metadata = metadata
            for t in tensors:
                if t.name in self.tensors:
                    raise ModelFileError(part, f"tensor {t.name!r} appears twice in the split set")
                self.tensors[t.name] = t
        self._check_split_tensor_count()
        self._maps: dict[int, mmap.mmap] = {}
        self._populators: dict[int, _Populator] = {}
        self._identities = [_identity(p) for p in self.paths]

    def check_unchanged(self) -> None:
        """Raise ModelFileChangedError when a part was truncated, replaced or rewritten since it
        was opened. Reading a memory-mapped page past a truncated end is a SIGBUS that kills the
        process, so whoever reads tensor data calls this between steps (one stat per part)."""
        for path, opened in zip(self.paths, self._identities):
            try:
                now = _identity(path)
            except OSError as e:
                raise ModelFileChangedError(path, f"it can no longer be read: {e.strerror}") from None
            if now[2] < opened[2]:
                raise ModelFileChangedError(path, f"it shrank from {opened[2]} to {now[2]} bytes")
            if now != opened:
                raise ModelFileChangedError(path, "it was replaced or rewritten")

    def _check_split_part(self, part: Path, index: int, metadata: dict[str, Any]) -> None:
        for key in (Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT):
            # llama.cpp reads these as integers (get_key refuses another type)
            if key in metadata and type(metadata[key]) is not int:
                raise ModelFileError(part, f"{key} must be an integer, not {metadata[key]!r}")
        if len(self.paths) == 1:
            if metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT, 1) > 1:
                raise ModelFileError(part, f"is part of a split set of {metadata[Keys.Split.LLM_KV_SPLIT_COUNT]} "
                                           "files but its name does not say which (expected NAME-00001-of-0000N.gguf)")
            return
        count = metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT)
        number = metadata.get(Keys.Split.LLM_KV_SPLIT_NO)
        if count != len(self.paths) or number != index:
            raise ModelFileError(part, f"split metadata says part {number} of {count}, but the file name says "
                                       f"part {index + 1} of {len(self.paths)}: parts from different sets?")

    def _check_split_tensor_count(self) -> None:
        expected = self.metadata.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
        if expected is not None and expected != len(self.tensors):
            raise ModelFileError(self.path, f"split set holds {len(self.tensors)} tensors but its first part "
                                            f"announces {expected}")

    # --- metadata -------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return str(self.metadata.get(Keys.General.ARCHITECTURE, "unknown"))

    @property
    def name(self) -> str:
        return str(self.metadata.get(Keys.General.NAME, self.path.stem))

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    @property
    def tensor_bytes(self) -> int:
        return sum(max(t.n_bytes, 0) for t in self.tensors.values())

    def unsupported_types(self) -> dict[str, str]:
        """Tensors whose type we cannot run, with the reason, e.g. ik_llama.cpp-only types."""
        reasons = {}
        for t in self.tensors.values():
            if ggml_types.is_ik_only(t.ggml_type):
                reasons[t.name] = f"uses ik_llama.cpp's {t.type_name} type; only ik_llama.cpp can run it"
            elif not ggml_types.is_runnable(t.ggml_type):
                reasons[t.name] = f"uses ggml type {t.type_name}, which this engine cannot run"
        return reasons

    # --- bytes ----------------------------------------------------------------------------

    def _map(self, file_index: int) -> mmap.mmap:
        if file_index not in self._maps:
            with open(self.paths[file_index], "rb") as f:
                buf = self._maps[file_index] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            populator = _Populator.start(buf)
            if populator is not None:
                self._populators[file_index] = populator
        return self._maps[file_index]

    def populated(self, timeout: float | None = None) -> bool:
        """Wait (at most timeout seconds) for the background population of the maps made so
        far; True when no population is still running."""
        return all(p.wait(timeout) for p in self._populators.values())

    @property
    def data_offsets(self) -> list[int]:
        """Where each part's tensor data section starts."""
        return list(self._data_offsets)

    def tensor_data(self, name: str) -> np.ndarray:
        """Read-only uint8 view of a tensor's bytes, shaped (rows..., row_bytes), memory-mapped."""
        t = self.tensors[name]
        if t.n_bytes < 0:
            raise ModelFileError(self.path, f"tensor {name!r}: byte layout of {t.type_name} is unknown")
        flat = np.frombuffer(self._map(t.file_index), dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        rows = t.shape[:-1] if len(t.shape) > 1 else (1,)
        return flat.reshape(*rows, -1)

    def expert_byte_range(self, name: str, expert: int) -> tuple[Path, int, int]:
        """(file, offset, length) of one expert's matrix inside a 3-D `ffn_*_exps` tensor."""
        t = self.tensors[name]
        if t.n_experts == 0:
            raise ValueError(f"{name} is not a routed-expert tensor")
        if not 0 <= expert < t.n_experts:
            raise IndexError(f"{name} has {t.n_experts} experts; no expert {expert}")
        return self.paths[t.file_index], t.offset + expert * t.expert_bytes, t.expert_bytes

    def close(self) -> None:
        for p in self._populators.values():
            p.stop()
        self._populators.clear()
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass    # a view is still alive; the map closes when it is collected
        self._maps.clear()

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
