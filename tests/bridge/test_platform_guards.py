"""Platform guards, exercised on Linux by their code paths (issue 23, suspected list)."""

from __future__ import annotations

import ctypes

import numpy as np


def _windows_cdll(name, *args, **kwargs):
    """What ``ctypes.CDLL(None)`` does on Windows (there is no "this process" handle to load)."""
    if name is None:
        raise TypeError("LoadLibrary() argument 1 must be str, not None")
    raise OSError(f"could not find module {name!r}")


def test_no_libc_is_no_error(monkeypatch):
    """``find_library("c")`` finds nothing on Windows and ``CDLL(None)`` raises TypeError there:
    every module that loads libc goes on without it."""
    from sparkbridge.bridge import dataset, mapped

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(ctypes, "CDLL", _windows_cdll)
    assert mapped._load_libc() is None
    assert dataset._load_libc() is None


def test_maps_and_heap_trim_work_without_libc(monkeypatch, tmp_path):
    from sparkbridge.bridge import dataset, mapped

    monkeypatch.setattr(mapped, "_LIBC", None)
    monkeypatch.setattr(dataset, "_LIBC", None)
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 4)
    buf, ident = mapped.map_file(str(path))
    assert np.array_equal(buf, np.frombuffer(bytes(range(256)) * 4, dtype=np.uint8)) and ident[2] == 1024
    dataset._release_free_heap()  # nothing to trim with: no error
