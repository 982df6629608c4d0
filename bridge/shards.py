"""What the loader knows about each shard, in compact numpy arrays built once per dataset.

Why arrays and not an object per shard: a dataset of 10,000 small shards made 10,000 Python
objects per loader and per worker, and per-batch work looped over them. Sizes, sample counts and
sample offsets are int64 arrays here (inherited by forked workers, never copied per batch); names
and hashes stay in the index entries they came from; local paths are resolved (and confined to
their root, symlinks included) the first time a shard is read, not for every shard at
construction, except that every distinct folder is checked up front.
"""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

import numpy as np

from sparkbridge.errors import CorruptShardError
from sparkbridge.format.mds import ShardLayout
from sparkbridge.format.paths import Confiner

__all__ = ["ShardTable", "MAX_EXPANSION", "STAT_AHEAD_BYTES"]

#: How many times its compressed file a shard larger than ``decoded_cache_bytes`` may declare to
#: decompress to. Real tabular shards compress 2-50x; a 45 KB zstd file of run-length blocks
#: inflates to 1.5 GB (33,000x).
MAX_EXPANSION = 1024
#: An uncompressed shard declaring at least this many bytes has its file stat'ed before any order
#: is computed (:meth:`ShardTable.check_declared_sizes`); a smaller one when it is first opened.
STAT_AHEAD_BYTES = 1 << 20

_NONE: Mapping = MappingProxyType({})


class ShardTable:
    """Per-shard facts of one dataset version.

    ``cache_root``: where Mosaic keeps this dataset's files (the dataset root itself for a local
    dataset read in place, else the ``local`` cache folder); ``origin_root``: a local dataset
    root read through a cache folder (its files are read in place), else None."""

    def __init__(self, entries: Sequence[dict], *, cache_root: str, origin_root: Optional[str], where: str) -> None:
        self.entries = entries
        self.cache_root = cache_root
        self.origin_root = origin_root
        self.where = where
        n = len(entries)
        self.count = n
        # one pass over the entries (100,000 of them: each pass of its own cost ~40 ms)
        samples, raw, zipped, layout_of, compressed = [0] * n, [0] * n, [0] * n, [0] * n, [False] * n
        layouts: dict[tuple, int] = {}
        # the same three lists, by identity: an index's entries of one layout share them
        # (sparkbridge.format.index.check_index_entries), so most entries cost one lookup
        by_lists: dict[tuple[int, int, int], int] = {}
        self._folders: dict[str, int] = {}  # every distinct folder, and the first shard in it
        self.layouts: list[ShardLayout] = []
        for i, e in enumerate(entries):
            samples[i] = e["samples"]
            names, encodings, sizes = e["column_names"], e["column_encodings"], e["column_sizes"]
            ids = (id(names), id(encodings), id(sizes))
            k = by_lists.get(ids)
            if k is None:
                key = (tuple(names), tuple(encodings), tuple(sizes))
                k = layouts.get(key)
                if k is None:
                    k = layouts[key] = len(self.layouts)
                    self.layouts.append(ShardLayout.from_index_entry(
                        {"column_names": key[0], "column_encodings": key[1], "column_sizes": key[2]}))
                by_lists[ids] = k
            layout_of[i] = k
            info = e["raw_data"]
            raw[i] = info["bytes"]
            name = info["basename"]
            cut = name.rfind("/")
            if cut > 0 and name[:cut] not in self._folders:
                self._folders[name[:cut]] = i
            info = e.get("zip_data")
            if info:
                compressed[i] = True
                zipped[i] = info.get("bytes", 0)
                name = info["basename"]
                cut = name.rfind("/")
                if cut > 0 and name[:cut] not in self._folders:
                    self._folders[name[:cut]] = i
        self.samples = np.array(samples, dtype=np.int64)
        self.raw_bytes = np.array(raw, dtype=np.int64)
        self.zip_bytes = np.array(zipped, dtype=np.int64)
        self.compressed = np.array(compressed, dtype=bool)
        self.ends = np.cumsum(self.samples)
        self.starts = self.ends - self.samples
        self.total_samples = int(self.ends[-1]) if n else 0
        index = np.array(layout_of, dtype=np.int32)
        self.layout_index = index
        # A decoded shard of variable-width columns also holds its sample offsets as int64 (gathers
        # add to them; bridge.decode): 8 bytes a row of anonymous memory, mapped or not.
        var = np.array([layout.row_dtype() is None for layout in self.layouts], dtype=bool)
        self.offset_bytes = np.where(var[index], 8 * (self.samples + 1), 0).astype(np.int64) if n else \
            np.zeros(0, dtype=np.int64)
        self._paths: dict[tuple[str, int], Optional[str]] = {}
        self._confiners: dict[str, Confiner] = {}
        self._all_paths: dict[tuple[str, str], list[Optional[str]]] = {}
        self._cache_seen = False
        # per shard: check_declared_sizes stat'ed its files once, all matching
        self._sizes_checked = np.zeros(n, dtype=bool)
        self._check_folders()

    def _confiner(self, root: str) -> Confiner:
        c = self._confiners.get(root)
        if c is None:
            c = self._confiners[root] = Confiner(root)
        return c

    def _check_folders(self) -> None:
        """Every distinct folder a shard lives in stays inside its root (a symlinked folder
        pointing out is refused now, naming the first shard in it)."""
        roots = [self.cache_root] + ([self.origin_root] if self.origin_root else [])
        for folder, i in self._folders.items():
            for root in roots:
                self._confiner(root).path(folder, where=f"{self.where}, shard {i}")

    def check_declared_sizes(self, budget: int) -> None:
        """Refuse, before any order is computed or any shard is read, sizes in the index that the
        files or the budget contradict (the error names the shard and the field that lied).

        Why: the index is a claim. Mosaic materializes every sample id from its sample counts
        (bounded by ``raw_data.bytes``: :func:`sparkbridge.format.index.min_raw_bytes`), and a
        compressed shard is decompressed in memory whole, up to its ``raw_data.bytes``. So a
        compressed shard may declare more than ``budget`` only within :data:`MAX_EXPANSION` times
        its compressed size, and a stored file on local disk whose claim could cost more than its
        file backs must be as large as declared (``zip_data.bytes``, or ``raw_data.bytes`` when it
        is not compressed): a compressed shard declaring more than ``budget``, an uncompressed one
        declaring at least :data:`STAT_AHEAD_BYTES`. The files of smaller claims are not stat'ed
        here (100,000 of them were ~1 s of opening a dataset): such a claim costs no more than an
        honest shard of that size, and the file's size is checked when the shard is first opened
        (:func:`sparkbridge.bridge.shard_source.read_declared`), before any of its bytes is used."""
        over = np.flatnonzero(self.compressed & (self.raw_bytes > budget)
                              & (self.raw_bytes > MAX_EXPANSION * self.zip_bytes))
        if over.size:
            i = int(over[0])
            raise CorruptShardError(
                f"{self.where}, shard {self.entries[i]['raw_data']['basename']!r}: raw_data.bytes="
                f"{int(self.raw_bytes[i])} is more than decoded_cache_bytes={budget} and more than {MAX_EXPANSION}x "
                f"its compressed file (zip_data.bytes={int(self.zip_bytes[i])}); a shard is decompressed in memory "
                "whole, so the claim is refused before it is tried: the index is corrupt or hostile (if it is "
                "right, raise decoded_cache_bytes)")
        ahead = np.where(self.compressed, self.raw_bytes > budget, self.raw_bytes >= STAT_AHEAD_BYTES)
        ahead &= ~self._sizes_checked
        todo = np.flatnonzero(ahead).tolist()
        if not todo:
            return
        for where in ("origin", "cache"):
            root = self.origin_root if where == "origin" else self.cache_root
            if root is None or not os.path.isdir(root):
                continue
            for kind, declared, mine in (("zip_data", self.zip_bytes, self.compressed),
                                         ("raw_data", self.raw_bytes, ~self.compressed)):
                # many shards: every path of the table at once (a listing per folder), else one by one
                paths = self.all_paths(kind, where) if 8 * len(todo) > self.count else None
                for i in np.flatnonzero(ahead & mine).tolist():
                    path = paths[i] if paths is not None else self.path_under(root, kind, i)
                    try:
                        size = os.stat(path).st_size if path is not None else None
                    except FileNotFoundError:  # not fetched yet (a cache), or missing: named when read
                        continue
                    if size is not None and size != int(declared[i]):
                        raise CorruptShardError(
                            f"{self.where}, shard {self.entries[i][kind]['basename']!r}: {kind}.bytes="
                            f"{int(declared[i])} but the file {path} has {size} bytes: the file is truncated or "
                            "corrupt (or replaced), or the index lies (rewrite the dataset, or delete the cached copy)")
        # stat'ed once (the early fill's table, then the dataset's, is the same table), all matching
        self._sizes_checked[todo] = True

    # ------------------------------------------------------------------ facts

    def name(self, i: int) -> str:
        """The stored file's name, as listed in the index (used in every error about the shard)."""
        e = self.entries[i]
        return (e.get("zip_data") or e["raw_data"])["basename"]

    def layout(self, i: int) -> ShardLayout:
        return self.layouts[int(self.layout_index[i])]

    def compression(self, i: int) -> Optional[str]:
        return self.entries[i].get("compression") if self.compressed[i] else None

    def raw_hashes(self, i: int) -> Mapping[str, str]:
        """The index's hashes of shard ``i``'s decompressed file: its own mapping, to read only (a
        copy per shard, 10,000 of them, set off collections of the whole index: ~0.1 s)."""
        return self.entries[i]["raw_data"].get("hashes") or _NONE

    def zip_hashes(self, i: int) -> Mapping[str, str]:
        """The index's hashes of shard ``i``'s stored file (see :meth:`raw_hashes`)."""
        return (self.entries[i].get("zip_data") or _NONE).get("hashes") or _NONE

    def shard_of(self, sample_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ends, sample_ids, side="right")

    # ------------------------------------------------------------------ paths

    def path_under(self, root: Optional[str], kind: str, i: int) -> Optional[str]:
        """Shard ``i``'s ``kind`` file (``"raw_data"``/``"zip_data"``) under ``root``, confined to
        it (a symlink out of it raises, naming the shard); None without such a root or file."""
        if root is None:
            return None
        info = self.entries[i].get(kind)
        if not info:
            return None
        key = (f"{kind}@{root}", i)
        path = self._paths.get(key)
        if path is None:
            path = self._confiner(root).path(info["basename"], where=f"{self.where}, shard {i}")
            self._paths[key] = path
        return path

    def cache_raw(self, i: int) -> Optional[str]:
        return self.path_under(self.cache_root, "raw_data", i)

    def cache_zip(self, i: int) -> Optional[str]:
        return self.path_under(self.cache_root, "zip_data", i)

    def origin_raw(self, i: int) -> Optional[str]:
        return self.path_under(self.origin_root, "raw_data", i)

    def origin_zip(self, i: int) -> Optional[str]:
        return self.path_under(self.origin_root, "zip_data", i)

    def all_paths(self, kind: str, where: str) -> Optional[list[Optional[str]]]:
        """Every shard's ``kind`` (``"raw_data"`` or ``"zip_data"``) path under ``where``
        (``"cache"`` or ``"origin"``), None for a shard without such a file; resolved in bulk
        (:meth:`Confiner.paths`) and kept. None when there is no such root or it does not exist
        yet (a cache folder is made when first needed)."""
        key = (kind, where)
        if key not in self._all_paths:
            root = self.cache_root if where == "cache" else self.origin_root
            if root is None or not os.path.isdir(root):
                return None
            rels = [(i, e[kind]["basename"]) for i, e in enumerate(self.entries) if e.get(kind)]
            out: list[Optional[str]] = [None] * self.count
            for (i, _), path in zip(rels, self._confiner(root).paths(rels, where=self.where)):
                out[i] = path
            self._all_paths[key] = out
        return self._all_paths[key]

    def _cache_exists(self) -> bool:
        """Whether the cache folder exists yet (a local dataset's spill folder is made only when a
        pass needs it): until it does, its candidates are skipped without a failed open each."""
        if not self._cache_seen:
            self._cache_seen = os.path.isdir(self.cache_root)
        return self._cache_seen

    def raw_candidates(self, i: int, *, labeled: bool = False) -> list:
        """Where a decompressed copy of shard ``i`` may already be on local disk (``labeled``:
        as ``(where, path)``, ``where`` being ``"cache"`` or ``"origin"``)."""
        cache = self.cache_raw(i) if self._cache_exists() else None
        return self._candidates(cache, self.origin_raw(i), labeled)

    def zip_candidates(self, i: int, *, labeled: bool = False) -> list:
        cache = self.cache_zip(i) if self._cache_exists() else None
        return self._candidates(cache, self.origin_zip(i), labeled)

    @staticmethod
    def _candidates(cache: Optional[str], origin: Optional[str], labeled: bool) -> list:
        found = [(w, p) for w, p in (("cache", cache), ("origin", origin)) if p is not None]
        return found if labeled else [p for _, p in found]
