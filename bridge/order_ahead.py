"""A global order's sample ids computed a chunk ahead of the batch loop, in a thread.

Why: Mosaic's orders reach the batch loop as arrays computed an epoch ahead in another process
(:mod:`sparkbridge.bridge.orders`), so on the in-memory fast path its loop only slices ids. A
global order (:class:`~sparkbridge.bridge.order.GlobalOrder`) evaluated its permutation in the
loop, a block of batches at a time: work the loop's core did that Mosaic's did not. Here a thread
evaluates the next chunk of the rank's batches (:data:`CHUNK_POSITIONS` positions) while the loop
reads the current one, and the next epoch's first chunk during the current epoch
(:meth:`OrderAhead.request_first`). When the loader has its order process (a resident or mapped
row table, :mod:`sparkbridge.bridge.orders`), the thread only waits for that process to compute
the chunk (:attr:`OrderAhead.helper`): evaluated in the thread, the chunk's ~1,000 numpy calls
each retook the GIL from the batch loop, which then waited ~300 times an epoch (1M rows, 2 cores:
0.86-0.92x Mosaic's py1e on a quiet machine, against 1.03-1.08x from the process:
bench/results/order.md).

Memory: at most :data:`KEEP` chunks wait besides the one being read (the next, and the next
epoch's first): 8 MB of int64 ids each, whatever the number of rows.

Only the loader's own process reads through this (no DataLoader worker does: a forked child
would inherit futures whose thread it does not have); a pass read by workers evaluates its
batches in each worker (:meth:`GlobalOrder.batches`).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Optional

import numpy as np

from sparkbridge.bridge.order import BLOCK_POSITIONS, GlobalOrder, split_batches

__all__ = ["OrderAhead", "CHUNK_POSITIONS", "chunk_ids"]

#: Positions evaluated at once ahead of the loop (1M: 8 MB of ids).
CHUNK_POSITIONS = 1 << 20
#: Chunks computed and not yet read, at most (the oldest is dropped beyond that).
KEEP = 2


def chunk_ids(order: GlobalOrder, rank: int, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids of rank ``rank``'s batches ``g0 .. g1 - 1`` and their lengths, evaluated a block
    of positions at a time (whose temporaries stay in the core's cache)."""
    perm = order.permutation()
    per = max(1, BLOCK_POSITIONS // order.batch_size)
    parts = [order.ids(rank, np.arange(a, min(g1, a + per)), perm) for a in range(g0, g1, per)]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _chunks(order: GlobalOrder, rank: int, drop_last: bool) -> list[tuple[int, int]]:
    """Rank ``rank``'s batches of ``order`` as chunks ``(first batch, end)``."""
    count = order.batch_count(rank, drop_last=drop_last)
    per = max(1, CHUNK_POSITIONS // order.batch_size)
    return [(g, min(count, g + per)) for g in range(0, count, per)]


class OrderAhead:
    """Chunks of global orders' ids, computed in one thread (started on first use)."""

    def __init__(self) -> None:
        #: computes a chunk in another process (``helper(order, rank, g0, g1)``; None: it could
        #: not, compute it here); see :meth:`sparkbridge.bridge.orders.OrderProcess.compute_ids`
        self.helper: Optional[Callable[..., Optional[tuple[np.ndarray, np.ndarray]]]] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._futures: dict[tuple, Future] = {}  # (order, rank, first batch, end) -> (ids, lengths)
        self._lock = threading.Lock()

    def _request(self, key: tuple) -> None:
        with self._lock:
            if key in self._futures:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="sparkbridge-order-ahead")
            order, rank, g0, g1 = key
            self._futures[key] = self._executor.submit(self._evaluate, order, rank, g0, g1)
            while len(self._futures) > KEEP:
                self._futures.pop(next(iter(self._futures)))  # the oldest request: its result is dropped

    def _evaluate(self, order: GlobalOrder, rank: int, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray]:
        helper = self.helper
        got = helper(order, rank, g0, g1) if helper is not None else None
        return got if got is not None else chunk_ids(order, rank, g0, g1)

    def _pop(self, key: tuple) -> Optional[Future]:
        with self._lock:
            return self._futures.pop(key, None)

    def pending(self) -> bool:
        """Whether a chunk is being computed (the thread has work)."""
        with self._lock:
            return any(not f.done() for f in self._futures.values())

    def request_first(self, order: GlobalOrder, rank: int, *, drop_last: bool) -> None:
        """Start computing the first chunk of ``order`` (a pass that is read next)."""
        chunks = _chunks(order, rank, drop_last)
        if chunks:
            self._request((order, rank, *chunks[0]))

    def batches(self, order: GlobalOrder, rank: int, *, drop_last: bool,
                then: Optional[Callable[[], None]] = None) -> Iterator[np.ndarray]:
        """The ids of each batch rank ``rank`` yields, as :meth:`GlobalOrder.batches` gives them,
        each chunk taken from the thread (or computed here when it was not requested).
        ``then()`` is called as the last chunk starts (to request the next pass's first)."""
        chunks = _chunks(order, rank, drop_last)
        for k, (g0, g1) in enumerate(chunks):
            fut = self._pop((order, rank, g0, g1))
            if k + 1 < len(chunks):  # the thread starts on it as soon as it is free
                self._request((order, rank, *chunks[k + 1]))
            elif then is not None:
                then()
            ids, lengths = fut.result() if fut is not None else self._evaluate(order, rank, g0, g1)
            del fut
            yield from split_batches(ids, lengths)

    def clear(self) -> None:
        """Forget every requested chunk (the passes they were for will not be read)."""
        with self._lock:
            self._futures.clear()

    def close(self) -> None:
        with self._lock:
            self._futures.clear()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
