"""A whole all-fixed-width dataset resident in memory as one row table.

When every column is fixed-width and ``rows x row size`` fits ``decoded_cache_bytes``, each
shard's rows are copied, as they are first read, into one table indexed by sample id. A batch is
then a single ``take`` of packed rows by sample id, whatever the number of shards it touches (a
10,000-shard dataset costs per batch what a one-shard dataset costs), and nothing is decoded twice.

Such a dataset is read in the loader's process whatever ``num_workers`` (see
:func:`bridge.iterate.round_robin_ids`); its shards are loaded by threads (:mod:`bridge.prefill`,
:mod:`bridge.readahead`). The table and the per-shard states are anonymous memory
(``mmap(-1)``: MAP_SHARED | MAP_ANONYMOUS, not /dev/shm, so a container's small /dev/shm does not
matter), committed as pages are written; a ``spawn``-ed copy of the dataset gets a fresh private
table (correct, not shared).

**Mapped** (:func:`mappable`): a table larger than ``decoded_cache_bytes`` read in a global
shuffle (``shuffle_algo="global"``, every batch touches up to ``batch_size`` shards) is backed by
a file instead: created in the private spill root (:func:`sparkbridge.bridge.spill.private_spill_root`),
mapped ``MAP_SHARED`` and unlinked at once (nothing is left behind, even on a crash). Its pages
are page cache, not anonymous memory: the kernel writes them back and evicts them under
pressure, so the loader's anonymous memory stays flat in the dataset size, and a batch is still
one ``take``. While the rows fit the page cache a batch costs what it costs in memory; beyond it
each row of a batch is a random read of the disk (see README, "Order at scale").
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import tempfile
import weakref
from typing import Any, Optional

import numpy as np

__all__ = ["ResidentRows", "EMPTY", "LOADING", "LOADED", "fits", "mappable", "unmap_other_tables"]

EMPTY, LOADING, LOADED = 0, 1, 2

#: Every table of this process, so a forked helper can drop the ones it does not read.
_LIVE: "weakref.WeakSet[ResidentRows]" = weakref.WeakSet()


def fits(table: Any, budget: int) -> bool:
    """Whether the rows of ``table`` (a :class:`bridge.shards.ShardTable`) can be one row table
    within ``budget`` bytes: a single layout, every column fixed-width."""
    if len(table.layouts) != 1 or table.layouts[0].row_dtype() is None:
        return False
    return table.total_samples * table.layouts[0].row_dtype().itemsize <= budget


def mappable(table: Any) -> bool:
    """Whether the rows of ``table`` can be a mapped row table of any size (one layout, every
    column fixed-width)."""
    return len(table.layouts) == 1 and table.layouts[0].row_dtype() is not None


def _file_map(folder: str, size: int) -> mmap.mmap:
    """``size`` bytes of a new file in ``folder``, mapped shared; the file is unlinked at once."""
    fd, path = tempfile.mkstemp(prefix=".sparkbridge-rows-", dir=folder)
    try:
        os.unlink(path)
        os.ftruncate(fd, size)  # sparse: blocks are allocated as rows are written
        table = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        if hasattr(mmap, "MADV_RANDOM"):
            # rows are read at random: once evicted, a row is read back alone, not with the ~128 KiB
            # of read-around a page fault brings in by default
            table.madvise(mmap.MADV_RANDOM)
        return table
    finally:
        os.close(fd)


class ResidentRows:
    def __init__(self, total_rows: int, row_bytes: int, shard_count: int, folder: Optional[str] = None) -> None:
        self.total_rows = int(total_rows)
        self.row_bytes = int(row_bytes)
        self.shard_count = int(shard_count)
        self.folder = folder  # mapped from a file there (page cache), else anonymous memory
        size = max(1, self.total_rows * self.row_bytes)
        self._table = mmap.mmap(-1, size) if folder is None else _file_map(folder, size)
        self._flags = mmap.mmap(-1, max(1, self.shard_count))
        self.rows = np.frombuffer(self._table, dtype=np.dtype((np.void, self.row_bytes)), count=self.total_rows)
        self.state = np.frombuffer(self._flags, dtype=np.uint8, count=self.shard_count)
        self._complete = False
        _LIVE.add(self)

    @classmethod
    def for_table(cls, table: Any, *, folder: Optional[str] = None) -> "ResidentRows":
        """An empty row table for ``table``'s rows (check :func:`fits` first, or
        :func:`mappable` with a ``folder`` for the backing file)."""
        return cls(table.total_samples, table.layouts[0].row_dtype().itemsize, table.count, folder)

    def __reduce__(self):  # spawn: a fresh private table in the child
        return (ResidentRows, (self.total_rows, self.row_bytes, self.shard_count, self.folder))

    @property
    def nbytes(self) -> int:
        return self.total_rows * self.row_bytes

    def close(self) -> None:
        """Unmap the table now (``StreamingLoader.close``), not when a reference cycle through
        the dataset is collected: its memory is the loader's largest. A view still exported
        elsewhere (a thread mid-fill) leaves it to the collector."""
        self.rows = np.empty(0, dtype=self.rows.dtype)
        self.state = np.full(self.shard_count, EMPTY, dtype=np.uint8)
        self._complete = False
        for m in (self._table, self._flags):
            try:
                m.close()
            except BufferError:
                pass

    def unmap_in_child(self) -> None:
        """In a forked child that never reads this table: replace its mappings with inaccessible
        reservations (no memory), so the table's shared memory is freed once its loader closes.

        Why: a child forked while a loader is open inherits its table, and shared anonymous
        memory lives until its last mapping goes; an order helper forked for loader B kept
        loader A's table (122 MB) alive after ``A.close()``. ``mmap.close()`` cannot be used (numpy
        views export its buffer), so the range is remapped in place (MAP_FIXED, PROT_NONE): no
        address is reused for other data here, and a stray access faults instead of reading."""
        if not sys.platform.startswith("linux"):
            return
        from sparkbridge.bridge.mapped import load_libc

        libc = load_libc()
        if libc is None:
            return
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        for m in (self._table, self._flags):
            if m.closed:
                continue
            view = np.frombuffer(m, dtype=np.uint8)
            address, size = view.ctypes.data, len(m)
            del view
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10 | 0x4000  # MAP_FIXED | MAP_NORESERVE
            libc.mmap(address, size, mmap.PROT_NONE if hasattr(mmap, "PROT_NONE") else 0, flags, -1, 0)

    def complete(self) -> bool:
        """Whether every shard is in the table (then batches need no shard lookups at all)."""
        if not self._complete:
            self._complete = bool(np.all(self.state == LOADED))
        return self._complete

    def missing(self, shard_ids: np.ndarray) -> np.ndarray:
        """The distinct shards among ``shard_ids`` not in the table yet."""
        absent = self.state[shard_ids] != LOADED
        if not absent.any():
            return shard_ids[:0]
        return np.unique(shard_ids[absent])

    def claim(self, shard_id: int) -> bool:
        """Mark a shard being loaded by this process unless some process does already (a rare
        race loads it twice, harmlessly: the same bytes are written)."""
        if self.state[shard_id] != EMPTY:
            return False
        self.state[shard_id] = LOADING
        return True

    def unclaim(self, shard_id: int) -> None:
        if self.state[shard_id] == LOADING:
            self.state[shard_id] = EMPTY

    def fill(self, shard_id: int, start: int, rows: np.ndarray) -> None:
        self.rows[start:start + len(rows)] = rows
        self.state[shard_id] = LOADED

    def take(self, sample_ids: np.ndarray) -> np.ndarray:
        return self.rows.take(sample_ids)


def unmap_other_tables(keep: Any) -> int:
    """In a forked child: unmap every inherited row table but ``keep`` (see
    :meth:`ResidentRows.unmap_in_child`). Returns how many were unmapped."""
    count = 0
    for table in list(_LIVE):
        if table is not keep:
            table.unmap_in_child()
            count += 1
    return count
