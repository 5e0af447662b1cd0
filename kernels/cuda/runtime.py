"""The device runtime the CUDA backend is written against, with two implementations.

    alloc(shape, dtype) / zeros / upload(host) / download(device_array)
    launch(source, kernel, grid, block, args, shared_bytes=0, name_expressions=())
    gemm_nt(a, b)           a @ b.T in float32 (cuBLAS through CuPy; NumPy on the emulator)
    synchronize()
    begin_capture() / end_capture() -> graph / abort_capture() / replay(graph)

A capture records the launches and device-to-device copies issued on the runtime's stream without
running them; replay runs the recorded sequence again with the scalar arguments it was captured
with, reading whatever the captured buffers hold by then. Memory allocated while capturing belongs
to the graph (kept alive, never reused) as a captured kernel writes it on every replay. Anything
that needs the host in the middle — an upload from host memory, a download, a synchronize — cannot
be part of a graph and raises CaptureError on both runtimes, so a caller can fall back to direct
launches.

`CupyRuntime` runs on a GPU: RawModule kernels from `loader`, cuBLAS through CuPy, one stream per
runtime, pinned host buffers for downloads, CUDA graphs for a captured decode step.
`EmulatedRuntime` runs the same `.cu` files on the CPU (`kernels.cuda.emu`) over NumPy buffers.
Kernel scalar arguments are NumPy scalars (np.int32, np.float32, ...), so their C size is explicit
on both runtimes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import weakref

import numpy as np

from kernels.cuda import emu


class KernelLaunchError(RuntimeError):
    pass


class CaptureError(RuntimeError):
    """Work that a CUDA graph cannot hold (a host sync or a copy from host memory) was issued
    while capturing."""


class Graph:
    """A captured sequence: `nodes` to replay, and the device memory allocated during the capture."""

    def __init__(self):
        self.nodes: list = []
        self.keep: list = []


def _dim3(v) -> tuple[int, int, int]:
    v = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    return tuple(int(x) for x in v) + (1,) * (3 - len(v))


# ---- the emulator's device memory -------------------------------------------------------------

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
ALIGN_BYTES = 256               # what cudaMalloc guarantees
GUARDED_ALIGN_BYTES = 16        # debug buffers end flush against a guard page: 16-byte starts
CANARY = 0xA5
POISON = 0xFF                   # fresh device memory is not zeroed on a GPU either


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


class GuardedBuffer:
    """nbytes of memory that end (up to 16-byte alignment) at a PROT_NONE page and start one page
    or more after another, the gaps filled with a canary that is checked after each launch."""

    PROT_NONE, PROT_RW, MAP_PRIVATE_ANON = 0, 3, 0x22
    libc = None

    def __init__(self, nbytes: int):
        if GuardedBuffer.libc is None:
            GuardedBuffer.libc = _libc()
        libc = GuardedBuffer.libc
        data_pages = -(-(nbytes + GUARDED_ALIGN_BYTES) // PAGE_BYTES)
        self.map_bytes = (data_pages + 2) * PAGE_BYTES
        base = libc.mmap(None, self.map_bytes, self.PROT_RW, self.MAP_PRIVATE_ANON, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise MemoryError(f"cannot map {self.map_bytes} bytes for an emulated device buffer")
        libc.mprotect(base, PAGE_BYTES, self.PROT_NONE)
        libc.mprotect(base + self.map_bytes - PAGE_BYTES, PAGE_BYTES, self.PROT_NONE)
        self.base = base
        end = base + self.map_bytes - PAGE_BYTES
        self.start = (end - nbytes) & ~(GUARDED_ALIGN_BYTES - 1)
        self.nbytes = nbytes
        usable = (ctypes.c_uint8 * (end - base - PAGE_BYTES)).from_address(base + PAGE_BYTES)
        self.window = np.ctypeslib.as_array(usable)        # the data plus both canary gaps
        self.window[:] = CANARY
        self.offset = self.start - (base + PAGE_BYTES)
        self.data = self.window[self.offset:self.offset + nbytes]
        self.data[:] = POISON
        weakref.finalize(self, libc.munmap, base, self.map_bytes)

    def canary_intact(self) -> bool:
        return bool((self.window[:self.offset] == CANARY).all() and
                    (self.window[self.offset + self.nbytes:] == CANARY).all())


class EmuArray:
    """A device array of the emulator: a NumPy view over emulated device memory.

    Indexing and reshape give views that share the memory, like CuPy arrays; `host` is only for
    the runtime and tests (the backend goes through upload/download, as it must on a GPU)."""

    __slots__ = ("host", "buffer", "__weakref__")

    def __init__(self, host: np.ndarray, buffer=None):
        self.host = host
        self.buffer = buffer

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)
    size = property(lambda self: self.host.size)
    nbytes = property(lambda self: self.host.nbytes)
    ndim = property(lambda self: self.host.ndim)
    ptr = property(lambda self: self.host.ctypes.data)

    @property
    def flags(self):
        return self.host.flags

    def __getitem__(self, index) -> EmuArray:
        return EmuArray(self.host[index], self.buffer)

    def reshape(self, *shape) -> EmuArray:
        return EmuArray(self.host.reshape(*shape), self.buffer)

    def view(self, dtype) -> EmuArray:
        return EmuArray(self.host.view(dtype), self.buffer)

    def __len__(self) -> int:
        return len(self.host)

    def __repr__(self) -> str:
        return f"EmuArray({self.dtype}, {self.shape})"


class EmulatedRuntime:
    """Runs `.cu` kernels on the CPU. `debug=True` (or OFFLOAD_STUDIO_EMU_DEBUG=1) puts every
    buffer against guard pages and checks canaries after each launch; the thread and block order
    of every launch is shuffled by a seed that changes from launch to launch (fixed by `seed`, or
    OFFLOAD_STUDIO_EMU_SEED, for a reproducible run)."""

    name = "emulated"
    _launch_lock = threading.Lock()       # one emulated grid at a time per process

    def __init__(self, device_name: str = "CUDA0", debug: bool | None = None, seed: int | None = None):
        self.device_name = device_name
        self.debug = debug if debug is not None else os.environ.get("OFFLOAD_STUDIO_EMU_DEBUG", "") not in ("", "0")
        env_seed = os.environ.get("OFFLOAD_STUDIO_EMU_SEED")
        self.seed = seed if seed is not None else int(env_seed) if env_seed else int.from_bytes(os.urandom(4), "little")
        self.launches = 0
        self.allocated_bytes = 0
        self._buffers: weakref.WeakSet = weakref.WeakSet()
        self._capturing: Graph | None = None

    # memory
    def alloc(self, shape, dtype) -> EmuArray:
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.allocated_bytes += nbytes
        if self.debug:
            buffer = GuardedBuffer(nbytes)
            self._buffers.add(buffer)
            a = EmuArray(buffer.data.view(dtype).reshape(shape), buffer)
            if self._capturing is not None:
                self._capturing.keep.append(a)
            return a
        raw = np.empty(nbytes + ALIGN_BYTES, np.uint8)
        start = -raw.ctypes.data % ALIGN_BYTES
        raw[start:start + nbytes] = POISON
        a = EmuArray(raw[start:start + nbytes].view(dtype).reshape(shape))
        if self._capturing is not None:
            self._capturing.keep.append(a)
        return a

    def zeros(self, shape, dtype) -> EmuArray:
        self._refuse_in_capture("zeros (a memset from the host)")
        a = self.alloc(shape, dtype)
        a.host[...] = 0
        return a

    def upload(self, host: np.ndarray) -> EmuArray:
        self._refuse_in_capture("an upload from host memory")
        host = np.asarray(host)
        a = self.alloc(host.shape, host.dtype)
        a.host[...] = host
        return a

    def download(self, a: EmuArray) -> np.ndarray:
        self._refuse_in_capture("a download (a host sync)")
        return np.array(a.host, copy=True)

    def copy_into(self, dst: EmuArray, src) -> None:
        """Device-to-device (or host-to-device) copy into an existing array."""
        if self._capturing is not None:
            if not isinstance(src, EmuArray):
                self._refuse_in_capture("a copy from host memory")
            self._capturing.nodes.append(("copy", dst, src))
            return
        dst.host[...] = src.host if isinstance(src, EmuArray) else src

    def synchronize(self) -> None:
        self._refuse_in_capture("a synchronize")

    # CUDA graphs: launches and device copies recorded, not run, until replayed
    def begin_capture(self) -> None:
        if self._capturing is not None:
            raise CaptureError(f"{self.device_name} is already capturing")
        self._capturing = Graph()

    def end_capture(self) -> Graph:
        graph, self._capturing = self._capturing, None
        if graph is None:
            raise CaptureError(f"{self.device_name} is not capturing")
        return graph

    def abort_capture(self) -> None:
        self._capturing = None

    def replay(self, graph: Graph) -> None:
        self._refuse_in_capture("a graph replay")
        for node in graph.nodes:
            if node[0] == "copy":
                node[1].host[...] = node[2].host
            else:
                self._launch_now(*node[1:])

    @property
    def capturing(self) -> bool:
        return self._capturing is not None

    def _refuse_in_capture(self, what: str) -> None:
        if self._capturing is not None:
            raise CaptureError(f"{what} on {self.device_name} cannot be part of a CUDA graph")

    # compute
    def gemm_nt(self, a: EmuArray, b: EmuArray) -> EmuArray:
        """a @ b.T in float32 (the emulator's stand-in for cuBLAS)."""
        return self.upload(np.matmul(a.host.astype(np.float32), b.host.astype(np.float32).T).astype(np.float32))

    def concat(self, parts, axis: int = 0) -> EmuArray:
        return self.upload(np.concatenate([p.host for p in parts], axis=axis))

    def launch(self, source: str, kernel: str, grid, block, args, shared_bytes: int = 0,
               name_expressions: tuple[str, ...] = ()) -> None:
        if self._capturing is not None:
            emu.build(source, tuple(name_expressions)).kernel(kernel)     # a missing kernel fails at capture
            for i, arg in enumerate(args):
                if not isinstance(arg, (EmuArray, np.generic)):
                    raise TypeError(f"{kernel} argument {i}: pass an EmuArray or a NumPy scalar, "
                                    f"not {type(arg).__name__}")
            self._capturing.nodes.append(("launch", source, kernel, grid, block, tuple(args), shared_bytes,
                                          tuple(name_expressions)))
            return
        self._launch_now(source, kernel, grid, block, args, shared_bytes, name_expressions)

    def _launch_now(self, source: str, kernel: str, grid, block, args, shared_bytes: int = 0,
                    name_expressions: tuple[str, ...] = ()) -> None:
        module = emu.build(source, tuple(name_expressions))
        entry = module.kernel(kernel)
        storage, sizes, arrays = [], [], []
        for i, arg in enumerate(args):
            if isinstance(arg, EmuArray):
                cell = ctypes.c_void_p(arg.ptr)
                arrays.append(arg)
            elif isinstance(arg, np.generic):
                cell = ctypes.create_string_buffer(arg.tobytes(), arg.nbytes)
            else:
                raise TypeError(f"{kernel} argument {i}: pass an EmuArray or a NumPy scalar "
                                f"(np.int32, np.float32, ...), not {type(arg).__name__}")
            storage.append(cell)
            sizes.append(ctypes.sizeof(cell))
        pointers = (ctypes.c_void_p * max(1, len(args)))(*[ctypes.addressof(c) for c in storage])
        arg_sizes = (ctypes.c_long * max(1, len(args)))(*sizes)
        seed = (self.seed + 0x9E37 * self.launches) & 0xFFFFFFFF
        self.launches += 1
        config = emu.LaunchConfig(_dim3(grid), _dim3(block), int(shared_bytes), seed, int(self.debug))
        with self._launch_lock:
            status = entry(ctypes.byref(config), pointers, arg_sizes, len(args))
        where = f"{source}:{kernel} (seed {seed})"
        if status != 0:
            raise KernelLaunchError(f"{where}: {module.last_error()}{self._describe_fault(module.last_error(), arrays)}")
        if self.debug:
            for i, a in enumerate(arrays):
                if a.buffer is not None and not a.buffer.canary_intact():
                    raise KernelLaunchError(f"{where}: wrote outside a buffer of {a.buffer.nbytes} bytes "
                                            f"(argument {i}, {a.dtype} {a.shape})")

    @staticmethod
    def _describe_fault(message: str, arrays) -> str:
        if "address 0x" not in message:
            return ""
        address = int(message.split("address ")[1].split()[0], 16)
        notes = []
        for i, a in enumerate(arrays):
            start, end = a.ptr, a.ptr + a.nbytes
            if start - PAGE_BYTES <= address < end + PAGE_BYTES:
                side = f"{address - end} bytes past the end" if address >= end else f"{start - address} bytes before the start"
                notes.append(f"; {side} of pointer argument {len(notes)} ({a.dtype} {a.shape})")
        return "".join(notes)


# ---- the GPU ----------------------------------------------------------------------------------

class CupyRuntime:
    """Runs the kernels on a CUDA GPU through CuPy: one stream per runtime (per logical device)."""

    name = "cupy"

    def __init__(self, device_name: str = "CUDA0", device_id: int = 0):
        import cupy

        if not cupy.is_available():
            raise RuntimeError("CuPy reports no usable CUDA device")
        self.cp = cupy
        self.device_name = device_name
        self.device = cupy.cuda.Device(device_id)
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.allocated_bytes = 0
        self.graph = None
        self._capturing: Graph | None = None

    def alloc(self, shape, dtype):
        with self.device:
            a = self.cp.empty(shape, dtype)
        self.allocated_bytes += a.nbytes
        if self._capturing is not None:       # the pool must not hand this memory out while the graph lives
            self._capturing.keep.append(a)
        return a

    def zeros(self, shape, dtype):
        self._refuse_in_capture("zeros")
        with self.device, self.stream:
            a = self.cp.zeros(shape, dtype)
        self.allocated_bytes += a.nbytes
        return a

    def upload(self, host: np.ndarray):
        self._refuse_in_capture("an upload from host memory")
        with self.device, self.stream:
            a = self.cp.asarray(np.ascontiguousarray(host))
        self.allocated_bytes += a.nbytes
        return a

    def download(self, a) -> np.ndarray:
        self._refuse_in_capture("a download (a host sync)")
        with self.device:
            pinned = self.pinned_empty(a.shape, a.dtype)
            a.get(stream=self.stream, out=pinned)
            self.stream.synchronize()
        return np.array(pinned, copy=True)

    def pinned_empty(self, shape, dtype) -> np.ndarray:
        import cupyx

        return cupyx.empty_pinned(shape, dtype)

    def copy_into(self, dst, src) -> None:
        if isinstance(src, np.ndarray):
            self._refuse_in_capture("a copy from host memory")
        with self.device, self.stream:
            if isinstance(src, np.ndarray):
                dst.set(np.ascontiguousarray(src), stream=self.stream)
            else:
                dst[...] = src

    def synchronize(self) -> None:
        self._refuse_in_capture("a synchronize")
        self.stream.synchronize()

    def _refuse_in_capture(self, what: str) -> None:
        if self._capturing is not None:
            raise CaptureError(f"{what} on {self.device_name} cannot be part of a CUDA graph")

    @property
    def capturing(self) -> bool:
        return self._capturing is not None

    def gemm_nt(self, a, b):
        with self.device, self.stream:
            return self.cp.matmul(a.astype(self.cp.float32, copy=False), b.astype(self.cp.float32, copy=False).T)

    def concat(self, parts, axis: int = 0):
        with self.device, self.stream:
            return self.cp.concatenate(parts, axis=axis)

    def launch(self, source: str, kernel: str, grid, block, args, shared_bytes: int = 0,
               name_expressions: tuple[str, ...] = ()) -> None:
        from kernels.cuda.loader import load_module

        with self.device:
            module = load_module(source, tuple(name_expressions))
            function = module.get_function(kernel)
            function(_dim3(grid), _dim3(block), tuple(args), shared_mem=int(shared_bytes), stream=self.stream)

    # CUDA graphs: capture a sequence of launches once, replay it with one call
    def begin_capture(self) -> None:
        if self._capturing is not None:
            raise CaptureError(f"{self.device_name} is already capturing")
        with self.device:
            self.stream.begin_capture()
        self._capturing = Graph()

    def end_capture(self):
        graph, self._capturing = self._capturing, None
        if graph is None:
            raise CaptureError(f"{self.device_name} is not capturing")
        with self.device:
            self.graph = self.stream.end_capture()
        graph.nodes.append(self.graph)
        return graph

    def abort_capture(self) -> None:
        if self._capturing is not None:
            self._capturing = None
            with self.device:
                self.stream.end_capture()         # an unfinished capture is ended and dropped

    def replay(self, graph) -> None:
        self._refuse_in_capture("a graph replay")
        for node in getattr(graph, "nodes", [graph]):
            with self.device:
                node.launch(stream=self.stream)
