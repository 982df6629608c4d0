"""Read-only memory maps of shard files that hold no file descriptor.

Why: a decompressed shard on local disk (Mosaic's cache of a remote dataset, an uncompressed local
dataset, or a shard spilled to disk because the decoded working set does not fit
``decoded_cache_bytes``) is best read through the page cache: its pages are file-backed, the OS
drops and re-reads them under pressure, and every process (DataLoader workers too) shares one
copy. Python's ``mmap.mmap`` keeps a duplicate of the file descriptor for the life of the map,
which is how processes reading many datasets once ran out of descriptors; here the map is made
with libc's ``mmap`` and the descriptor is closed at once. The map lives as long as any numpy view
of it (``munmap`` runs when the last one is gone); callers bound how many maps they keep.

Where libc cannot be loaded (not Linux/macOS), ``mmap.mmap`` is used (``trackfd=False`` on Python
3.13+, else with the descriptor held for the map's life).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
from typing import Optional

import numpy as np

__all__ = ["map_file", "FileIdentity", "load_libc"]

logger = logging.getLogger(__name__)

_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_POPULATE = 0x8000 if sys.platform.startswith("linux") else 0  # pre-fault resident pages

FileIdentity = tuple  # (st_dev, st_ino, st_size, st_mtime_ns): "the same file, unchanged"


def load_libc() -> Optional[ctypes.CDLL]:
    """The C library (with ``errno``), or None where there is none to load. Why the guard: on
    Windows ``find_library("c")`` finds nothing and ``CDLL(None)`` raises TypeError, not OSError;
    every caller has a path without libc."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except (OSError, TypeError):
        return None


def _load_libc() -> Optional[ctypes.CDLL]:
    libc = load_libc()
    if libc is None:
        return None
    try:
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # pragma: no cover - no libc mmap on this platform
        return None


_LIBC = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """Owner of one libc mapping; numpy arrays made from it keep it (their ``base``) alive."""

    __slots__ = ("addr", "size", "__array_interface__")

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.__array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (addr, True), "version": 3}

    def __del__(self) -> None:
        if self.addr and _LIBC is not None:
            _LIBC.munmap(self.addr, self.size)
            self.addr = 0


def map_file(path: str) -> tuple[np.ndarray, FileIdentity]:
    """The whole file as a read-only uint8 array backed by the page cache, and its identity.

    Raises FileNotFoundError when the file is missing (it may have been evicted meanwhile)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        size = st.st_size
        if size == 0:
            return np.empty(0, dtype=np.uint8), ident
        if _LIBC is not None:
            addr = _LIBC.mmap(None, size, _PROT_READ, _MAP_SHARED | _MAP_POPULATE, fd, 0)
            if addr is None or addr == _MAP_FAILED:
                err = ctypes.get_errno()
                raise OSError(err, f"cannot map {path}: {os.strerror(err)}")
            return np.asarray(_Mapping(addr, size)), ident
        kwargs = {"trackfd": False} if sys.version_info >= (3, 13) else {}
        m = mmap.mmap(fd, size, access=mmap.ACCESS_READ, **kwargs)  # pragma: no cover
        return np.frombuffer(m, dtype=np.uint8), ident  # pragma: no cover
    finally:
        os.close(fd)
