"""``ShardSource``: the one place a shard file is opened — locate, fetch, check, decode.

Both kinds of epoch read shards through it: a snapshot epoch (a pinned version read with Mosaic's
order: :class:`sparkbridge.bridge.fetch.ShardReader`, whose fetch is Mosaic's download and
``cache_limit`` eviction) and a followed epoch (commits as they land:
:class:`LoggedShards`, whose fetch copies a shard from the dataset's storage). Before, each had
its own read, check and decode, and a fix to one (a size claim checked before reading, a mapped
file hashed once) did not reach the other.

Where a shard is read from, in order:

1. a decompressed copy on local disk (Mosaic's cache of a remote dataset, an uncompressed local
   dataset, a shard spilled to a cache or spill folder): memory-mapped (:mod:`bridge.mapped`, no
   file descriptor kept), so its pages are the page cache's, shared by every process; small files
   (under 1 MiB) outside spill mode are read instead (thousands of tiny maps cost more than
   their copies);
2. a compressed copy (a local dataset's own file, read in place, or a downloaded one):
   decompressed in memory, at most the size the index declares; when the pass spills it is
   written once, decompressed, where :meth:`ShardSource.spill_copy` says and mapped from there
   (a snapshot that spills leaves that to Mosaic's cache instead: step 3);
3. otherwise :meth:`ShardSource.fetch` brings it to local disk, then 1.

Every shard passes :func:`sparkbridge.format.check.check_shard` (hash per ``validate_hash``,
bounded decompression, size, sample count, offsets) and :func:`sparkbridge.bridge.decode.decode_shard`
before a gather sees it; a mapped file is hashed once per process while it stays the same file.
The file primitives below (:func:`read_file`, :func:`write_file`) are used by the rest of
``bridge/`` (Mosaic's decompression hooks, the small-shard fast path) instead of ``open``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from sparkbridge.bridge.decode import DecodedShard, decode_shard
from sparkbridge.bridge.mapped import map_file
from sparkbridge.errors import CorruptShardError
from sparkbridge.format.check import ShardReport, check_shard

__all__ = ["ShardSource", "LoggedShards", "pick_hash", "check_hash_names", "read_file", "read_declared", "write_file",
           "declared_size_error"]

logger = logging.getLogger(__name__)

_MAP_MIN_BYTES = 1 << 20


# ---------------------------------------------------------------------- file primitives


def read_file(path: str, *, at_most: Optional[int] = None) -> bytes:
    """A shard file's bytes (FileNotFoundError when it is not there); ``at_most``: no more than
    that many (a file longer than the size it should have is not read whole)."""
    with open(path, "rb") as f:
        return f.read() if at_most is None else f.read(at_most)


def declared_size_error(name: str, kind: str, declared: int, path: str, size: int) -> CorruptShardError:
    """The error for a stored file whose size is not the index's claim (``kind``: ``raw_data`` or
    ``zip_data``), raised before any of its bytes is used."""
    return CorruptShardError(
        f"shard {name!r}: {kind}.bytes={declared} but the file {path} has {size} bytes: the file is truncated or "
        "corrupt (or was replaced since the loader was built): rewrite the dataset, or delete the cached copy")


def read_declared(path: str, declared: int, name: str) -> Optional[bytes]:
    """A stored file's bytes once its size matches ``declared`` (the index's claim, checked before
    reading so a replaced or truncated file is named, not half-read); None when it is missing."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != declared:
                raise declared_size_error(name, "zip_data", declared, path, size)
            return f.read()
    except FileNotFoundError:
        return None


def _read_raw_declared(path: str, declared: int, name: str) -> Optional[np.ndarray]:
    """:func:`read_declared` of a decompressed shard file, as a writable array."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != declared:
                raise declared_size_error(name, "raw_data", declared, path, size)
            return np.fromfile(f, dtype=np.uint8)
    except FileNotFoundError:
        return None


def write_file(path: str, data: Any) -> None:
    """Write a shard file (a download, a decompressed copy) under a temporary name first, so a
    reader never maps a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------- hashes


def pick_hash(hashes: Mapping[str, str], validate_hash: Union[str, bool, None]) -> tuple[str, ...]:
    """Which hashes to compare: none (False, or the index has none), the named one, or xxh64 /
    the first listed (None)."""
    if validate_hash is False or (not hashes and not isinstance(validate_hash, str)):
        return ()
    if isinstance(validate_hash, str):
        return (validate_hash,)
    return ("xxh64",) if "xxh64" in hashes else (sorted(hashes)[0],)


def check_hash_names(table: Any, validate_hash: Union[str, bool, None], source: str) -> None:
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


# ---------------------------------------------------------------------- the source


class ShardSource:
    """Checked, decoded shards of one table, for one process.

    ``table`` knows each shard (``name(i)``, ``layout(i)``, ``compression(i)``, ``raw_hashes(i)``,
    ``zip_hashes(i)``; ``samples``, ``raw_bytes``, ``zip_bytes``, ``compressed`` indexable by
    shard) and where its files may be (``raw_candidates(i, labeled=True)``,
    ``zip_candidates(i, labeled=True)``: ``(where, path)`` pairs). A subclass says how a shard
    that is in none of them gets there (:meth:`fetch`)."""

    #: whether a pass that spills may read a compressed file in memory (and write its
    #: decompressed copy itself, :meth:`spill_copy`), rather than leave that to :meth:`fetch`
    zip_when_spilling = True

    def __init__(self, *, table: Any, validate_hash: Union[str, bool, None], retry: int = 7) -> None:
        self.table = table
        self.validate_hash = validate_hash
        self.retry = retry
        self._validated: dict[int, tuple] = {}  # shard -> identity of the mapped file that passed

    # ------------------------------------------------------------------ what subclasses decide

    def fetch(self, i: int) -> None:
        """Bring shard ``i`` to local disk (or raise naming it): none of its candidates exists."""
        raise NotImplementedError

    def spill_copy(self, i: int) -> Optional[str]:
        """Where a spilling pass writes shard ``i`` decompressed (None: nowhere, keep it in memory)."""
        return None

    def found(self, kind: str, where: str) -> None:  # noqa: B027 - a hook, nothing to do by default
        """Shard files of ``kind`` (``raw_data``/``zip_data``) were found at ``where``."""

    # ------------------------------------------------------------------ check

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
        """For Mosaic's decompression hooks (:class:`sparkbridge.bridge.mosaic.SnapshotStream`):
        check and decompress a stored shard."""
        return self.check_stored(i, zipped, compressed=True).raw

    # ------------------------------------------------------------------ decode

    def _from_raw_file(self, i: int, path: str, *, spill: bool) -> Optional[DecodedShard]:
        t = self.table
        mapped = spill or int(t.raw_bytes[i]) >= _MAP_MIN_BYTES
        if mapped:
            try:
                size = os.stat(path).st_size  # before the map, which reads the file in (MAP_POPULATE)
                if size != int(t.raw_bytes[i]):
                    raise declared_size_error(t.name(i), "raw_data", int(t.raw_bytes[i]), path, size)
                buf, ident = map_file(path)
            except FileNotFoundError:
                return None
            if buf.size != int(t.raw_bytes[i]):  # replaced meanwhile: mapped, nothing of it used yet
                raise declared_size_error(t.name(i), "raw_data", int(t.raw_bytes[i]), path, int(buf.size))
        else:
            buf, ident = _read_raw_declared(path, int(t.raw_bytes[i]), t.name(i)), None
            if buf is None:
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

    def _from_zip_file(self, i: int, path: str, *, spill: bool) -> Optional[DecodedShard]:
        t = self.table
        zipped = read_declared(path, int(t.zip_bytes[i]), t.name(i))
        if zipped is None:
            return None
        report = self.check_stored(i, zipped, compressed=True)
        copy = self.spill_copy(i) if spill else None
        if copy is None:
            return decode_shard(t.name(i), t.layout(i), report.raw, report.offsets)
        write_file(copy, report.raw)  # checked before it was written: mapped without a second check
        buf, ident = map_file(copy)
        self._validated[i] = ident
        n = int(t.samples[i])
        return decode_shard(t.name(i), t.layout(i), buf, buf[4:4 + 4 * (n + 1)].view("<u4"), mapped=True)

    def load(self, i: int, *, spill: bool) -> DecodedShard:
        """Shard ``i``, checked, from wherever it is (see the module doc). ``spill``: the pass's
        working set does not fit memory, so prefer files mapped from local disk."""
        t = self.table
        i = int(i)
        for _ in range(1 + self.retry):
            for where, path in t.raw_candidates(i, labeled=True):
                shard = self._from_raw_file(i, path, spill=spill)
                if shard is not None:
                    self.found("raw_data", where)
                    return shard
            if not spill or self.zip_when_spilling:
                for where, path in t.zip_candidates(i, labeled=True):
                    shard = self._from_zip_file(i, path, spill=spill)
                    if shard is not None:
                        self.found("zip_data", where)
                        return shard
            self.fetch(i)
        raise RuntimeError(self.evicted(i))

    def evicted(self, i: int) -> str:
        """Why shard ``i`` could not be read although it was fetched ``1 + retry`` times."""
        return (f"shard {self.table.name(i)!r} was gone again each of the {1 + self.retry} times it was fetched "
                "before it could be read")


class LoggedShards(ShardSource):
    """The shards a followed epoch has taken in from the dataset log, in log order, as a table
    (see :class:`ShardSource`) that grows as commits land.

    ``root_local``: where they are read (the dataset root itself, read in place, or a cache
    folder a remote dataset's shards are copied into from ``storage``). A pass that spills
    writes decompressed copies under ``spill_dir()`` (made on first use)."""

    def __init__(self, *, root_local: str, storage: Any, in_place: bool, source: str,
                 validate_hash: Union[str, bool, None], spill_dir: Any) -> None:
        super().__init__(table=self, validate_hash=validate_hash, retry=1)
        self.root_local, self.storage, self.in_place, self.source = root_local, storage, in_place, source
        self._spill_dir = spill_dir
        self.entries: list[dict] = []
        self.names: list[str] = []
        self.paths: list[str] = []
        self.layouts: list[Any] = []
        self.samples: list[int] = []
        self.raw_bytes: list[int] = []
        self.zip_bytes: list[int] = []
        self.compressed: list[bool] = []
        self._spilled: dict[int, str] = {}

    def add(self, entry: dict, *, name: str, path: str, layout: Any) -> int:
        """Take in one shard (``name`` as the log lists its stored file, ``path`` its local
        file); returns its index."""
        zipped = entry.get("zip_data")
        self.entries.append(entry)
        self.names.append(name)
        self.paths.append(path)
        self.layouts.append(layout)
        self.samples.append(int(entry["samples"]))
        self.raw_bytes.append(int(entry["raw_data"]["bytes"]))
        self.zip_bytes.append(int(zipped["bytes"]) if zipped else 0)
        self.compressed.append(bool(zipped))
        return len(self.entries) - 1

    # ------------------------------------------------------------------ the table

    def name(self, i: int) -> str:
        return self.names[i]

    def layout(self, i: int) -> Any:
        return self.layouts[i]

    def compression(self, i: int) -> Optional[str]:
        return self.entries[i].get("compression") if self.compressed[i] else None

    def raw_hashes(self, i: int) -> Mapping[str, str]:
        return self.entries[i]["raw_data"].get("hashes") or {}

    def zip_hashes(self, i: int) -> Mapping[str, str]:
        return (self.entries[i].get("zip_data") or {}).get("hashes") or {}

    def raw_candidates(self, i: int, *, labeled: bool = True) -> list:
        if not self.compressed[i]:
            return [("cache", self.paths[i])]
        spilled = self._spilled.get(i)
        return [("spill", spilled)] if spilled is not None else []

    def zip_candidates(self, i: int, *, labeled: bool = True) -> list:
        return [("cache", self.paths[i])] if self.compressed[i] else []

    # ------------------------------------------------------------------ fetch and spill

    def fetch(self, i: int) -> None:
        if self.in_place:
            raise FileNotFoundError(f"shard {self.names[i]!r} of {self.source} is listed in the log but missing: "
                                    "the dataset is incomplete")
        write_file(self.paths[i], self.storage.read_bytes(self.names[i]))

    def spill_copy(self, i: int) -> Optional[str]:
        path = os.path.join(self._spill_dir(), f"{i:08d}.mds")
        self._spilled[i] = path
        return path

    def forget_spilled(self) -> None:
        self._spilled.clear()
        self._validated.clear()
