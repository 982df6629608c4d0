"""One pass of batches: this worker's sample ids, ``batch_size`` at a time, gathered from shards.

Two ways, chosen per dataset and pass:

* **resident** (every column fixed-width and the whole table fits ``decoded_cache_bytes``): a
  batch is one ``take`` of packed rows from the resident table by sample id (see
  :mod:`bridge.resident`); during the first pass, shards the batch needs that are not in the table
  yet are loaded first (the read-ahead thread loads them in first-need order, as far ahead as it
  can). No per-shard work per batch.
* **per shard**: ids map to (shard, row) with one ``searchsorted``; rows are grouped by shard with
  one stable ``argsort``; each shard's rows come from the process's shard cache (in memory, or
  memory-mapped files when the pass's working set does not fit the budget: see
  :mod:`bridge.working_set`). Shards the pass will not need again are marked for eviction first.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np

from sparkbridge.bridge.batch import PackedBatch
from sparkbridge.bridge.prefill import ahead_pays
from sparkbridge.bridge.readahead import ReadAhead
from sparkbridge.bridge.torch_compat import in_worker
from sparkbridge.bridge.working_set import PassShape, analyze_pass

__all__ = ["iter_batches", "round_robin_ids"]

logger = logging.getLogger(__name__)


def _valid(chunk: np.ndarray) -> np.ndarray:
    return chunk if chunk.min(initial=0) >= 0 else chunk[chunk >= 0]


def iter_batches(ds: Any, ids: Union[np.ndarray, Iterable[np.ndarray]]) -> Iterator[PackedBatch]:
    """Batches of ``ds`` (a :class:`bridge.dataset.BatchDataset`) for the sample ids ``ids``
    (this worker's share of the pass, -1 for padding), in that order; or, from a lazy order
    (:class:`~sparkbridge.bridge.order.GlobalOrder`), an iterable of each batch's ids, computed
    as they are read (then the pass's shards are planned in ascending order: a global shuffle
    needs every shard from its first batches on)."""
    reader = ds.reader()
    if reader.resident is not None:
        source = _resident_batches(ds, reader, ids)
    else:
        source = _shard_batches(ds, reader, ids)
    if not in_worker():
        return source
    return _for_transfer(source, ds.board)


def round_robin_ids(work: np.ndarray, *, drop_last: bool) -> np.ndarray:
    """The sample ids of the batches that DataLoader workers given ``work`` (workers, batches per
    worker, batch size; -1 for padding) would yield, in the order a DataLoader hands them out: one
    from each worker in turn, an exhausted worker dropping out of the turn. A worker skips a batch
    that is all padding, or short with ``drop_last`` (as :func:`_batches` does); the result keeps
    each kept batch's row as it is, so :func:`iter_batches` makes the same decisions on it.

    For reading a resident dataset in one process with ``num_workers > 0``: once every row is
    resident a batch is one ``take``, which costs less than a worker's hand-off to the main
    process (a queue message and a copy out of a shared slot): 2 workers on 2 cores delivered
    0.69x the in-memory bound, one process 2x. The batches are the same, in the same order, so a
    run's state and its resume do not depend on which way they were gathered."""
    valid = work >= 0
    keep = valid.all(axis=2) if drop_last else valid.any(axis=2)
    worker, batch = np.nonzero(keep)  # row-major: by worker, then batch
    turn = (np.cumsum(keep, axis=1) - 1)[worker, batch]  # the how-manieth kept batch of its worker
    order = np.lexsort((worker, turn))
    return np.ascontiguousarray(work[worker[order], batch[order]]).reshape(-1)


def _for_transfer(source: Iterator[PackedBatch], board: Any) -> Iterator[PackedBatch]:
    import torch

    for batch in source:
        if board.last_slot is not None:
            batch.buf, batch.slot = None, board.last_slot
        else:
            batch.buf = torch.from_numpy(batch.buf)
        yield batch


def _batches(ids: Union[np.ndarray, Iterable[np.ndarray]], batch_size: int, drop_last: bool,
             ahead: Optional[ReadAhead]):
    """(batch index, valid ids) of each batch to yield, advancing the read-ahead position."""
    if not isinstance(ids, np.ndarray):  # a lazy order's batches: already without padding or dropped ones
        for j, chunk in enumerate(ids):
            if ahead is not None:
                ahead.position = (j + 1) * batch_size
            yield j, chunk
        return
    n = len(ids)
    for j in range(-(-n // batch_size)):
        a, b = j * batch_size, min((j + 1) * batch_size, n)
        chunk = _valid(ids[a:b])
        if ahead is not None:
            ahead.position = b
        if len(chunk) == 0 or (len(chunk) < batch_size and drop_last):
            continue
        yield j, chunk


def _every_shard(table: Any) -> tuple[np.ndarray, np.ndarray]:
    """Read-ahead plan of a lazy order: every shard, in ascending order, needed at once."""
    return np.arange(table.count), np.zeros(table.count, dtype=np.int64)


def _resident_batches(ds: Any, reader: Any, ids: np.ndarray) -> Iterator[PackedBatch]:
    res, table, plan = reader.resident, ds.table, ds.plan
    layout = table.layouts[0]
    ahead = None
    if not res.complete() and ahead_pays(table):
        def plan_order() -> tuple[np.ndarray, np.ndarray]:
            if not isinstance(ids, np.ndarray):
                return _every_shard(table)
            shape = analyze_pass(ids, table.ends, table.raw_bytes, batch_size=ds.batch_size, window=0)
            return shape.order, shape.first

        window = len(ids) if isinstance(ids, np.ndarray) else 0
        ahead = ReadAhead(plan_order, lambda s: reader.load_resident(s, wait=False), window=window,
                          skip=lambda s: res.state[s] != 0)
        ahead.start()
    ds.stop_prefill()  # first-need order from here on
    try:
        for _, chunk in _batches(ids, ds.batch_size, ds.drop_last, ahead):
            if not res.complete():
                missing = res.missing(table.shard_of(chunk)).tolist()
                for s in missing:  # the ones no other thread has claimed first, then wait for the rest
                    reader.load_resident(s, wait=False)
                for s in missing:
                    reader.load_resident(s, wait=True)
            batch = plan.gather_rows(res.take(chunk), layout, ds.board.alloc)
            batch.ids = chunk
            yield batch
    finally:
        if ahead is not None:
            ahead.stop()


def _shard_batches(ds: Any, reader: Any, ids: np.ndarray) -> Iterator[PackedBatch]:
    table, plan, B = ds.table, ds.plan, ds.batch_size
    cache = reader.cache
    cache.revive_all()
    budget = cache.max_bytes
    window = int(ds.predownload or 0)
    shape: Optional[PassShape] = None
    spill = in_worker() and ds.spill_for_workers  # workers share a mapped file, not a copy each
    # what a shard decoded in memory costs against the budget: its bytes and its int64 offsets
    # (counting the bytes only, a small budget kept evicting and reloading shards: 7,821 loads a pass)
    cost = table.raw_bytes + table.offset_bytes
    if not isinstance(ids, np.ndarray):  # a global shuffle's working set is every shard, all pass long
        if int(cost.sum()) > budget and not spill:
            spill = True
            logger.info("%s: a global shuffle needs every shard at once, %d MB decoded, more than "
                        "decoded_cache_bytes=%d MB: reading decompressed shard files from %s, memory-mapped",
                        ds.source, int(cost.sum()) >> 20, budget >> 20, table.cache_root)
    elif int(cost.sum()) > budget:
        shape = analyze_pass(ids, table.ends, cost, batch_size=B, window=window)
        if shape.max_live_bytes > budget and not spill:
            spill = True
            logger.info("%s: this pass needs %d MB of decoded shards at once, more than decoded_cache_bytes=%d MB: "
                        "reading decompressed shard files from %s, memory-mapped", ds.source,
                        shape.max_live_bytes >> 20, budget >> 20, table.cache_root)
    ahead = None
    if len(cache) < table.count:
        if shape is not None:
            order, first = shape.order, shape.first
            plan_order = lambda: (order, first)  # noqa: E731
        elif not isinstance(ids, np.ndarray):
            plan_order = lambda: _every_shard(table)  # noqa: E731
        else:
            def plan_order() -> tuple[np.ndarray, np.ndarray]:
                s = analyze_pass(ids, table.ends, cost, batch_size=B, window=window)
                return s.order, s.first
        ahead = ReadAhead(plan_order, lambda s: reader.decoded(s, spill=spill), window=window,
                          skip=lambda s: s in cache)
        ahead.start()
    dead = None
    if shape is not None:  # shards in order of their last use, to mark dead as the pass moves on
        by_last = np.argsort(shape.last, kind="stable")
        dead = (shape.order[by_last], shape.last[by_last] // B)
    k = 0
    try:
        for j, chunk in _batches(ids, B, ds.drop_last, ahead):
            s = table.shard_of(chunk)
            rows = chunk - table.starts[s]
            lo, hi = int(s.min()), int(s.max())
            if lo == hi:
                groups = [(reader.decoded(lo, spill=spill), rows, None)]
            else:
                order = np.argsort(s, kind="stable")
                ss = s[order]
                cuts = np.flatnonzero(ss[1:] != ss[:-1]) + 1
                bounds = [0, *cuts.tolist(), len(ss)]
                groups = []
                for c0, c1 in zip(bounds[:-1], bounds[1:]):
                    pos = order[c0:c1]
                    groups.append((reader.decoded(int(ss[c0]), spill=spill), rows[pos], pos))
            batch = plan.gather(groups, len(chunk), ds.board.alloc)
            batch.ids = chunk
            if dead is not None:
                k0 = k
                while k < len(dead[1]) and dead[1][k] <= j:
                    k += 1
                if k > k0:
                    cache.mark_dead(dead[0][k0:k].tolist())
            yield batch
    finally:
        if ahead is not None:
            ahead.stop()
