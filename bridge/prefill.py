"""Filling the resident table while Mosaic computes the epoch's order.

The first pass over a resident dataset (:mod:`bridge.resident`) reads every shard, but it can only
start once the pass's sample order is known, and computing Mosaic's order of a 1M-sample epoch
took 0.23 s here, during which no shard was read: a quarter of the first epoch. The prefill
thread loads shards into the table in ascending order from the moment a pass is asked for until
the pass's own read-ahead takes over in first-need order. Where a thread would not pay (many small
local shards: the work is mostly Python) nothing is prefilled: filling them from the thread that
waits for the order was tried, and only delayed the order (10,000 shards: first batch 1.26-1.56 s
against 0.96-1.28 s), since both hold the GIL. Ascending is the order an unshuffled
pass needs them in, and as good as any other for a shuffled one whose first batch touches every
shard. Shards a thread has claimed are skipped by the others, so nothing is loaded twice.

A prefill never raises: a shard it fails to load is left unclaimed, and the pass loads it in the
foreground and raises there, naming the shard.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sparkbridge.bridge.readahead import ReadAhead
from sparkbridge.bridge.resident import EMPTY

__all__ = ["ahead_pays", "start_prefill"]

#: A local shard smaller than this decoded is read in the foreground, without read-ahead.
_AHEAD_MIN_BYTES = 1 << 20


def ahead_pays(table: Any) -> bool:
    """Whether a background thread helps fill the resident table. It does for remote shards
    (downloads wait on the network) and for large ones (decompression and hashing release the
    GIL); for many small local shards the work is mostly Python, and two threads contending for
    the GIL were slower than one: 10,000 shards x 100 rows, first epoch 0.25M rows/s with
    read-ahead, 0.33M without."""
    remote = table.origin_root is None  # a local dataset is Mosaic's "remote" but our origin
    return remote or int(table.raw_bytes.sum()) >= _AHEAD_MIN_BYTES * table.count


def start_prefill(ds: Any) -> Optional[ReadAhead]:
    """A started prefill of ``ds``'s resident table (a :class:`bridge.dataset.BatchDataset`), or
    None when there is nothing to fill or a thread would not pay. Stop it when the pass's
    read-ahead starts. (A resident dataset never forks DataLoader workers, so no fork happens
    under this thread: see :func:`bridge.iterate.round_robin_ids`.)"""
    if not ds.resident():
        return None
    reader = ds.reader()
    res = reader.resident
    if res is None or res.complete() or not ahead_pays(ds.table):
        return None
    count = ds.table.count
    order, first = np.arange(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    prefill = ReadAhead(lambda: (order, first), lambda s: reader.load_resident(s, wait=False), window=0,
                        skip=lambda s: res.state[s] != EMPTY)
    prefill.name = "sparkbridge-prefill"
    prefill.start()
    return prefill

