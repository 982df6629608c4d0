"""Small fixed-width shards accepted in a few C calls, for the resident table's first fill.

Why: a dataset of 10,000 shards x 100 rows spent ~280 us per shard in the general path
(:meth:`sparkbridge.bridge.shard_source.ShardSource.load`: candidate files tried in turn, with a failed open for a
decompressed copy that is not there; a report object; offsets widened and diffed twice; a decoded
shard object) against ~50 us of reading and decompressing, so its first epoch ran at 0.35-0.55M
rows/s. Here a shard costs one open and read, one hash, one decompression, one comparison of its
header and one copy into the table.

A shard is accepted only when it passes checks at least as strict as ``check_shard`` and
``decode_shard``: the index's hash (the one ``validate_hash`` picks), decompression bounded by
the declared size (``decompress_bounded``, the general path's own), a stored file of exactly its
declared size (read no further: the one check of a small shard's file size, see
:meth:`sparkbridge.bridge.shards.ShardTable.check_declared_sizes`), exactly the declared size and
sample count, and sample offsets exactly ``first + k x row size`` ending at the file's end.
Anything else (a missing file, several hashes to compare, any mismatch) returns None and the caller takes the general path, which
finds the file wherever it is and names the problem: the error messages have one implementation.
Only shards under 1 MiB decoded come here; larger ones are memory-mapped by the general path, where
per-shard overhead does not matter.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional

import numpy as np

from sparkbridge.bridge.shard_source import read_file
from sparkbridge.format.check import decompress_bounded
from sparkbridge.format.codecs import hash_bytes

__all__ = ["SmallShards"]

#: Shards at least this large decoded take the general path.
SMALL_BYTES = 1 << 20
_U32 = np.dtype("<u4")


def _hasher(algo: str) -> Callable[[bytes], str]:
    """xxhash's one-shot digest where there is one (no hasher object per shard), else the general one."""
    import xxhash

    one_shot = getattr(xxhash, f"{algo}_hexdigest", None) if algo in xxhash.algorithms_available else None
    return one_shot or (lambda data: hash_bytes(algo, data))


class _Plan:
    """What reading shards from one place needs, per shard, worked out when a shard is first read.

    Why per shard: a first batch of a shuffled pass over 100,000 shards needs ~1,000 of them, and
    working out all 100,000 paths and hashes before the first one was read took ~1 s. Flat lists
    indexed by shard, not an object per shard (100,000 more objects for the collector to walk)."""

    def __init__(self, table: Any, kind: str, root: str, hash_names: Callable[..., tuple]) -> None:
        self.table = table
        self.kind = kind
        self.root = root
        self.zipped = kind == "zip_data"
        self.hash_names = hash_names
        self._hashers: dict[str, Callable] = {}
        n = table.count
        self.known = np.zeros(n, dtype=bool)
        # per shard: its path; False (general path), None (no hash) or the hasher; the expected
        # digest; the codec of a compressed file (any codec the general path knows)
        self.paths: list[Optional[str]] = [None] * n
        self.hashers: list[Any] = [False] * n
        self.digests: list[Optional[str]] = [None] * n
        self.codecs: list[Optional[str]] = [None] * n
        self.raw_bytes = table.raw_bytes.tolist()
        self.samples = table.samples.tolist()
        self.stored_bytes = (table.zip_bytes if self.zipped else table.raw_bytes).tolist()

    def learn(self, i: int) -> None:
        """Work out shard ``i``'s path, codec and hash (a path outside the root raises, naming it,
        as the general path would)."""
        t = self.table
        entry = t.entries[i]
        codec = entry.get("compression") if self.zipped else None
        path = t.path_under(self.root, self.kind, i)
        ok = path is not None and self.raw_bytes[i] < SMALL_BYTES and (codec or not self.zipped)
        hashes, names = self.hash_names(i, compressed=self.zipped)
        hasher: Any = False
        digest = None
        if ok and not names:
            hasher = None
        elif ok and len(names) == 1 and names[0] in hashes:
            algo = names[0]
            if algo not in self._hashers:
                self._hashers[algo] = _hasher(algo)
            hasher, digest = self._hashers[algo], hashes[algo]
        self.paths[i], self.hashers[i], self.digests[i], self.codecs[i] = path, hasher, digest, codec
        self.known[i] = True


class SmallShards:
    """Reads small shards of an all-fixed-width table from where the general path last found one.

    ``hash_names(i, compressed=)`` -> ``(hashes, names)``: the index's hashes of shard ``i``'s
    stored (or decompressed) file and the ones to compare, as the general path decides them."""

    def __init__(self, table: Any, hash_names: Callable[..., tuple]) -> None:
        self.table = table
        self.hash_names = hash_names
        row = table.layouts[0].row_dtype() if len(table.layouts) == 1 else None
        self.row_bytes = 0 if row is None else row.itemsize
        self._rows_dtype = None if row is None else np.dtype((np.void, row.itemsize))
        self._source: Optional[tuple[str, str]] = None
        self._plans: dict[tuple[str, str], Optional[_Plan]] = {}
        self._steps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def found(self, kind: str, where: str) -> None:
        """The general path read a shard's ``kind`` file (``raw_data``/``zip_data``) from ``where``
        (``cache``/``origin``): the next shards are looked for there first."""
        self._source = (kind, where)

    def _plan(self, source: tuple[str, str]) -> Optional[_Plan]:
        with self._lock:
            if source not in self._plans:
                kind, where = source
                root = self.table.cache_root if where == "cache" else self.table.origin_root
                self._plans[source] = None if root is None or not os.path.isdir(root) else \
                    _Plan(self.table, kind, root, self.hash_names)
            return self._plans[source]

    def _step(self, n: int) -> np.ndarray:
        step = self._steps.get(n)
        if step is None:
            step = self._steps[n] = (self.row_bytes * np.arange(n + 1, dtype=np.int64)).astype(_U32)
        return step

    def rows(self, i: int) -> Optional[np.ndarray]:
        """Shard ``i``'s rows (one ``void`` record each), or None: take the general path."""
        source = self._source
        if source is None or not self.row_bytes:
            return None
        plan = self._plans.get(source) if source in self._plans else self._plan(source)
        if plan is None:
            return None
        if not plan.known[i]:
            plan.learn(i)
        hasher = plan.hashers[i]
        if hasher is False:
            return None
        stored = plan.stored_bytes[i]
        try:
            data = read_file(plan.paths[i], at_most=stored + 1)
        except OSError:
            return None
        if len(data) != stored:  # not the declared size: the general path names the file
            return None
        if hasher is not None and hasher(data) != plan.digests[i]:
            return None
        size = plan.raw_bytes[i]
        codec = plan.codecs[i]
        if codec is not None:
            try:
                data = decompress_bounded(codec, data, max_size=size, where=f"shard {i}")
            except Exception:  # too large, truncated, an unknown codec: the general path names it
                return None
        n = plan.samples[i]
        first = size - n * self.row_bytes
        if len(data) != size or first < 4 * (n + 2):
            return None
        buf = np.frombuffer(data, dtype=np.uint8)
        if int(buf[:4].view(_U32)[0]) != n or not np.array_equal(buf[4:8 + 4 * n].view(_U32) - np.uint32(first),
                                                                 self._step(n)):
            return None
        return buf[first:].view(self._rows_dtype)
