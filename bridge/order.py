"""Epoch orders: the vocabulary (:class:`ShuffleAlgo`) and the scalable one (:class:`GlobalOrder`).

Mosaic's orders (``py1e``, ``py1br``, ``py1s``, ``py2s``, ``naive``) list every sample id of an
epoch for the whole world before the first batch: ~60 B a row with their temporaries, 57 GiB a
rank at 1B rows. ``shuffle_algo=ShuffleAlgo.GLOBAL`` ("global", the default for ``shuffle=True``) is an order whose whole state is
``(seed, epoch, sample_in_epoch, rows, world)``: batches are computed when they are read.

**What it promises.** Position ``p`` of an epoch holds sample ``perm(p)``, ``perm`` the seeded
bijection of :mod:`sparkbridge.bridge.permutation` for ``(seed, epoch)`` (identity without
``shuffle``): a uniform global shuffle of all the rows (shuffle score ~1.0 in
``bench/shuffle.py``'s terms), a new one every epoch. Positions are consumed a *global batch* at
a time (``batch_size x world_size`` positions); rank ``r`` takes the ``r``-th ``batch_size`` of
each; a rank's batch ``g`` is read by its DataLoader worker ``g % num_workers``, so the batches a
rank yields are the same, in the same order, for any ``num_workers``.

**Resume, elastic.** ``sample_in_epoch`` (the loader's state, Mosaic's unit) is the number of
positions consumed, whatever the world size: a resumed run reads positions ``sample_in_epoch ..``
with *its* world size and batch size. No row is repeated or lost across a change of
``num_workers``, world size or batch size.

**Equal ranks.** When the remaining rows do not divide by the world size, they are padded up to
a multiple of it with repeats of the epoch's first positions (at most ``world_size - 1`` rows,
as Mosaic does); the final global batch is split evenly, so every rank takes as many batches.
``pad_ranks=False`` drops the padding (every row exactly once over all ranks) and splits the final
rows as evenly as they go.

**Trade-off vs Mosaic's orders.** Every rank and worker reads from every shard: rows come from
random places of the whole dataset. That is free when the rows fit in memory (the resident
table) or the page cache (a memory-mapped row file, :mod:`sparkbridge.bridge.resident`), and
costs random reads when the data is larger than the machine's memory, where Mosaic's ``py1e``
(a block of shards at a time) reads sequentially. See README ("Order at scale").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import ClassVar, Iterator, Optional

import numpy as np

from sparkbridge.bridge.permutation import IndexPermutation

__all__ = ["ShuffleAlgo", "GlobalOrder", "BLOCK_POSITIONS", "split_batches"]

#: Positions evaluated per call of the permutation (numpy calls cost ~1 us whatever their size:
#: per 1,024-row batch the bijection cost ~400 ns a row, per 64k positions ~40 ns).
BLOCK_POSITIONS = 1 << 16


class ShuffleAlgo(str, enum.Enum):
    """``StreamingLoader(shuffle_algo=...)``: Mosaic's algorithms, with its exact sample orders,
    or ``GLOBAL`` (:class:`GlobalOrder`, O(1) order memory; the default for ``shuffle=True``:
    :attr:`sparkbridge.bridge.options.LoaderOptions.order_algo`)."""

    PY1E = "py1e"
    PY1BR = "py1br"
    PY1S = "py1s"
    PY2S = "py2s"
    NAIVE = "naive"
    GLOBAL = "global"

    @property
    def mosaic(self) -> bool:
        """Whether Mosaic computes this order (every sample id of an epoch, materialized)."""
        return self is not ShuffleAlgo.GLOBAL

    @classmethod
    def parse(cls, value: object) -> "ShuffleAlgo":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"shuffle_algo must be one of {[a.value for a in cls]}, got {value!r}") from None

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class GlobalOrder:
    """One pass of the global order (see the module doc): positions ``start ..`` of epoch
    ``epoch`` over ``rows`` rows, for ``ranks`` ranks of ``workers`` workers each."""

    rows: int
    shuffle: bool
    seed: int
    epoch: int
    start: int
    ranks: int
    workers: int
    batch_size: int
    pad_ranks: bool = True

    INTS: ClassVar[int] = 9  #: how many ints :meth:`to_ints` gives

    def __post_init__(self) -> None:
        if self.rows < 0 or self.start < 0 or self.ranks < 1 or self.workers < 1 or self.batch_size < 1:
            raise ValueError(f"not a valid order: {self}")

    # ------------------------------------------------------------------ shape

    @property
    def _remaining(self) -> int:
        """Positions left to read from ``start`` (padded to a multiple of the world size)."""
        left = max(0, self.rows - self.start)
        if self.pad_ranks and self.rows > 0:
            left = -(-left // self.ranks) * self.ranks
        return left

    def _batch_span(self, rank: int, g: int) -> tuple[int, int]:
        """(first position, length) of rank ``rank``'s batch ``g``."""
        B, W = self.batch_size, self.ranks
        left = self._remaining
        full = left // (B * W)
        if g < full:
            return self.start + g * B * W + rank * B, B
        rem = left - full * B * W
        q, m = divmod(rem, W)  # m == 0 when padded
        return self.start + full * B * W + rank * q + min(rank, m), q + (1 if rank < m else 0)

    def batch_count(self, rank: int, *, drop_last: bool) -> int:
        """How many batches rank ``rank`` yields in this pass."""
        B, W = self.batch_size, self.ranks
        full = self._remaining // (B * W)
        _, n = self._batch_span(rank, full)
        keep_last = n > 0 and (n == B or not drop_last)
        return full + int(keep_last)

    @property
    def padding(self) -> int:
        """Repeated rows this pass adds so that every rank reads as many."""
        return self._remaining - max(0, self.rows - self.start)

    def without_padding(self) -> "GlobalOrder":
        """The same pass with every row exactly once over all ranks (``pad_ranks=False``)."""
        return replace(self, pad_ranks=False)

    # ------------------------------------------------------------------ samples

    def permutation(self) -> Optional[IndexPermutation]:
        return IndexPermutation(self.rows, seed=self.seed, epoch=self.epoch) if self.shuffle else None

    def samples(self, positions: np.ndarray, perm: Optional[IndexPermutation] = None) -> np.ndarray:
        """The sample id at each position (positions past ``rows`` are the padding: they repeat
        the epoch's first positions)."""
        pos = np.asarray(positions, dtype=np.int64)
        if self.rows and pos.size and int(pos.max()) >= self.rows:
            pos = pos % self.rows
        if not self.shuffle:
            return pos
        return (perm or self.permutation())(pos)

    def ids(self, rank: int, batches: np.ndarray, perm: Optional[IndexPermutation] = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """The sample ids of rank ``rank``'s batches ``batches`` (ascending batch indices below
        :meth:`batch_count`) end to end, and each batch's length: one evaluation of the
        permutation for all of them."""
        g = np.asarray(batches, dtype=np.int64)
        B, W = self.batch_size, self.ranks
        full = self._remaining // (B * W)
        whole = g[g < full]
        pos = ((self.start + rank * B + whole * (B * W))[:, None] + np.arange(B, dtype=np.int64)).reshape(-1)
        lengths = np.full(len(whole), B, dtype=np.int64)
        if len(whole) < len(g):  # the pass's last, short batch
            s, n = self._batch_span(rank, full)
            pos = np.concatenate([pos, np.arange(s, s + n, dtype=np.int64)])
            lengths = np.append(lengths, n)
        return self.samples(pos, perm), lengths

    def batches(self, rank: int, *, worker: Optional[int] = None, drop_last: bool) -> Iterator[np.ndarray]:
        """The sample ids (int64) of each batch rank ``rank`` yields (only those of its DataLoader
        worker ``worker``, when given), computed a block of batches at a time."""
        count = self.batch_count(rank, drop_last=drop_last)
        step = 1 if worker is None else self.workers
        first = 0 if worker is None else worker
        perm = self.permutation()
        per_block = max(1, BLOCK_POSITIONS // self.batch_size)
        for g0 in range(first, count, step * per_block):
            ids, lengths = self.ids(rank, np.arange(g0, min(count, g0 + step * per_block), step), perm)
            yield from split_batches(ids, lengths)

    # ------------------------------------------------------------------ transport

    def to_ints(self) -> list[int]:
        """Its fields as ints (handed to DataLoader workers through shared memory)."""
        return [self.rows, int(self.shuffle), self.seed, self.epoch, self.start, self.ranks, self.workers,
                self.batch_size, int(self.pad_ranks)]

    @classmethod
    def from_ints(cls, values: list[int]) -> "GlobalOrder":
        r, sh, seed, epoch, start, ranks, workers, b, pad = (int(v) for v in values[:cls.INTS])
        return cls(rows=r, shuffle=bool(sh), seed=seed, epoch=epoch, start=start, ranks=ranks, workers=workers,
                   batch_size=b, pad_ranks=bool(pad))


def split_batches(ids: np.ndarray, lengths: np.ndarray) -> Iterator[np.ndarray]:
    """Views of ``ids`` (batches end to end), one per entry of ``lengths``."""
    if len(lengths) and int(lengths.min()) == int(lengths.max()):
        n = int(lengths[0])
        for k in range(len(lengths)):
            yield ids[k * n:(k + 1) * n]
        return
    ends = np.cumsum(lengths).tolist()
    for a, b in zip([0, *ends[:-1]], ends):
        yield ids[a:b]
