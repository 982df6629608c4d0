"""Filling the resident table while Mosaic computes the epoch's order.

The first pass over a resident dataset (:mod:`bridge.resident`) reads every shard, but it can only
start once the pass's sample order is known, and computing Mosaic's order of a 1M-sample epoch
took 0.23 s here, during which no shard was read: a quarter of the first epoch. The prefill
thread loads shards into the table in ascending order from the moment a pass is asked for until
the pass's own read-ahead takes over in first-need order (for a local dataset, from before Mosaic
is imported: :mod:`bridge.early`). Where a thread would not pay (many small local shards: the work
is mostly Python) nothing is prefilled: filling them from a thread while the order was computed in
another only delayed the order (10,000 shards: first batch 1.26-1.56 s against 0.96-1.28 s), since
both hold the GIL. Since the order process (:mod:`bridge.orders`) computes the order of such a
dataset, the thread that waits for it fills the table meanwhile
(``BatchDataset.fill_until``). Ascending is the order an unshuffled
pass needs them in, and as good as any other for a shuffled one whose first batch touches every
shard. Shards a thread has claimed are skipped by the others, so nothing is loaded twice.

Large local shards are filled by one thread per core (up to four), each taking every n-th shard:
their decompression, file reads and copies release the GIL (only the xxh64 digest holds it), so
two threads use both cores. 1M rows in 4 zstd shards of 20 MB, 2 cores, 5 loaders each: first
batch 0.158-0.172 s after build with two threads against 0.204-0.238 s with one; the epoch,
timed from build, 3.7-4.0M rows/s against 3.1-3.4M. Remote shards keep one thread: two
downloading from S3 (SeaweedFS on the same 2 cores) gave 1.58-1.95M rows/s against 2.15M.

A prefill never raises: a shard it fails to load is left unclaimed, and the pass loads it in the
foreground and raises there, naming the shard.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from sparkbridge.bridge.readahead import ReadAhead
from sparkbridge.bridge.resident import EMPTY

__all__ = ["Prefill", "ahead_pays", "prefill_threads", "start_prefill"]

#: Local shards smaller than this decoded (on average) are read in the foreground, without
#: read-ahead. 1M rows, first epoch from build, 6 loaders each: shards of 264 KB 2.80M rows/s with a
#: prefill thread against 2.20M without; of 128 KB 2.01M either way; of 8 KB (10,000 shards) a thread
#: only slowed the foreground (see ahead_pays).
_AHEAD_MIN_BYTES = 256 << 10
#: Local shards at least this large decoded (on average) are filled by several threads: of 520 KB,
#: 2.98M rows/s against 2.28M with none; of 1 MB, 2.96M against 2.23M (first batch 0.21 s vs 0.35 s).
_PARALLEL_MIN_BYTES = 512 << 10
_MAX_THREADS = 4


def ahead_pays(table: Any) -> bool:
    """Whether a background thread helps fill the resident table. It does for remote shards
    (downloads wait on the network) and for large ones (decompression and hashing release the
    GIL); for many small local shards the work is mostly Python, and two threads contending for
    the GIL were slower than one: 10,000 shards x 100 rows, first epoch 0.25M rows/s with
    read-ahead, 0.33M without."""
    remote = table.origin_root is None  # a local dataset is Mosaic's "remote" but our origin
    return remote or int(table.raw_bytes.sum()) >= _AHEAD_MIN_BYTES * table.count


class Prefill:
    """The prefill threads of one pass: each takes every ``len(threads)``-th shard, so two never
    start on the same one (a shard claimed meanwhile by the pass is skipped)."""

    def __init__(self, threads: list[ReadAhead]) -> None:
        self.threads = threads

    def stop(self) -> None:
        for t in self.threads:
            t.stop()

    def join(self, timeout: Optional[float] = None) -> None:
        for t in self.threads:
            t.join(timeout)

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)


def prefill_threads(table: Any) -> int:
    """How many threads fill the table: one per core, up to four, for local shards large enough
    that decompression and file reads (which release the GIL) dominate; else one."""
    if table.origin_root is not None and int(table.raw_bytes.sum()) >= _PARALLEL_MIN_BYTES * table.count:
        return max(1, min(_MAX_THREADS, os.cpu_count() or 1, table.count))
    return 1


def start_prefill(table: Any, reader: Any) -> Optional[Prefill]:
    """A started prefill of ``reader``'s resident table (``table``: a
    :class:`bridge.shards.ShardTable`, ``reader``: its :class:`bridge.fetch.ShardReader`), or None
    when there is no such table, nothing to fill or a thread would not pay. Stop it when the
    pass's read-ahead starts. (A resident dataset never forks DataLoader workers, so no fork
    happens under these threads: see :func:`bridge.iterate.round_robin_ids`.)"""
    res = reader.resident
    if res is None or res.complete() or not ahead_pays(table):
        return None
    count = table.count
    n = prefill_threads(table)
    threads = []
    for k in range(n):
        order = np.arange(k, count, n, dtype=np.int64)
        first = np.zeros(len(order), dtype=np.int64)
        t = ReadAhead(lambda o=order, f=first: (o, f), lambda s: reader.load_resident(s, wait=False), window=0,
                      skip=lambda s: res.state[s] != EMPTY)
        t.name = f"sparkbridge-prefill-{k}"
        threads.append(t)
    for t in threads:
        t.start()
    return Prefill(threads)
