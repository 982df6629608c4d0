"""The shape of one pass over the shards: which shard is first needed when, which one is needed
for the last time when, and how many decompressed bytes must be resident at once.

Why: Mosaic's default shuffle (``py1e`` with blocks of up to 4M samples) spreads every batch over
the whole block, so the *working set* of a pass is every shard of the block, while
``shuffle=False`` or small shuffle blocks need only a few neighbouring shards at a time. Knowing
the pass (the sample ids are computed before it starts), the loader can tell which case it is in:
when the working set fits ``decoded_cache_bytes`` shards are decoded in memory and each is
decoded once per pass (shards not needed again are evicted first); when it does not, decoding in
memory would re-decode evicted shards over and over (an epoch over 4M rows did not finish in
180 s), so shards are read from decompressed files on local disk, memory-mapped, instead.

Computed in chunks (bounded temporary memory whatever the pass length), vectorized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PassShape", "analyze_pass"]

_CHUNK = 1 << 18


@dataclass(frozen=True)
class PassShape:
    """``order``: shards in the order the pass first needs them; ``first``/``last``: for each of
    them, the position (index into the pass's ids) of its first and last use; ``max_live_bytes``:
    the largest sum of decompressed sizes of shards that are between their first use (less the
    read-ahead window) and their last use at any batch."""

    order: np.ndarray
    first: np.ndarray
    last: np.ndarray
    max_live_bytes: int


def analyze_pass(ids: np.ndarray, ends: np.ndarray, raw_bytes: np.ndarray, *, batch_size: int,
                 window: int) -> PassShape:
    """``ids``: the pass's sample ids (-1 is padding), ``ends``: cumulative samples per shard,
    ``raw_bytes``: decompressed size per shard, ``window``: read-ahead, in samples."""
    shards = len(ends)
    big = np.iinfo(np.int64).max
    first = np.full(shards, big, dtype=np.int64)
    last = np.full(shards, -1, dtype=np.int64)
    for a in range(0, len(ids), _CHUNK):
        chunk = ids[a:a + _CHUNK]
        pos = np.arange(a, a + len(chunk), dtype=np.int64)
        valid = chunk >= 0
        if not valid.all():
            chunk, pos = chunk[valid], pos[valid]
        sid = np.searchsorted(ends, chunk, side="right")
        np.minimum.at(first, sid, pos)
        np.maximum.at(last, sid, pos)
    used = np.flatnonzero(last >= 0)
    order = used[np.argsort(first[used], kind="stable")]
    f, l = first[order], last[order]
    if not len(order):
        return PassShape(order, f, l, 0)
    nb = -(-len(ids) // batch_size) + 1
    delta = np.zeros(nb + 1, dtype=np.int64)
    sizes = raw_bytes[order].astype(np.int64)
    np.add.at(delta, np.maximum(f - window, 0) // batch_size, sizes)
    np.add.at(delta, l // batch_size + 1, -sizes)
    return PassShape(order, f, l, int(np.cumsum(delta).max()))
