"""The loader's epoch sources: stages with a position, in the style of ``torchdata.nodes``.

A :class:`~sparkbridge.bridge.loader.StreamingLoader` reads a chain of stages::

    epoch source ──► (shard source) ──► batch assembly ──► transform (optional) ──► device
    SnapshotEpochs / FollowedEpoch      bridge.device        bridge.transform      bridge.device

Each epoch source hands out packed batches of one pass (:class:`sparkbridge.bridge.batch.PackedBatch`)
and has a position: :meth:`state_dict` says where to resume, :meth:`reset` resumes there. Both
read shards through :mod:`sparkbridge.bridge.shard_source`. The two share one :class:`Position`
(the loader's epoch and how many batches of it were handed out), since a followed epoch is the
first epoch of the same run and later epochs read the version it ended at; the loader's state is
the position of whichever source is current (:class:`sparkbridge.bridge.state.LoaderState`,
whose ``follow`` field nests the followed epoch's own).

* :class:`SnapshotEpochs`: a pinned version read in Mosaic's order (or the global order), by this
  process, the resident table or DataLoader workers; the order of the next epochs is computed in
  the background (a thread, or the order process of :mod:`sparkbridge.bridge.orders`).
* :class:`FollowedEpoch`: the first epoch read while the dataset is written
  (:mod:`sparkbridge.bridge.follow`).

The stages receive what they need (the options, the dataset's :class:`~sparkbridge.bridge.source.Source`,
the shared :class:`~sparkbridge.bridge.passes.PassBoard`), never the loader.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Optional

import numpy as np

from sparkbridge.bridge.options import LoaderOptions
from sparkbridge.bridge.order import GlobalOrder, ShuffleAlgo
from sparkbridge.bridge.order_ahead import OrderAhead
from sparkbridge.bridge.orders import OrderProcess, OrderProcessDied
from sparkbridge.bridge.passes import PassBoard
from sparkbridge.bridge.source import Source, claim_cache, mark_cache, open_version
from sparkbridge.bridge.state import LoaderState, StateError

__all__ = ["Position", "SnapshotEpochs", "FollowedEpoch", "without_repeats"]

logger = logging.getLogger(__name__)

_MAX_SLOT_BYTES = 512 << 20


def without_repeats(work: np.ndarray) -> np.ndarray:
    """``work`` (nodes, ranks, workers, batches, batch; -1 for padding) with every repeat of a
    sample id replaced by -1, the first occurrence in that layout kept. Why: Mosaic repeats up to
    ``world_size - 1`` samples so every rank gets as many batches; an evaluation summed over
    ranks would count those twice. Every rank computes the same ``work``, so every rank keeps the
    same occurrence and the ranks together read each row exactly once."""
    flat = work.reshape(-1)
    valid = np.flatnonzero(flat >= 0)
    _, first = np.unique(flat[valid], return_index=True)
    if first.size == valid.size:
        return work
    out = np.full_like(flat, -1)
    keep = valid[first]
    out[keep] = flat[keep]
    return out.reshape(work.shape)


class Position:
    """Where the loader is: the epoch being read (or the next ``iter()`` reads), the sample it
    started at (a resumed epoch starts mid-way), how many batches of it were handed out, whether
    a pass is under way and which (``token``: a superseded pass's iterator stops counting).

    One object, reset in one place (:meth:`reset`), instead of five fields set by hand wherever
    a pass began, ended or was resumed."""

    __slots__ = ("epoch", "start", "consumed", "active", "token", "pass_batches")

    def __init__(self) -> None:
        self.pass_batches = 0
        self.reset(0)

    def reset(self, epoch: int, start: int = 0) -> None:
        """No pass under way; the next one reads ``epoch`` from sample ``start``."""
        self.epoch, self.start, self.consumed, self.active, self.token = epoch, start, 0, False, None

    def begin(self, batches: int = 0, consumed: int = 0) -> object:
        """A pass starts (``batches`` long, ``consumed`` of them already handed out before a
        resume): its token."""
        self.token = object()
        self.pass_batches, self.consumed, self.active = batches, consumed, True
        return self.token

    def handed(self, token: object) -> bool:
        """One more batch of pass ``token`` reached the caller (False: that pass was superseded)."""
        if self.token is not token:
            return False
        self.consumed += 1
        return True


class _OnPosition:
    """The position's fields under the names the loader's code always used (``self._epoch``...),
    so the code moved here from the loader reads as it did."""

    pos: Position

    _epoch = property(lambda self: self.pos.epoch, lambda self, v: setattr(self.pos, "epoch", v))
    _start = property(lambda self: self.pos.start, lambda self, v: setattr(self.pos, "start", v))
    _consumed = property(lambda self: self.pos.consumed, lambda self, v: setattr(self.pos, "consumed", v))
    _active = property(lambda self: self.pos.active, lambda self, v: setattr(self.pos, "active", v))
    _token = property(lambda self: self.pos.token, lambda self, v: setattr(self.pos, "token", v))
    _pass_batches = property(lambda self: self.pos.pass_batches, lambda self, v: setattr(self.pos, "pass_batches", v))


class SnapshotEpochs(_OnPosition):
    """Epochs over one pinned dataset version (a :class:`~sparkbridge.bridge.dataset.BatchDataset`):
    the order of each pass, who reads it (this process, the resident table, DataLoader workers),
    and the position within it. ``dataset`` is None while the first epoch is followed
    (:class:`FollowedEpoch`); :meth:`adopt` gives it the version that epoch ended at."""

    def __init__(self, *, options: LoaderOptions, source: Source, board: PassBoard, pos: Position,
                 dataset_options: dict) -> None:
        self.options = options
        self.source = source
        self.pos = pos
        self._board = board
        self._dataset_options = dataset_options
        self._spill_folders: list[str] = []
        # stale Mosaic segments are removed before the first dataset allocates its own (_build_dataset)
        self._clean_stale_shm = bool(options.clean_stale_shm)
        self.batch_size = options.batch_size
        self.num_workers = options.num_workers
        self.drop_last = bool(options.drop_last)
        self.pad_ranks = bool(options.pad_ranks)
        self.prefetch = options.prefetch
        self.dataset: Any = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._futures: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._len: Optional[int] = None
        self._dl: Any = None  # persistent DataLoader (num_workers > 0): workers keep decoded shards
        self._said_gathered = False
        self._closed = False
        self._orders: Optional[OrderProcess] = None  # see _start_orders
        self._orders_for: Any = None  # the dataset an order process was started (or tried) for
        self._ids_ahead = OrderAhead()  # a global order's ids, a chunk ahead (read in this process)

    def open_first(self, version: Optional[int]) -> None:
        """Build the dataset of ``version`` at construction; a resident one starts loading its
        shards and the first epoch's order now."""
        self.dataset = self._build_dataset(version, early=True)
        if self.dataset.resident():
            # The first epoch's order and shards start loading now, in the background: a training
            # script builds its model meanwhile, and iter() finds them ready. (A resident dataset
            # never forks workers, so these threads never run under a fork.)
            if not self.dataset.start_prefill():
                self._start_orders(idle=True)  # no thread loads shards (many small local ones): fork now
            self._submit(0, 0)
        self._request_first_ids(0)

    def adopt(self, version: Optional[int]) -> None:
        """Read ``version`` from now on (None: the latest): after a followed epoch, or a saved
        state taken after one."""
        from sparkbridge.errors import VersionNotFoundError

        try:
            self.dataset = self._build_dataset(version if version is not None and version >= 0 else None)
        except VersionNotFoundError as exc:
            raise StateError(f"the saved state read version {version} of {self.source.name}, which can no longer "
                             f"be read ({exc}); resuming on other data would repeat or skip samples") from None
        self._len = None

    def drop_dataset(self) -> None:
        """Give up the dataset (a saved state resumes a followed epoch instead)."""
        if self.dataset is not None:
            self._shutdown_workers()
            self._release(self.dataset)
            self.dataset = None

    def _build_dataset(self, version: Optional[int], *, early: bool = False):
        """The dataset of ``version`` (None: the latest). ``early`` (at construction only): a local
        dataset's resident table starts filling before Mosaic is imported (:mod:`bridge.early`).
        Not on a rebuild, where the dataset it replaces still holds its table until then. The
        cyclic collector is paused meanwhile (:mod:`sparkbridge.collector`): the version's entries
        and Mosaic's reader per shard are hundreds of thousands of objects without cycles."""
        from sparkbridge.collector import paused_collector

        with paused_collector():
            return self._build_dataset_paused(version, early=early)

    def _build_dataset_paused(self, version: Optional[int], *, early: bool):
        from sparkbridge.bridge.early import start_early_fill

        snapshot = open_version(self.source, version, download_timeout=self._dataset_options["download_timeout"])
        logger.debug("%s: reading version %s (%s)", self.source.name, snapshot.version, snapshot.identity)
        if self.source.remote is not None and self.source.local is not None:
            claim_cache(self.source.local, self.source.remote, snapshot)
        options = dict(self._dataset_options)
        origin = self._origin(self.source)
        if origin is not None and self.source.remote is None:
            if any(s.get("zip_data") for s in snapshot.shards):
                # compressed and no local= given: read in place, spill into a folder of our choosing
                options["remote"], options["local"] = origin, self._new_spill_folder(origin)
            else:
                origin = None  # uncompressed: every shard is mapped in place, nothing is ever written
        fill = None
        if early:  # a local dataset's shards load while Mosaic is imported and builds its dataset
            fill = start_early_fill(snapshot, remote=options["remote"], local=options["local"], origin=origin,
                                    validate_hash=options["validate_hash"],
                                    decoded_cache_bytes=options["decoded_cache_bytes"])
        try:
            if self._clean_stale_shm:  # imports Mosaic: after the fill has started
                from sparkbridge.bridge.distributed import clean_stale_shared_memory

                self._clean_stale_shm = False
                clean_stale_shared_memory()
            from sparkbridge.bridge.dataset import BatchDataset

            return BatchDataset(snapshot=snapshot, origin=origin, board=self._board, early=fill, **options)
        except BaseException:
            if fill is not None:
                fill.stop()
            raise

    @staticmethod
    def _origin(source: Source) -> Optional[str]:
        """The local dataset root when the dataset is a local folder (read in place)."""
        if source.remote is None:
            return source.local
        return source.remote if "://" not in source.remote else None

    def _new_spill_folder(self, root: str) -> str:
        from sparkbridge.bridge.distributed import broadcast_from_rank0
        from sparkbridge.bridge.spill import new_spill_folder, remove_stale_spill_folders

        remove_stale_spill_folders()
        folder = broadcast_from_rank0(lambda: new_spill_folder(root))
        self._spill_folders.append(folder)
        logger.info("%s: shards that do not fit decoded_cache_bytes will be decompressed into %s (removed by "
                    "close(); pass local= to choose the folder)", root, folder)
        return folder

    # ------------------------------------------------------------------ facts

    @property
    def world_size(self) -> int:
        if self.dataset is None:
            from sparkbridge.bridge.distributed import world_info

            return world_info()[1]
        from sparkbridge.bridge import mosaic

        return int(mosaic.rank_world(self.dataset).num_ranks)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` read ``epoch`` from its start."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.pos.reset(epoch)

    def __len__(self) -> int:
        if self._len is None:
            from sparkbridge.bridge import mosaic

            ds = self.dataset
            if ds.lazy_order:
                order = ds.compute_work(self._epoch, 0, max(1, self.num_workers))
                self._len = self._count_batches(order if self.pad_ranks else order.without_padding())
                return self._len
            world = ds.work_world(max(1, self.num_workers))
            mosaic.apply_order_defaults(ds, world)
            ids = mosaic.get_partitions(ds.partition_algo, ds.epoch_size, ds.num_canonical_nodes, world.num_nodes,
                                 world.ranks_per_node, world.workers_per_rank, self.batch_size, 0,
                                 ds.initial_physical_nodes)
            if not self.pad_ranks:
                ids = without_repeats(ids)
            self._len = self._count_batches(ids)
        return self._len

    def _count_batches(self, work: np.ndarray) -> int:
        from sparkbridge.bridge import mosaic

        p = mosaic.rank_world(self.dataset)
        if isinstance(work, GlobalOrder):
            return work.batch_count(p.rank, drop_last=self.drop_last)
        mine = work[p.node, p.rank_of_node]  # (workers, batches per worker, batch size)
        seq = np.ascontiguousarray(mine.transpose(1, 0, 2)).reshape(-1, self.batch_size) >= 0
        return int(seq.all(axis=1).sum()) if self.drop_last else int(seq.any(axis=1).sum())

    # ------------------------------------------------------------------ epoch order

    def _submit(self, epoch: int, start: int, *, prune: bool = True) -> Future:
        """The future order of a pass (submitted once). ``prune``: this is the pass being read,
        so drop the futures of earlier ones."""
        key = (epoch, start, max(1, self.num_workers))
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="sparkbridge-epoch-order")
                fut = self._executor.submit(self._compute_order, self.dataset, *key)
                self._futures[key] = fut
            if prune:
                for old in [k for k in self._futures if k[0] < epoch or (k[0] == epoch and k[1] < start)]:
                    self._futures.pop(old)
            return fut

    def _submit_ahead(self, epoch: int) -> None:
        """Start the orders of the epochs after ``epoch``: two when the order process computes
        them (an order can take as long as an epoch: 85 ms at 1M rows on 2 cores, so a second one
        absorbs the jitter), one in a thread (a second would only compete longer for the GIL)."""
        for ahead in range(1, 3 if self._orders is not None else 2):
            self._submit(epoch + ahead, 0, prune=False)

    def _start_orders(self, *, idle: bool = False) -> None:
        """Fork the order process (:mod:`bridge.orders`) once per dataset, for a resident one,
        when nothing of this loader is busy: its table is complete (no prefill or read-ahead has
        work), and no order is being computed; or, with ``idle``, at build when no prefill starts
        (many small local shards, loaded in the foreground). Else it is called at a pass's second
        batch: in the first epoch when its first batch needed every shard, else in the second.
        Not at build while a prefill runs: forked there, the first batch came 0.27 s after build
        instead of 0.17 s (1M rows, 4 shards, 2 cores; the shard loads then first copied every
        page they wrote)."""
        ds = self.dataset
        if self._orders_for is ds or not ds.resident():
            return
        res = ds.reader().resident
        with self._lock:
            busy = any(not f.done() for f in self._futures.values())
        busy = busy or self._ids_ahead.pending()
        if res is None or busy or not (idle or res.complete()):
            return
        self._orders_for = ds
        self._orders = OrderProcess.start(ds)
        if self._orders is not None:
            logger.debug("%s: epoch orders are computed in process %d from now on", ds.source, self._orders.pid)
            if ds.lazy_order:  # a global order's ids, a chunk ahead (the GlobalOrder itself costs nothing)
                self._ids_ahead.helper = self._ids_in_process

    def _ids_in_process(self, order: GlobalOrder, rank: int, g0: int, g1: int) -> Optional[tuple]:
        """A chunk of a global order's ids from the order process (None: compute it here; a dead
        process is replaced by the order-ahead thread from then on, with a warning)."""
        orders = self._orders
        if orders is None:
            return None
        try:
            return orders.compute_ids(order, rank, g0, g1)
        except OrderProcessDied as exc:
            if self._orders is orders and not self._closed:
                logger.warning("%s; computing the global order's ids in a thread from now on", exc)
                self._orders = None
                self._ids_ahead.helper = None
            return None

    def _compute_order(self, ds: Any, epoch: int, start: int, workers: int) -> np.ndarray:
        """Mosaic's order of a pass: from the order process when it serves ``ds``, else here."""
        orders = self._orders
        if orders is not None and orders.dataset is ds and not ds.lazy_order:
            try:  # the defaults are settled here too: state_dict and the workers read them
                return orders.compute(epoch, start, workers, ds.settle_order(workers))
            except OrderProcessDied as exc:
                if self._closed or ds is not self.dataset:  # closed, or a rebuild replaced ds: not needed
                    raise
                if self._orders is orders:
                    logger.warning("%s; computing epoch orders in a thread from now on", exc)
                    self._orders = None
        return ds.compute_work(epoch, start, workers)

    # ------------------------------------------------------------------ iteration

    def begin(self) -> tuple[object, int]:
        """Start a pass (the one ``iter()`` asks for): its order, shared with the workers; returns
        the pass's token and epoch."""
        if self._active and self._consumed == 0:
            # An iterator that never yielded is not a pass: tqdm.auto, for one, calls iter() once
            # in its constructor and again when the loop starts. Read the same epoch again.
            logger.debug("epoch %d: the previous iterator yielded no batch; starting it again", self._epoch)
        elif self._active:
            logger.info("epoch %d was left unfinished after %d batches; starting epoch %d",
                        self._epoch, self._consumed, self._epoch + 1)
            self._epoch, self._start = self._epoch + 1, 0
        epoch, start = self._epoch, self._start
        if self.dataset.lazy_order and self._reads_here():
            # a global order's ids are computed ahead in the order process, forked when nothing of
            # this loader is busy: at a pass's start, before the order-ahead thread is handed the
            # next epoch's first chunk (from the pass's first batch on, it mostly has work)
            self._start_orders()
        self.dataset.start_prefill()  # shards load while the order is computed (no worker forks then)
        order = self._submit(epoch, start)
        orders = self._orders
        if not order.done() and orders is not None and orders.dataset is self.dataset:
            # the order process computes it, so this thread has the GIL to itself meanwhile: 10,000
            # shards x 100 rows, first batch 0.36 -> 0.22 s after build (the order takes ~0.16 s there)
            self.dataset.fill_until(order.done)
        work = order.result()
        if not self.pad_ranks:
            work = work.without_padding() if isinstance(work, GlobalOrder) else without_repeats(work)
        with self._lock:
            self._futures.pop((epoch, start, max(1, self.num_workers)), None)
        self._board.set(epoch, start, max(1, self.num_workers), work)
        token = self.pos.begin(self._count_batches(work))
        return token, epoch

    def _workers(self, epoch: int, start: int, work: np.ndarray) -> Any:
        """The persistent DataLoader, told which pass to read through shared memory."""
        import torch
        from torch.utils.data import DataLoader

        ds, board = self.dataset, self._board
        size = work.size if isinstance(work, np.ndarray) else 1  # a GlobalOrder travels in the control block
        if self._dl is None or size > board.capacity():
            self._shutdown_workers()
            # a DataLoader keeps at most prefetch * workers batches outstanding, all possibly at
            # one worker once the others are done: that many slots plus two are never overwritten
            # before this process has copied them out
            slots = self.prefetch * self.num_workers + 2
            slot_bytes = ds.plan.slot_bytes(self.batch_size, ds.table)
            if not board.share(capacity=size, workers=self.num_workers, slots=slots, slot_bytes=slot_bytes,
                               max_slot_bytes=_MAX_SLOT_BYTES):
                logger.info("batches of %d bytes are too large for shared slots; using torch's IPC", slot_bytes)
            self._dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                  prefetch_factor=self.prefetch, persistent_workers=True)
        board.publish(epoch, start, work, ds.order_settings())
        return iter(self._dl)

    def _shutdown_workers(self) -> None:
        if self._dl is not None:
            from sparkbridge.bridge.torch_compat import shutdown_workers

            shutdown_workers(self._dl)
            self._dl = None

    def _owned(self, source: Iterator[Any], *, copy: bool = True) -> Iterator[Any]:
        """Copy each batch out of its worker's shared slot as soon as it arrives (before the
        DataLoader can hand that slot out again); pinned staging for a GPU is bridge.device's.
        ``copy=False``: a view of the slot, for a consumer that copies it before asking for the
        next batch (the transform stage hands it to its workers through its own slots)."""
        slots = self._board.slots.numpy() if self._board.slots is not None else None
        for batch in source:
            if batch.slot is not None and not copy:
                w, k = batch.slot
                batch.buf, batch.slot = slots[w, k, :batch.nbytes], None
            elif batch.slot is not None:
                w, k = batch.slot
                total = batch.nbytes
                buf = np.empty(total, dtype=np.uint8)  # pinned staging happens in bridge.device
                np.copyto(buf, slots[w, k, :total])
                batch.buf, batch.slot = buf, None
            yield batch

    def _gathered_here(self, epoch: int) -> Iterator[Any]:
        """The workers' batches, in their order, gathered in this process from the resident
        table (see :func:`bridge.iterate.round_robin_ids`)."""
        from sparkbridge.bridge import mosaic
        from sparkbridge.bridge.iterate import iter_batches, round_robin_ids

        if not self._said_gathered:
            logger.info("%s: every row fits the resident table (decoded_cache_bytes), so batches are gathered in "
                        "this process in the order the %d workers would hand them out, without starting them "
                        "(a take costs less than a worker's hand-off, and workers would not add memory)",
                        self.dataset.source, self.num_workers)
            self._said_gathered = True
        work = self._board.work_for(epoch, self._board.start, self.num_workers)
        if isinstance(work, GlobalOrder):  # its batches are the rank's, in turn, for any num_workers
            return self._global_here(epoch, work)
        p = mosaic.rank_world(self.dataset)
        ids = round_robin_ids(work[p.node, p.rank_of_node], drop_last=self.drop_last)
        return iter_batches(self.dataset, ids)

    def _reads_here(self) -> bool:
        """Whether this process reads the passes (no DataLoader workers read them)."""
        return self.num_workers == 0 or self.dataset.resident()

    def _global_here(self, epoch: int, work: GlobalOrder) -> Iterator[Any]:
        """A global order's batches read in this process, their ids computed a chunk ahead
        (:mod:`sparkbridge.bridge.order_ahead`); the next epoch's first chunk is requested as
        this pass's last chunk starts."""
        from sparkbridge.bridge import mosaic
        from sparkbridge.bridge.iterate import iter_batches

        rank = mosaic.rank_world(self.dataset).rank
        ids = self._ids_ahead.batches(work, rank, drop_last=self.drop_last,
                                      then=lambda: self._request_first_ids(epoch + 1))
        return iter_batches(self.dataset, ids)

    def _request_first_ids(self, epoch: int) -> None:
        """Start computing the first ids of ``epoch`` from its start, when a global order's
        passes are read in this process."""
        from sparkbridge.bridge import mosaic

        ds = self.dataset
        if ds is None or not ds.lazy_order or not self._reads_here() or self._closed:
            return
        order = ds.compute_work(epoch, 0, max(1, self.num_workers))
        if not self.pad_ranks:
            order = order.without_padding()
        self._ids_ahead.request_first(order, mosaic.rank_world(ds).rank, drop_last=self.drop_last)

    def packed(self, epoch: int, *, copy: bool = True) -> Iterator[Any]:
        """The packed batches of the pass :meth:`begin` started (``copy``: see :meth:`_owned`)."""
        if self.num_workers == 0:
            work = self._board.work_for(epoch, self._board.start, 1)
            if isinstance(work, GlobalOrder):
                return self._global_here(epoch, work)
            source: Any = iter(self.dataset)
        elif self.dataset.resident():
            source = self._gathered_here(epoch)
        else:
            work = self._board.work_for(epoch, self._board.start, self.num_workers)
            source = self._owned(self._workers(epoch, self._board.start, work), copy=copy)
        return source

    def ahead(self, epoch: int) -> None:
        """From the pass's second batch on: the next epochs' orders are computed after the
        workers are forked (never fork under a busy thread) and after the first batch, whose
        shard loads they would otherwise compete with for the cores."""
        self._start_orders()
        self._submit_ahead(epoch)

    def _finish_pass(self, epoch: int) -> None:
        self.pos.reset(epoch + 1)

    # ------------------------------------------------------------------ state

    def _describe(self, epoch: int, sample: int) -> LoaderState:
        from sparkbridge.bridge import mosaic

        ds = self.dataset
        return LoaderState(
            dataset=ds.identity, version=ds.version, source=str(ds.source), epoch=epoch, sample_in_epoch=sample,
            shuffle=bool(ds.shuffle), shuffle_seed=int(ds.shuffle_seed), shuffle_algo=str(ds.shuffle_algo),
            shuffle_block_size=ds.shuffle_block_size, num_canonical_nodes=ds.num_canonical_nodes,
            initial_physical_nodes=ds.initial_physical_nodes if ds.initial_physical_nodes is not None
            else mosaic.rank_world(ds).num_nodes,
            world_size=self.world_size, batch_size=self.batch_size,
        )

    def state_dict(self) -> dict[str, Any]:
        """Where to resume: every batch handed out so far counts as consumed (call it after the
        training step on the last batch). The same on every rank."""
        if not self.pad_ranks:
            raise StateError("a loader with pad_ranks=False (each row once, for evaluation) has no resumable "
                             "state: its ranks take different numbers of batches")
        epoch, sample = self._epoch, self._start
        if self._active:
            if self._consumed >= self._pass_batches:
                epoch, sample = epoch + 1, 0
            else:
                sample = self._start + self._consumed * self.batch_size * self.world_size
        if self.dataset.num_canonical_nodes is None:
            from sparkbridge.bridge import mosaic

            mosaic.apply_order_defaults(self.dataset, self.dataset.work_world(1))
        return self._describe(epoch, sample).to_dict()

    def reset(self, saved: LoaderState) -> None:
        """Resume at ``saved`` (checked against this dataset: the same data, the same order)."""
        other_version = saved.version is not None and saved.version >= 0 and saved.version != self.dataset.version
        algo = self._saved_order(saved)
        if other_version or algo is not None:
            # the run started on another version: read exactly that one again (while retained);
            # or in another order, which a loader left at the default shuffle_algo takes on
            self._rebuild(saved.version if other_version else self.dataset.version, algo)
        saved.check_compatible(self._describe(self._epoch, 0))
        ds = self.dataset
        if saved.batch_size * saved.world_size != self.batch_size * self.world_size:
            logger.warning("global batch size changed from %d to %d; resuming at the same sample",
                           saved.batch_size * saved.world_size, self.batch_size * self.world_size)
        ds.num_canonical_nodes = saved.num_canonical_nodes
        ds.shuffle_block_size = saved.shuffle_block_size
        ds.initial_physical_nodes = saved.initial_physical_nodes
        with self._lock:
            self._futures.clear()
        self._ids_ahead.clear()
        self._len = None
        self.pos.reset(saved.epoch, saved.sample_in_epoch)

    def _saved_order(self, saved: LoaderState) -> Optional[ShuffleAlgo]:
        """The order ``saved`` names, when this loader was left at the default ``shuffle_algo``
        and reads another (a run resumes in the order it was saved in: states saved before
        ``global`` became the default for ``shuffle=True`` name ``py1e``); else None. A loader
        given a ``shuffle_algo`` keeps it (and :meth:`LoaderState.check_compatible` refuses a
        state of another order)."""
        if self.options.shuffle_algo is not None or saved.shuffle != bool(self.options.shuffle):
            return None
        if saved.shuffle_algo == self.dataset.shuffle_algo:
            return None
        try:
            return ShuffleAlgo.parse(saved.shuffle_algo)
        except ValueError as exc:
            raise StateError(f"the saved state names an order this loader does not know: {exc}") from None

    def _rebuild(self, version: Optional[int], algo: Optional[ShuffleAlgo] = None) -> None:
        """Read ``version`` from now on (None or negative: the latest; a dataset without a log),
        in the order ``algo`` when given."""
        from sparkbridge.errors import VersionNotFoundError

        before = self._dataset_options["shuffle_algo"]
        if algo is not None:  # shared with the followed epoch's source: both record it from now on
            self._dataset_options["shuffle_algo"] = algo
        try:
            dataset = self._build_dataset(version if version is not None and version >= 0 else None)
        except VersionNotFoundError as exc:
            self._dataset_options["shuffle_algo"] = before
            raise StateError(f"the saved state read version {version} of {self.source.name}, which can no longer "
                             f"be read ({exc}); resuming on other data would repeat or skip samples") from None
        except BaseException:
            self._dataset_options["shuffle_algo"] = before
            raise
        if algo is not None:
            logger.info("%s: resuming in the order the saved state names (shuffle_algo=%r; this loader was left at "
                        "the default, %r)", self.source.name, algo.value, str(before))
        if version != self.dataset.version:
            logger.info("%s: resuming on version %d, the version the saved run read (the latest is %d)",
                        self.source.name, version, self.dataset.version)
        self._shutdown_workers()
        self._release(self.dataset)
        self.dataset = dataset
        self._len = None

    def _stop_orders(self) -> None:
        self._ids_ahead.helper = None
        orders, self._orders = getattr(self, "_orders", None), None
        if orders is not None:
            orders.close()

    def _release(self, dataset) -> None:
        from sparkbridge.bridge.mosaic import release_shared_memory
        from sparkbridge.bridge.spill import remove_spill_folder

        if getattr(self, "_orders_for", None) is dataset:
            self._stop_orders()
            self._orders_for = None
        self._ids_ahead.clear()
        release_shared_memory(dataset)
        dataset.release()  # up to decoded_cache_bytes of decoded shards, maps, the resident table
        local = dataset.streams[0].local
        if local in self._spill_folders:
            self._spill_folders.remove(local)
            remove_spill_folder(local)

    def close(self) -> None:
        """Stop the workers, the order thread and process, and release the dataset."""
        if self._closed:
            return
        self._closed = True
        self._shutdown_workers()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._ids_ahead.close()
        self._stop_orders()
        self._board.drop_shared()
        if self.dataset is not None:
            self._release(self.dataset)



class FollowedEpoch(_OnPosition):
    """The first epoch, read while the dataset is written (:class:`sparkbridge.bridge.follow.Follower`).
    Its position is the shared :class:`Position` (epoch 0) plus the follower's record of the
    commits it adopted (the ``follow`` field of the loader's state)."""

    def __init__(self, *, options: LoaderOptions, source: Source, pos: Position, dataset_options: dict) -> None:
        self.options = options
        self.source = source
        self.pos = pos
        self._dataset_options = dataset_options
        self.batch_size = options.batch_size
        self.drop_last = bool(options.drop_last)
        self._follow: Optional[dict] = None  # the followed epoch's settings while it is not finished
        self._follower: Any = None
        self._follow_resume: Optional[dict] = None
        # what a followed epoch waits with; kept when nothing is followed now, for a state that
        # resumes one (reset)
        self._follow_settings = options.follow_settings

    @property
    def following(self) -> bool:
        """Whether a followed epoch is under way or ahead (not finished, not left)."""
        return self._follow is not None

    def start(self) -> bool:
        """At construction with ``follow=True``: find what to follow; False when there is nothing."""
        self._follow = self._follow_target()
        return self._follow is not None

    @property
    def world_size(self) -> int:
        from sparkbridge.bridge.distributed import world_info

        return world_info()[1]

    def _follow_target(self) -> Optional[dict]:
        """What the first epoch follows (rank 0 decides), or None when there is nothing to follow."""
        from sparkbridge.bridge.distributed import broadcast_from_rank0
        from sparkbridge.bridge.follow import find_target
        from sparkbridge.errors import UsageError
        from sparkbridge.log.snapshot import LogReader

        if self.source.storage is None:
            raise UsageError(f"follow=True needs a dataset log: a local folder or s3:// root, not {self.source.name}")
        timeout, poll = self.options.follow_timeout, self.options.follow_poll
        reader = LogReader(self.source.storage)
        target = broadcast_from_rank0(lambda: find_target(reader, timeout=timeout, poll=poll))
        if target is None:
            logger.info("%s: the latest version is complete and no stream writes to it; nothing to follow",
                        self.source.name)
            return None
        logger.info("%s: following %s from version %d", self.source.name,
                    f"write {target.write_id}" if target.write_id else "a stream", target.start_version)
        return {"target": target, **self.options.follow_settings}

    def _new_follower(self):
        from sparkbridge.bridge.distributed import all_gather_objects, world_info
        from sparkbridge.bridge.follow import Follower
        from sparkbridge.log.snapshot import LogReader

        opts = self._dataset_options
        rank, world, _ = world_info()
        if world > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                from sparkbridge.errors import UsageError

                raise UsageError("follow=True under torchrun needs torch.distributed initialized before iterating "
                                 "(the ranks agree on which commits each step reads)")
        resume = self._follow_resume or {}
        root_local = opts["local"] if opts["local"] is not None else self._follow_cache()
        return Follower(
            reader=LogReader(self.source.storage), target=self._follow["target"], root_local=root_local,
            batch_size=self.batch_size, shuffle=opts["shuffle"], seed=opts["shuffle_seed"], rank=rank, world=world,
            drop_last=self.drop_last, columns=opts["columns"], features=opts["features"], label=opts["label"],
            validate_hash=opts["validate_hash"], decoded_cache_bytes=opts["decoded_cache_bytes"] or (1 << 30),
            poll=self._follow["poll"], timeout=self._follow["timeout"], idle_timeout=self._follow["idle_timeout"],
            history=resume.get("history", ()), skip_batches=int(resume.get("batches", 0)),
            exchange=all_gather_objects if world > 1 else None,
            shuffle_rows=resume.get("shuffle_rows", 0) if self._follow_settings["shuffle_rows"] is None
            else self._follow_settings["shuffle_rows"],
        )

    def _follow_cache(self) -> str:
        """Where a remote followed dataset's shards land when no ``local`` was given: under this
        user's private spill root (checked: not a symlink, not another user's, not writable by
        others), never a predictable folder shared by every user of the machine."""
        import hashlib

        from sparkbridge.bridge.spill import private_spill_root

        name = hashlib.sha256(self.source.name.encode()).hexdigest()[:16]
        path = os.path.join(private_spill_root(), "follow", name)
        logger.info("follow cache for %s defaults to %s", self.source.name, path)
        mark_cache(path, self.source.name)
        return path

    def begin(self) -> tuple[Any, object]:
        """Start (or resume) the followed pass: its follower and the pass's token."""
        if self._active and self._follower is not None and self._consumed > 0 and not self._follow_resume:
            raise RuntimeError("the followed epoch was left unfinished; it cannot be restarted in this loader "
                               "(save state_dict() and resume a new loader with it)")
        follower = self._new_follower()
        if self._follower is not None:  # an earlier, abandoned followed pass: its spilled shards
            self._follower.close()
        self._follower = follower
        return follower, self.pos.begin(consumed=follower.skip_batches)

    def end(self) -> None:
        """The followed epoch is over: later epochs read the version it ended at."""
        if self._follower is not None:
            self._follower.close()
        self._follow, self._follower, self._follow_resume = None, None, None

    def state_dict(self) -> dict[str, Any]:
        """Where to resume inside the followed epoch."""
        target = self._follow["target"]
        rows = self._follow_settings["shuffle_rows"]
        if self._follower is not None:
            follow = self._follower.state(self._consumed)
        elif self._follow_resume is not None:  # resumed, not iterated yet: the progress it resumes from
            follow = {**self._follow_resume, **({"shuffle_rows": rows} if rows is not None else {})}
        else:
            follow = {"start_version": target.start_version, "write_id": target.write_id, "stream": target.stream,
                      "history": [], "batches": 0, "shuffle_rows": rows or 0}
        opts = self._dataset_options
        return LoaderState(
            dataset=f"follow:{target.write_id or 'stream'}@v{target.start_version}", version=target.start_version,
            source=self.source.name, epoch=0, sample_in_epoch=0, shuffle=bool(opts["shuffle"]),
            shuffle_seed=int(opts["shuffle_seed"]), shuffle_algo=str(opts["shuffle_algo"]),
            shuffle_block_size=opts["shuffle_block_size"], num_canonical_nodes=opts["num_canonical_nodes"],
            initial_physical_nodes=None, world_size=self.world_size, batch_size=self.batch_size, follow=follow,
        ).to_dict()

    def reset(self, saved: LoaderState) -> None:
        """Resume inside a followed epoch: the same write, from the same start, skipping the
        batches consumed (their draws are replayed from the recorded adoptions)."""
        from sparkbridge.bridge.follow import FollowTarget

        f = saved.follow
        if self._follow is None:
            self._follow = dict(self._follow_settings)
            logger.info("resuming a followed epoch of %s (follow_timeout=%s s, follow_idle_timeout=%s s)",
                        self.source.name, self._follow["timeout"], self._follow["idle_timeout"])
        for name in ("shuffle", "shuffle_seed"):
            mine = self._dataset_options[name]
            if getattr(saved, name) != mine:
                raise StateError(f"the state was saved with {name}={getattr(saved, name)!r} but this loader has "
                                 f"{name}={mine!r}: the followed epoch's remaining rows would differ")
        if saved.batch_size != self.batch_size or saved.world_size != self.world_size:
            raise StateError("a followed epoch resumes only with the same batch size and world size "
                             f"(saved {saved.batch_size} x {saved.world_size}, now {self.batch_size} x {self.world_size})")
        if self.options.shuffle_algo is None and saved.shuffle_algo != str(self._dataset_options["shuffle_algo"]):
            # left at the default: the later epochs read the order the state names (the options
            # are shared with SnapshotEpochs, which builds their dataset)
            try:
                self._dataset_options["shuffle_algo"] = ShuffleAlgo.parse(saved.shuffle_algo)
            except ValueError as exc:
                raise StateError(f"the saved state names an order this loader does not know: {exc}") from None
        self._follow["target"] = FollowTarget(int(f["start_version"]), f.get("write_id"), bool(f.get("stream")))
        if self._follower is not None:
            self._follower.close()
            self._follower = None
        self._follow_resume = dict(f)
        self.pos.reset(0)

    def leave(self) -> None:
        """A saved state taken after the followed epoch: follow no more."""
        logger.info("%s: the saved state was taken after its followed epoch; resuming on a finished version, "
                    "without following", self.source.name)
        self.end()

    def close(self) -> None:
        if self._follower is not None:
            self._follower.close()
        self._follower = None
