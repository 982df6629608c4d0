"""Getting a shard's checked bytes into this process: mapped from disk, or decompressed in memory.

Where a shard is read from, in order:

1. a decompressed copy on local disk (Mosaic's cache of a remote dataset, an uncompressed local
   dataset, or a shard spilled to the cache folder): memory-mapped (:mod:`bridge.mapped`, no file
   descriptor kept), so its pages are the page cache's, shared by every process; small files
   (under 1 MiB) outside spill mode are read instead (thousands of tiny maps cost more than
   their copies);
2. unless the pass spills, a compressed copy (a local dataset's own file, read in place):
   decompressed in memory, at most the size the index declares;
3. otherwise Mosaic prepares it (download, ``cache_limit`` eviction; a local dataset's shard is
   decompressed from the dataset root into the cache folder, never into the root), then 1.

Every shard passes :func:`sparkbridge.format.check.check_shard` (hash per ``validate_hash``,
bounded decompression, size, sample count, offsets) and :func:`bridge.decode.decode_shard` before
a gather sees it; a mapped file is hashed once per process while it stays the same file.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping, Optional, Union

import numpy as np

from sparkbridge.bridge.cache import ShardCache
from sparkbridge.bridge.decode import DecodedShard, decode_shard
from sparkbridge.bridge.mapped import map_file
from sparkbridge.bridge.resident import LOADED, LOADING, ResidentRows
from sparkbridge.bridge.shards import ShardTable
from sparkbridge.bridge.smallshard import SmallShards
from sparkbridge.errors import CorruptShardError
from sparkbridge.format.check import ShardReport, check_shard

__all__ = ["ShardReader", "check_hash_names", "pick_hash"]

logger = logging.getLogger(__name__)

_MAP_MIN_BYTES = 1 << 20
_MAX_MAPS = 1024
_CLAIM_WAIT_S = 30.0


def pick_hash(hashes: Mapping[str, str], validate_hash: Union[str, bool, None]) -> tuple[str, ...]:
    """Which hashes to compare: none (False, or the index has none), the named one, or xxh64 /
    the first listed (None)."""
    if validate_hash is False or (not hashes and not isinstance(validate_hash, str)):
        return ()
    if isinstance(validate_hash, str):
        return (validate_hash,)
    return ("xxh64",) if "xxh64" in hashes else (sorted(hashes)[0],)


def check_hash_names(table: ShardTable, validate_hash: Union[str, bool, None], source: str) -> None:
    """Refuse a named ``validate_hash`` that some shard lacks (naming the first such shard), and
    say so when no shard has any hash, before any shard is read."""
    entries = table.entries
    if isinstance(validate_hash, str):
        lacking = [table.name(i) for i, e in enumerate(entries)
                   if validate_hash not in ((e.get("zip_data") or {}).get("hashes") or {})
                   and validate_hash not in (e["raw_data"].get("hashes") or {})]
        if lacking:
            raise ValueError(
                f"validate_hash={validate_hash!r} but {len(lacking)} shard(s) of {source} have no such "
                f"hash in index.json (first: {lacking[0]!r}); pass validate_hash=None to use what the index has")
    if validate_hash is None and not any(e["raw_data"].get("hashes") or (e.get("zip_data") or {}).get("hashes")
                                         for e in entries):
        logger.info("%s: shards carry no hashes in index.json, so corruption inside a shard cannot be detected "
                    "(sparkbridge's writer adds xxh64)", source)


class ShardReader:
    """Loads shards for one process (each DataLoader worker builds its own).

    ``dataset`` (the :class:`bridge.dataset.BatchDataset`) is needed only where Mosaic prepares a
    shard (a remote one, or a local one that is missing): a reader built before it
    (:mod:`bridge.early`) gets it when the dataset adopts the reader, and Mosaic is imported only
    then, so this module never imports it."""

    def __init__(self, *, dataset: Any, table: ShardTable, validate_hash: Union[str, bool, None], remote: Optional[str],
                 source: str, cache_limit: Optional[int], budget: int, resident: Optional[ResidentRows],
                 retry: int = 7) -> None:
        self.dataset = dataset
        self.table = table
        self.validate_hash = validate_hash
        self.remote = remote
        self.source = source
        self.cache_limit = cache_limit
        self.retry = retry
        self.cache = ShardCache(budget, max_maps=_MAX_MAPS)
        self.resident = resident
        self._validated: dict[int, tuple] = {}  # shard -> identity of the mapped file that passed
        self.small = SmallShards(table, self.hash_names)

    # ------------------------------------------------------------------ checks

    def hash_names(self, i: int, *, compressed: bool) -> tuple[Mapping[str, str], tuple[str, ...]]:
        """Shard ``i``'s index hashes of its stored (``compressed``) or decompressed file, and the
        ones to compare per ``validate_hash``."""
        t = self.table
        if compressed:
            hashes = t.zip_hashes(i)
            return hashes, pick_hash(hashes, self.validate_hash)
        hashes = t.raw_hashes(i)
        names = pick_hash(hashes, self.validate_hash)
        if t.compressed[i]:  # a decompressed copy: its own hash when the index has it
            names = tuple(n for n in names if n in hashes)
        return hashes, names

    def check_stored(self, i: int, stored: Any, *, compressed: bool) -> ShardReport:
        t = self.table
        hashes, names = self.hash_names(i, compressed=compressed)
        return check_shard(stored, where=f"shard {t.name(i)!r}", compression=t.compression(i) if compressed else None,
                           raw_bytes=int(t.raw_bytes[i]), samples=int(t.samples[i]), stored_hashes=hashes,
                           hash_names=names).raise_first()

    def decompressed(self, i: int, zipped: bytes) -> np.ndarray:
        """For :class:`bridge.mosaic.SnapshotStream`: check and decompress a stored shard."""
        return self.check_stored(i, zipped, compressed=True).raw

    # ------------------------------------------------------------------ loading

    def _from_raw_file(self, i: int, path: str, *, spill: bool) -> Optional[DecodedShard]:
        t = self.table
        mapped = spill or int(t.raw_bytes[i]) >= _MAP_MIN_BYTES
        try:
            if mapped:
                buf, ident = map_file(path)
            else:
                buf, ident = np.fromfile(path, dtype=np.uint8), None
        except FileNotFoundError:
            return None
        if mapped and self._validated.get(i) == ident:
            n = int(t.samples[i])
            offsets = buf[4:4 + 4 * (n + 1)].view("<u4")
        else:
            report = self.check_stored(i, buf, compressed=False)
            offsets = report.offsets
            if mapped:
                self._validated[i] = ident
        return decode_shard(t.name(i), t.layout(i), buf, offsets, mapped=mapped)

    def load(self, i: int, *, spill: bool) -> DecodedShard:
        """Shard ``i``, checked, from wherever it is (see the module doc)."""
        t = self.table
        i = int(i)
        for _ in range(1 + self.retry):
            for where, path in t.raw_candidates(i, labeled=True):
                shard = self._from_raw_file(i, path, spill=spill)
                if shard is not None:
                    self.small.found("raw_data", where)
                    return shard
            if not spill or self.remote is None:
                for where, path in t.zip_candidates(i, labeled=True):
                    try:
                        with open(path, "rb") as f:
                            size = os.fstat(f.fileno()).st_size
                            if size != int(t.zip_bytes[i]):  # before reading it: a claim, not a fact
                                raise CorruptShardError(
                                    f"shard {t.name(i)!r}: zip_data.bytes={int(t.zip_bytes[i])} but the file {path} "
                                    f"has {size} bytes: the file is truncated or corrupt (or was replaced since the "
                                    "loader was built): rewrite the dataset, or delete the cached copy")
                            zipped = f.read()
                    except FileNotFoundError:
                        continue
                    report = self.check_stored(i, zipped, compressed=True)
                    self.small.found("zip_data", where)
                    return decode_shard(t.name(i), t.layout(i), report.raw, report.offsets)
            if self.remote is None:
                missing = (t.zip_candidates(i) or t.raw_candidates(i))[0]
                raise FileNotFoundError(
                    f"shard {t.name(i)!r} is listed in {self.source}/index.json but is missing ({missing}); "
                    "the dataset is incomplete")
            if self.dataset is None:  # built early (bridge.early) and not adopted yet: the pass loads it
                raise RuntimeError(f"shard {t.name(i)!r} is not on local disk and the dataset is not built yet")
            from sparkbridge.bridge import mosaic

            mosaic.prepare_shard(self.dataset, i, blocking=True, name=t.name(i), source=self.source)
        raise RuntimeError(
            f"shard {t.name(i)!r} was evicted again before it could be read {1 + self.retry} times: "
            f"cache_limit={self.cache_limit} is too small for the read-ahead window")

    def decoded(self, i: int, *, spill: bool = False) -> DecodedShard:
        """The shard through this process's cache (loading it when absent)."""
        i = int(i)
        shard = self.cache.get(i, lambda: self.load(i, spill=spill))
        if self.cache_limit and self.remote is not None:
            from sparkbridge.bridge import mosaic

            if shard.mapped and mosaic.shard_states(self.dataset)[i] != mosaic.ShardState.LOCAL:
                # Mosaic evicted the file (cache_limit): drop the map so the disk space is freed
                self.cache.drop(i)
                shard = self.cache.get(i, lambda: self.load(i, spill=spill))
            mosaic.touch_shard(self.dataset, i)  # Mosaic evicts the least recently used first
        return shard

    # ------------------------------------------------------------------ the resident table

    def load_resident(self, i: int, *, wait: bool) -> None:
        """Put shard ``i``'s rows in the resident table. ``wait``: when another thread or process
        is loading it, wait for it (the foreground); else leave it to them (read-ahead)."""
        res = self.resident
        i = int(i)
        if res.state[i] == LOADED:
            return
        if not res.claim(i):
            if not wait:
                return
            deadline = time.monotonic() + _CLAIM_WAIT_S
            while res.state[i] == LOADING and time.monotonic() < deadline:
                time.sleep(0.0005)
            if res.state[i] == LOADED:
                return
            res.claim(i)  # its loader failed or died: load it here
        try:
            rows = self.small.rows(i)  # most small shards; else (and for every error) the general path
            res.fill(i, int(self.table.starts[i]), self.load(i, spill=False).rows if rows is None else rows)
        except BaseException:
            res.unclaim(i)
            raise

    def drop(self) -> None:
        self.cache.clear()

