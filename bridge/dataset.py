"""``BatchDataset``: Mosaic's ``StreamingDataset`` with the per-sample fetch replaced by batches.

Mosaic still decides everything that makes a run correct and elastic: which sample ids each
rank and worker reads, in which order (every shuffle algorithm and seed), download-ahead,
``cache_limit`` eviction, and where a resumed epoch starts. This class only changes how those ids
become data (:mod:`bridge.iterate`): shards are loaded by :mod:`bridge.fetch`, checked, and
gathered from whole (see :mod:`bridge.batch`).

The pass to read (epoch, start, sample order) comes from the :class:`~bridge.passes.PassBoard`
the loader shares with this dataset, instead of Mosaic's shared-memory counters, so every process
computes the same partition without cross-process barriers at iteration time.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from sparkbridge.bridge import mosaic
from sparkbridge.bridge.batch import BatchPlan, PackedBatch
from sparkbridge.bridge.cache import DEFAULT_DECODED_CACHE
from sparkbridge.bridge.early import EarlyFill
from sparkbridge.bridge.fetch import ShardReader, check_hash_names
from sparkbridge.bridge.iterate import iter_batches
from sparkbridge.bridge.order import GlobalOrder, ShuffleAlgo
from sparkbridge.bridge.passes import PassBoard
from sparkbridge.bridge.prefill import Prefill, start_prefill
from sparkbridge.bridge.resident import EMPTY, ResidentRows, fits, mappable
from sparkbridge.bridge.shards import ShardTable
from sparkbridge.errors import DatasetNotFoundError
from sparkbridge.log.snapshot import Snapshot

__all__ = ["BatchDataset", "DEFAULT_DECODED_CACHE"]

logger = logging.getLogger(__name__)


class BatchDataset(mosaic.StreamingDataset):
    """An iterable of :class:`~bridge.batch.PackedBatch` for this rank/worker's share of a pass.

    ``origin``: a local dataset root read through the cache folder ``local`` (``remote`` is then
    that root too): its shards are read in place, and only spilled ones are written to ``local``.
    ``early``: the resident table's fill, started from the same options before this was built
    (:mod:`bridge.early`); adopted here."""

    def __init__(
        self,
        *,
        snapshot: Snapshot,
        remote: Optional[str],
        local: Optional[str],
        origin: Optional[str],
        board: PassBoard,
        batch_size: int,
        shuffle: bool,
        shuffle_seed: int,
        shuffle_algo: ShuffleAlgo,
        shuffle_block_size: Optional[int],
        num_canonical_nodes: Optional[int],
        partition_algo: str,
        cache_limit: Optional[Union[int, str]],
        predownload: Optional[int],
        download_retry: int,
        download_timeout: float,
        validate_hash: Union[str, bool, None],
        drop_last: bool,
        decoded_cache_bytes: Optional[int],
        columns: Optional[Sequence[str]],
        features: Optional[Sequence[str]],
        label: Optional[str],
        early: Optional[EarlyFill] = None,
    ) -> None:
        source = remote if origin is None and remote else (origin or local)
        if not snapshot.shards or snapshot.rows == 0:
            raise DatasetNotFoundError(
                f"{source} (version {snapshot.version}) holds no rows yet: there is nothing to stream")
        self._reader: Optional[ShardReader] = None
        self._reader_pid = -1
        stream = mosaic.SnapshotStream(remote=remote, local=local, shards=snapshot.shards, name=str(source),
                                       check=self._decompress_for_mosaic, count_index=bool(cache_limit))
        mosaic.serialize_prefix_registration()
        algo = ShuffleAlgo.parse(shuffle_algo)
        with mosaic.building():  # its per-shard shared arrays are set in bulk (bridge.mosaic._SharedArray)
            super().__init__(
                streams=[stream], batch_size=batch_size, shuffle=shuffle, shuffle_seed=shuffle_seed,
                # Mosaic never computes a GLOBAL order: its settings are only recorded in the state
                shuffle_algo=algo.value if algo.mosaic else ShuffleAlgo.PY1E.value,
                shuffle_block_size=shuffle_block_size, num_canonical_nodes=num_canonical_nodes,
                partition_algo=partition_algo, cache_limit=cache_limit, predownload=predownload,
                download_retry=download_retry, download_timeout=download_timeout,
                validate_hash=None,  # checked by bridge.fetch when a shard is read
                allow_unsafe_types=False,
            )
        self.shuffle_algo = algo.value  # what a state records
        self.order_algo = algo
        try:
            stream = self.streams[0]
            self.source = source
            self.version = snapshot.version
            self.identity = snapshot.identity  # what a resumed run must find again
            # the columns' logical types; not the index digest (1 s to serialize 100,000 entries)
            self.manifest = snapshot.manifest(hash_index=False)
            self.drop_last = bool(drop_last)
            self.validate_hash = validate_hash
            self.board = board
            cache_root = os.path.join(stream.local, stream.split or "")
            if early is not None and (early.table.cache_root, early.table.origin_root) != (cache_root, origin):
                early.stop()  # Mosaic placed the cache elsewhere than the fill assumed: start afresh
                early = None
            if early is not None:
                self.table = early.table  # its hash names were checked when the fill started
            else:
                self.table = ShardTable(snapshot.shards, cache_root=cache_root, origin_root=origin,
                                        where=f"{source}, version {snapshot.version}")
                check_hash_names(self.table, validate_hash, str(source))
            self.table.check_declared_sizes(int(decoded_cache_bytes or DEFAULT_DECODED_CACHE))
            firsts = [int(np.argmax(self.table.layout_index == k)) for k in range(len(self.table.layouts))]
            self.plan = BatchPlan(self.table.layouts, shard_names=[self.table.name(i) for i in firsts],
                                  manifest=self.manifest, columns=columns, features=features, label=label)
        except BaseException:
            # Mosaic has already made its shared memory: give it back now, not at interpreter exit
            mosaic.release_shared_memory(self)
            raise
        self.decoded_cache_bytes = int(decoded_cache_bytes or DEFAULT_DECODED_CACHE)
        self.remote = stream.remote
        self.spill_for_workers = bool(self.remote is not None and self.table.compressed.any())
        self._resident: Optional[ResidentRows] = None
        self._prefill: Optional[Prefill] = None
        if early is not None:
            reader = early.reader
            reader.dataset, reader.remote, reader.cache_limit = self, self.remote, self.cache_limit
            self._reader, self._reader_pid, self._resident = reader, os.getpid(), reader.resident
            self._prefill = early.prefill

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # holds locks and maps; each process builds its own
        state["_reader_pid"] = -1
        state["_prefill"] = None  # a thread of the process that started it
        return state

    # ------------------------------------------------------------------ shards

    def _resident_fits(self) -> bool:
        return fits(self.table, self.decoded_cache_bytes) or self._resident_mapped()

    def _resident_mapped(self) -> bool:
        """A global order over rows that do not fit ``decoded_cache_bytes``: the row table is
        backed by a file (page cache), since each batch touches up to ``batch_size`` shards
        (:mod:`sparkbridge.bridge.resident`)."""
        return self.lazy_order and not fits(self.table, self.decoded_cache_bytes) and mappable(self.table)

    def _prepare_resident(self) -> None:
        """The resident table, when the rows fit it (made once, by the first reader)."""
        if self._resident is None and self._resident_fits():
            folder = None
            if self._resident_mapped():
                from sparkbridge.bridge.spill import private_spill_root

                folder = private_spill_root()
                logger.info("%s: %d MB of rows, more than decoded_cache_bytes=%d MB, read in a global shuffle: "
                            "the row table is a file mapped from %s (page cache, not anonymous memory)", self.source,
                            (self.table.total_samples * self.table.layouts[0].row_dtype().itemsize) >> 20,
                            self.decoded_cache_bytes >> 20, folder)
            self._resident = ResidentRows.for_table(self.table, folder=folder)

    def reader(self) -> ShardReader:
        """This process's shard reader (built on first use; a forked worker builds its own)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._prepare_resident()
            self._reader = ShardReader(
                dataset=self, table=self.table, validate_hash=self.validate_hash, remote=self.remote,
                source=str(self.source), cache_limit=self.cache_limit, budget=self.decoded_cache_bytes,
                resident=self._resident)
            self._reader_pid = os.getpid()
        return self._reader

    def resident(self) -> bool:
        """Whether the rows are read through the resident table (:mod:`bridge.resident`)."""
        return self._resident is not None or self._resident_fits()

    def start_prefill(self) -> bool:
        """Start filling the resident table while the pass's order is computed (:mod:`bridge.prefill`);
        returns whether a prefill runs."""
        if self._prefill is None and self.resident():
            self._prefill = start_prefill(self.table, self.reader())
        return self._prefill is not None

    def fill_until(self, done: Callable[[], bool]) -> None:
        """Load shards into the resident table in this thread, in ascending order, until
        ``done()``. For the wait on a pass's order computed by the order process
        (:mod:`bridge.orders`), when no prefill runs (many small local shards): this thread then
        has the GIL to itself. A shard that fails is left to the pass, which raises naming it."""
        if not self.resident() or self._prefill is not None:
            return
        reader = self.reader()
        for s in np.flatnonzero(reader.resident.state == EMPTY).tolist():
            if done():
                return
            try:
                reader.load_resident(s, wait=False)
            except Exception:  # noqa: BLE001 - loaded again by the pass, which raises naming the shard
                continue

    def stop_prefill(self, *, join: bool = False) -> None:
        """Stop the prefill after the shard it is loading; ``join``: wait for that (before a fork)."""
        prefill, self._prefill = self._prefill, None
        if prefill is not None:
            prefill.stop()
            if join:
                prefill.join()

    def decoded(self, shard_id: int):
        """Shard ``shard_id`` decoded (through this process's cache)."""
        return self.reader().decoded(int(shard_id))

    def _decompress_for_mosaic(self, i: int, zipped: bytes) -> Any:
        return self.reader().decompressed(i, zipped)

    def release(self) -> None:
        """Drop decoded shards, maps and the resident table (``StreamingLoader.close``)."""
        self.stop_prefill(join=True)
        if self._reader is not None:
            self._reader.drop()
        self._reader = None
        if self._resident is not None:
            self._resident.close()
        self._resident = None

    # ------------------------------------------------------------------ order

    def work_world(self, workers_per_rank: int) -> Any:
        p = mosaic.rank_world(self)
        return mosaic.World(num_nodes=p.num_nodes, ranks_per_node=p.ranks_per_node,
                            workers_per_rank=workers_per_rank, worker=p.rank * workers_per_rank)

    def order_settings(self) -> tuple:
        return (self.num_canonical_nodes, self.shuffle_block_size, self.initial_physical_nodes)

    def settle_order(self, workers_per_rank: int) -> tuple:
        """Apply Mosaic's order defaults for this world (once they are set they stay) and return
        the settings an order depends on beyond the constructor's (:meth:`order_settings`)."""
        mosaic.apply_order_defaults(self, self.work_world(workers_per_rank))
        return self.order_settings()

    @property
    def lazy_order(self) -> bool:
        """Whether passes are :class:`~sparkbridge.bridge.order.GlobalOrder`s (computed per batch)
        rather than Mosaic's arrays of every sample id."""
        return self.order_algo is ShuffleAlgo.GLOBAL

    def resample_streams(self, epoch: int, stream_id: Optional[int] = None) -> tuple:
        """Mosaic's, without its loop over every shard when the one stream is read whole
        (:func:`sparkbridge.bridge.mosaic.resample_whole`: the same arrays)."""
        whole = mosaic.resample_whole(self, epoch) if stream_id is None else None
        return whole if whole is not None else super().resample_streams(epoch, stream_id)

    def compute_work(self, epoch: int, sample_in_epoch: int, workers_per_rank: int) -> Union[np.ndarray, GlobalOrder]:
        """The order of one pass for the whole world. Mosaic's: its sample ids, (nodes, ranks per
        node, workers per rank, batches per worker, batch size), -1 for padding, int32 when the
        ids fit; ``GLOBAL``: a :class:`~sparkbridge.bridge.order.GlobalOrder` (a few ints)."""
        world = self.work_world(workers_per_rank)
        mosaic.apply_order_defaults(self, world)
        if self.lazy_order:
            return GlobalOrder(rows=int(self.num_samples), shuffle=bool(self.shuffle), seed=int(self.shuffle_seed),
                               epoch=int(epoch), start=int(sample_in_epoch), ranks=int(world.num_ranks),
                               workers=int(workers_per_rank), batch_size=int(self.batch_size))
        work = mosaic.generate_work(self.batching_method, self, world, epoch, sample_in_epoch)
        if self.num_samples < (1 << 31) - 1:
            work = work.astype(np.int32)
        _release_free_heap()
        return work

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[PackedBatch]:
        order = self.board.sync()
        if order is not None:
            self.num_canonical_nodes, self.shuffle_block_size, self.initial_physical_nodes = order
        p = mosaic.detect_worker_worlds(self)
        epoch, start = self.board.epoch, self.board.start
        work = self.board.work_for(epoch, start, p.workers_per_rank)
        if work is None:
            work = self.compute_work(epoch, start, p.workers_per_rank)
        if isinstance(work, GlobalOrder):
            worker = p.worker_of_rank if p.workers_per_rank > 1 else None
            return iter_batches(self, work.batches(p.rank, worker=worker, drop_last=self.drop_last))
        ids = np.ascontiguousarray(work[p.node, p.rank_of_node, p.worker_of_rank]).reshape(-1)
        return iter_batches(self, ids)


def _load_libc() -> Any:
    from sparkbridge.bridge.mapped import load_libc

    return load_libc()


_LIBC = _load_libc()


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps the temporaries of Mosaic's order
    computation, ~6x the order's size, otherwise: +185 MB of resident memory at 4M samples)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
