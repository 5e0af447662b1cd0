"""Surviving a model file that shrinks under its memory map.

Weights are read straight from the GGUF's memory map. If the file is truncated while a model
runs (a copy being replaced, a download restarted), the next read of a page past the new end
raises SIGBUS, and the process dies mid-sentence ("Bus error", exit 135). Two defences:

- `ModelFile.check_unchanged()` between layers turns a change into a ModelFileChangedError
  ("the model file changed on disk while it was in use") before the next layer reads;
- for a truncation inside a layer, this module's SIGBUS handler maps a page of zeros over the
  vanished page (BUS_ADRERR: an address past the end of the mapped file) and returns, so the
  read completes; the layer's result is garbage, and the check after it raises the error. Any
  other bus error aborts, as it would have before.

The handler is a Numba `cfunc`: it runs in signal context without touching Python. Linux only.
"""
from __future__ import annotations

import ctypes
import mmap
import signal
import sys
import threading

_PROT_READ, _MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_FIXED = 0x1, 0x2, 0x20, 0x10
_SA_SIGINFO = 0x4
_BUS_ADRERR = 2         # siginfo si_code: a mapped address with no backing (past end of file)
_PAGE_BYTES = mmap.PAGESIZE

_lock = threading.Lock()
_installed = False
_keep_alive: list = []      # the cfunc and the sigaction struct must outlive the process's use of them


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction (x86-64 and aarch64)."""
    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16), ("sa_flags", ctypes.c_int),
                ("sa_restorer", ctypes.c_void_p)]


def _make_handler(libc):
    from numba import carray, cfunc, types
    map_page = libc.mmap
    map_page.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    map_page.restype = ctypes.c_void_p
    abort = libc.abort
    abort.argtypes, abort.restype = [], None
    page_bytes, flags = _PAGE_BYTES, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED

    @cfunc(types.void(types.int32, types.voidptr, types.voidptr))
    def on_bus_error(signal_number, info, context):
        # siginfo_t: int si_signo, si_errno, si_code, (pad); then the union with void *si_addr
        fields = carray(info, (3,), types.int64)
        code, address = fields[1] & 0xFFFFFFFF, fields[2]
        if code != _BUS_ADRERR:
            abort()
        map_page(address - address % page_bytes, page_bytes, _PROT_READ, flags, -1, 0)

    return on_bus_error


def install_bus_guard() -> bool:
    """Install the handler once per process; False where it is not available."""
    global _installed
    if not sys.platform.startswith("linux"):
        return False
    with _lock:
        if _installed:
            return True
        libc = ctypes.CDLL(None, use_errno=True)
        handler = _make_handler(libc)
        action = _Sigaction()
        action.sa_sigaction = handler.address
        action.sa_flags = _SA_SIGINFO
        if libc.sigaction(signal.SIGBUS, ctypes.byref(action), None) != 0:
            return False
        _keep_alive.extend([handler, action, libc])
        _installed = True
        return True
