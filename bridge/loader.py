"""``StreamingLoader``: batches of tensors from an MDS dataset, resumable and distributed.

Usage::

    loader = StreamingLoader("s3://bucket/flights", local="/tmp/cache", batch_size=1024, shuffle=True,
                             features=["dep_delay", "distance"], label="arr_delay", device="cuda")
    for epoch in range(loader.epoch, 10):
        for x, y in loader:
            ...
            ckpt["loader"] = loader.state_dict()   # counts batches handed to you, not prefetched

Sample order and partitioning are Mosaic's (see :mod:`bridge.dataset`); with ``num_workers=0``
batches are gathered in this process (no DataLoader, ~60 µs a batch cheaper), otherwise a torch
``DataLoader(batch_size=None)`` runs the workers and Mosaic interleaves their batches so that the
order is the same for any ``num_workers``. The next epoch's sample order is computed in a
background thread while this one is read.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from sparkbridge.bridge.device import outputs_to_device, resolve_device, to_batches
from sparkbridge.bridge.order import GlobalOrder, ShuffleAlgo
from sparkbridge.bridge.orders import OrderProcess, OrderProcessDied
from sparkbridge.bridge.passes import PassBoard
from sparkbridge.bridge.source import Source, claim_cache, mark_cache, open_version, resolve_source
from sparkbridge.bridge.state import LoaderState, StateError
from sparkbridge.bridge.transform import TransformStage, apply_inline, transform_inputs

__all__ = ["StreamingLoader", "StateError"]

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


class StreamingLoader:
    """An iterable of batches: ``dict`` column -> tensor (str/bytes/json columns as lists, variable
    ndarrays as lists of tensors), or ``(features float32 [B, F], label)`` with ``features=`` and
    ``label=``. ``len(loader)`` is the number of batches one epoch gives this rank.

    * Order: Mosaic's, for every Mosaic ``shuffle_algo`` and ``seed`` (its exact sample order); or
      ``shuffle_algo=ShuffleAlgo.GLOBAL`` ("global"): a uniform global shuffle computed per batch,
      O(1) order memory whatever the dataset size (:mod:`sparkbridge.bridge.order`). A new shuffle
      each epoch. Calling
      ``iter()`` again before a pass is finished starts the next epoch (as Mosaic does).
    * Distributed (torchrun): each rank reads a disjoint share; when the sample count does not
      divide by the world size Mosaic repeats up to ``world_size - 1`` samples so that every rank
      gets as many samples, and batches, as the others (a DDP step never waits for a rank that has
      run out). ``drop_last=True`` drops each rank's final partial batch; otherwise it is smaller.
      ``pad_ranks=False`` drops those repeats instead (every row once over all ranks, for
      evaluation: a rank may then take one batch fewer, so no per-batch collective, and no
      ``state_dict``).
    * Transform: ``transform=fn`` receives each batch as above and its result is what the loop
      gets (tensors in it go to ``device``). It runs in ``transform_workers`` forked processes
      (default ``num_workers``; 0 runs it in this process), results in the loader's order, so order,
      resume, DDP shares and follow mode are as without it. A failure raises
      :class:`~sparkbridge.errors.TransformError` naming the epoch and batch (see
      :mod:`sparkbridge.bridge.transform`).
    * Types: bool columns (manifest.json) and ``<col>__null`` masks come as ``torch.bool``; dates
      as int32 days and timestamps as int64 microseconds since the epoch; ``str_int``/``str_float``
      as int64/float64 tensors, ``str_decimal`` as a list of ``Decimal``.
    * Integrity: shards are checked against index.json hashes (``validate_hash=None`` picks xxh64
      when present, a name forces one, False skips) and their layout; a bad shard raises
      :class:`~bridge.decode.CorruptShardError` naming it. Without hashes only layout damage shows.
    * Memory: anonymous memory for decoded shards stays within ``decoded_cache_bytes`` (default
      1 GiB) whatever the shuffle. A dataset of fixed-width columns that fits is held as one row
      table, filled while the first epoch's order is computed and read in this process whatever
      ``num_workers`` (in the order the workers would hand batches out: a batch is then one
      ``take``, cheaper than a worker's hand-off, and no worker adds memory); otherwise shards are
      decoded in memory while the
      pass's working set fits, and read from decompressed files on local disk, memory-mapped
      (page cache, shared by workers), when it does not: the ``local`` cache of a remote dataset,
      or for a local dataset without ``local=`` a folder under ``$SPARKBRIDGE_CACHE_DIR`` (default
      the temp dir; logged, removed by :meth:`close`), never the dataset root. ``cache_limit``
      bounds that folder (Mosaic evicts the least recently used shards).
    """

    def __init__(
        self,
        remote_or_local: Union[str, os.PathLike],
        *,
        local: Optional[Union[str, os.PathLike]] = None,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 9176,
        columns: Optional[Sequence[str]] = None,
        features: Optional[Sequence[str]] = None,
        label: Optional[str] = None,
        device: Any = None,
        drop_last: bool = False,
        pad_ranks: bool = True,
        num_workers: int = 0,
        shuffle_algo: Union[ShuffleAlgo, str] = ShuffleAlgo.PY1E,
        shuffle_block_size: Optional[int] = None,
        num_canonical_nodes: Optional[int] = None,
        partition_algo: str = "relaxed",
        cache_limit: Optional[Union[int, str]] = None,
        predownload: Optional[int] = None,
        validate_hash: Union[str, bool, None] = None,
        pin_memory: Optional[bool] = None,
        prefetch: int = 2,
        decoded_cache_bytes: Optional[int] = None,
        download_retry: int = 2,
        download_timeout: float = 60.0,
        clean_stale_shm: bool = True,
        version: Optional[int] = None,
        follow: bool = False,
        follow_timeout: float = 600.0,
        follow_idle_timeout: Optional[float] = 60.0,
        follow_poll: float = 0.2,
        follow_shuffle_rows: Optional[int] = None,
        transform: Optional[Callable[[Any], Any]] = None,
        transform_workers: Optional[int] = None,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(download_retry, int) or download_retry < 1:
            raise ValueError(f"download_retry is the number of download attempts (>= 1), got {download_retry!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        shuffle_algo = ShuffleAlgo.parse(shuffle_algo)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if isinstance(validate_hash, str) and not validate_hash:
            raise ValueError("validate_hash must be a hash name such as 'xxh64', True/None (auto) or False")
        if validate_hash is True:
            validate_hash = None
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be a callable taking a batch, got {type(transform).__name__}")
        if transform_workers is None:
            transform_workers = num_workers if transform is not None else 0
        if not isinstance(transform_workers, int) or isinstance(transform_workers, bool) or transform_workers < 0:
            raise ValueError(f"transform_workers must be an int >= 0, got {transform_workers!r}")
        follow_rows = None  # unset: a resumed followed epoch keeps the pool it was saved with
        if follow_shuffle_rows is not None:
            from sparkbridge.bridge.follow import check_shuffle_rows

            follow_rows = check_shuffle_rows(follow_shuffle_rows, shuffle=shuffle)
        self._transform = transform
        self._transform_stage: Optional[TransformStage] = None
        self._closed = True  # until construction completes (close() then stops only the transform stage)
        if transform is not None and transform_workers > 0:
            # forked first, before this loader starts any thread (the early fill, the order
            # process): the workers only ever run the transform, on batches handed to them
            self._transform_stage = TransformStage(transform, workers=transform_workers)
            self._transform_stage.start()
        self.source = resolve_source(remote_or_local, local, must_exist=not follow)
        if self.source.remote is not None and self.source.local is not None:
            mark_cache(self.source.local, self.source.remote)  # claimed for one version in _build_dataset
        # stale Mosaic segments are removed before the first dataset allocates its own (_build_dataset)
        self._clean_stale_shm = bool(clean_stale_shm)
        device = resolve_device(device)  # before Mosaic allocates shared memory: fail cheaply

        if decoded_cache_bytes is None:
            logger.debug("decoded shard cache defaults to 1 GiB per process")
        # everything the dataset is built from but the version: load_state_dict may rebuild it on
        # the version a saved run read
        self._dataset_options = dict(
            remote=self.source.remote, local=self.source.local, batch_size=batch_size, shuffle=shuffle,
            shuffle_seed=seed, shuffle_algo=shuffle_algo, shuffle_block_size=shuffle_block_size,
            num_canonical_nodes=num_canonical_nodes, partition_algo=partition_algo, cache_limit=cache_limit,
            predownload=predownload, download_retry=download_retry, download_timeout=download_timeout,
            validate_hash=validate_hash, drop_last=drop_last, decoded_cache_bytes=decoded_cache_bytes,
            columns=columns, features=features, label=label,
        )
        self._board = PassBoard()
        self._spill_folders: list[str] = []
        self._follow: Optional[dict] = None  # the followed epoch's settings while it is not finished
        self._follower: Any = None
        self._follow_resume: Optional[dict] = None
        self._padding = 0  # see the padding property
        # what a followed epoch waits with; kept when nothing is followed now, for a state that
        # resumes one (load_state_dict)
        self._follow_settings = {"timeout": follow_timeout, "idle_timeout": follow_idle_timeout, "poll": follow_poll,
                                 "shuffle_rows": follow_rows}
        if follow:
            self._follow = self._follow_target(version=version, timeout=follow_timeout,
                                               idle_timeout=follow_idle_timeout, poll=follow_poll)
        # None while the first epoch follows a write that is still running (built when it completes)
        self.dataset = None if self._follow is not None else self._build_dataset(version, early=True)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = bool(drop_last)
        self.pad_ranks = bool(pad_ranks)
        self.prefetch = prefetch
        self.device = device
        is_cuda = self.device is not None and self.device.type == "cuda"
        if pin_memory is None:
            pin_memory = is_cuda
            if is_cuda:
                logger.info("pin_memory defaults to True for device %s", self.device)
        self.pin_memory = bool(pin_memory) and is_cuda
        self._epoch = 0
        self._start = 0
        self._consumed = 0
        self._pass_batches = 0
        self._active = False
        self._token: Optional[object] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._futures: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._len: Optional[int] = None
        self._dl: Any = None  # persistent DataLoader (num_workers > 0): workers keep decoded shards
        self._dl_capacity = 0
        self._said_gathered = False
        self._closed = False
        self._orders: Optional[OrderProcess] = None  # see _start_orders
        self._orders_for: Any = None  # the dataset an order process was started (or tried) for
        if self.dataset is not None and self.dataset.resident():
            # The first epoch's order and shards start loading now, in the background: a training
            # script builds its model meanwhile, and iter() finds them ready. (A resident dataset
            # never forks workers, so these threads never run under a fork.)
            if not self.dataset.start_prefill():
                self._start_orders(idle=True)  # no thread loads shards (many small local ones): fork now
            self._submit(0, 0)

    def _follow_target(self, *, version, timeout: float, idle_timeout: Optional[float], poll: float) -> Optional[dict]:
        """What the first epoch follows (rank 0 decides), or None when there is nothing to follow."""
        from sparkbridge.bridge.distributed import broadcast_from_rank0
        from sparkbridge.bridge.follow import find_target
        from sparkbridge.errors import UsageError
        from sparkbridge.log.snapshot import LogReader

        if version is not None:
            raise UsageError("follow=True reads commits as they land; it cannot be combined with version=")
        if self.source.storage is None:
            raise UsageError(f"follow=True needs a dataset log: a local folder or s3:// root, not {self.source.name}")
        for name, value in (("follow_timeout", timeout), ("follow_poll", poll)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise UsageError(f"{name} must be a positive number of seconds, got {value!r}")
        reader = LogReader(self.source.storage)
        target = broadcast_from_rank0(lambda: find_target(reader, timeout=timeout, poll=poll))
        if target is None:
            logger.info("%s: the latest version is complete and no stream writes to it; nothing to follow",
                        self.source.name)
            return None
        logger.info("%s: following %s from version %d", self.source.name,
                    f"write {target.write_id}" if target.write_id else "a stream", target.start_version)
        return {"target": target, "timeout": timeout, "idle_timeout": idle_timeout, "poll": poll}

    def _following(self) -> bool:
        return self._follow is not None and self._epoch == 0

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

    def _follow_pass(self) -> Iterator[Any]:
        """The followed first epoch; when it ends, the finished version is opened for the next."""
        follower = self._new_follower()
        if self._follower is not None:  # an earlier, abandoned followed pass: its spilled shards
            self._follower.close()
        self._follower = follower
        self._consumed = follower.skip_batches
        self._active = True
        token = object()
        self._token = token

        class _Plan:  # the follower learns its columns from the first shard that lands
            def to_tensors(self, batch, buf_tensor=None, **kw):
                return follower.plan.to_tensors(batch, buf_tensor, **kw)

        k = follower.skip_batches
        for out in self._outputs(iter(follower), _Plan(), epoch=0):
            if self._token is token:
                self._consumed += 1
                self._padding = follower.padding.get(k, 0)
            k += 1
            yield out
        if self._token is not token or not follower.finished:
            return
        logger.info("%s: the followed epoch ended at version %d (%d batches); later epochs read that version",
                    self.source.name, follower.version, self._consumed)
        follower.close()
        self.dataset = self._build_dataset(follower.version)
        self._follow, self._follower, self._follow_resume = None, None, None
        self._finish_pass(0)

    def _build_dataset(self, version: Optional[int], *, early: bool = False):
        """The dataset of ``version`` (None: the latest). ``early`` (at construction only): a local
        dataset's resident table starts filling before Mosaic is imported (:mod:`bridge.early`).
        Not on a rebuild, where the dataset it replaces still holds its table until then."""
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
    def version(self) -> int:
        """The dataset version this loader reads (-1 for a dataset without a log); while the first
        epoch follows a running write, the newest version it has taken in."""
        if self.dataset is None:
            return self._follower.version if self._follower is not None else self._follow["target"].start_version
        return self.dataset.version

    @property
    def plan(self):
        if self.dataset is None:
            if self._follower is None or self._follower.plan is None:
                raise RuntimeError("the columns of a followed dataset are known once its first shard lands "
                                   "(after the first batch)")
            return self._follower.plan
        return self.dataset.plan

    @property
    def columns(self) -> list[str]:
        return list(self.plan.columns)

    @property
    def world_size(self) -> int:
        if self.dataset is None:
            from sparkbridge.bridge.distributed import world_info

            return world_info()[1]
        from sparkbridge.bridge import mosaic

        return int(mosaic.rank_world(self.dataset).num_ranks)

    @property
    def padding(self) -> int:
        """How many of the last rows of the batch last handed out repeat rows already handed out.

        In a followed epoch (``follow=True``) a rank whose share is smaller than another's pads
        its last batch with repeats of its own rows (or any rows, when it owns none), so every
        rank takes the same number of steps; those repeats are always the batch's last
        ``padding`` rows. Mask them out of a loss or a metric with
        ``keep = torch.arange(n) < n - loader.padding`` (``n`` the batch's row count). 0 for every
        other batch, and in later epochs, whose order is Mosaic's (it repeats up to
        ``world_size - 1`` samples over an epoch and does not flag them)."""
        return self._padding

    @property
    def epoch(self) -> int:
        """The epoch being read, or the one the next ``iter()`` reads."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` read ``epoch`` from its start."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch, self._start, self._consumed, self._active = epoch, 0, 0, False
        self._token = None

    def __len__(self) -> int:
        if self._following():
            raise TypeError("the length of a followed epoch is unknown until its write completes "
                            "(iterate it; len() works from the second epoch on)")
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
        if self._orders_for is ds or not ds.resident() or ds.lazy_order:  # a GlobalOrder costs nothing to compute
            return
        res = ds.reader().resident
        with self._lock:
            busy = any(not f.done() for f in self._futures.values())
        if res is None or busy or not (idle or res.complete()):
            return
        self._orders_for = ds
        self._orders = OrderProcess.start(ds)
        if self._orders is not None:
            logger.debug("%s: epoch orders are computed in process %d from now on", ds.source, self._orders.pid)

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

    def __iter__(self) -> Iterator[Any]:
        if self._closed:
            raise RuntimeError("this StreamingLoader was closed; build a new one (load_state_dict resumes it)")
        if self._following():
            if self._active and self._follower is not None and self._consumed > 0 and not self._follow_resume:
                raise RuntimeError("the followed epoch was left unfinished; it cannot be restarted in this loader "
                                   "(save state_dict() and resume a new loader with it)")
            return self._follow_pass()
        if self._active and self._consumed == 0:
            # An iterator that never yielded is not a pass: tqdm.auto, for one, calls iter() once
            # in its constructor and again when the loop starts. Read the same epoch again.
            logger.debug("epoch %d: the previous iterator yielded no batch; starting it again", self._epoch)
        elif self._active:
            logger.info("epoch %d was left unfinished after %d batches; starting epoch %d",
                        self._epoch, self._consumed, self._epoch + 1)
            self._epoch, self._start = self._epoch + 1, 0
        epoch, start = self._epoch, self._start
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
        token = object()
        self._token = token
        self._pass_batches = self._count_batches(work)
        self._consumed = 0
        self._active = True
        return self._run(token, epoch)

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
        p = mosaic.rank_world(self.dataset)
        if isinstance(work, GlobalOrder):  # its batches are the rank's, in turn, for any num_workers
            return iter_batches(self.dataset, work.batches(p.rank, drop_last=self.drop_last))
        ids = round_robin_ids(work[p.node, p.rank_of_node], drop_last=self.drop_last)
        return iter_batches(self.dataset, ids)

    def _run(self, token: object, epoch: int) -> Iterator[Any]:
        self._padding = 0
        if self.num_workers == 0:
            source: Any = iter(self.dataset)
        elif self.dataset.resident():
            source = self._gathered_here(epoch)
        else:
            work = self._board.work_for(epoch, self._board.start, self.num_workers)
            source = self._owned(self._workers(epoch, self._board.start, work),
                                 copy=self._transform_stage is None)
        ahead = False
        for k, out in enumerate(self._outputs(source, self.dataset.plan, epoch=epoch)):
            if k == 1:
                # The next epochs' orders are computed from the second batch on: after the
                # workers are forked (never fork under a busy thread) and after the first batch,
                # whose shard loads they would otherwise compete with for the cores.
                self._start_orders()
                self._submit_ahead(epoch)
                ahead = True
            if self._token is token:
                self._consumed += 1
            yield out
        if self._token is token:
            if not ahead:  # a pass of one batch
                self._submit_ahead(epoch)
            self._finish_pass(epoch)

    def _outputs(self, packed: Iterator[Any], plan: Any, *, epoch: int) -> Iterator[Any]:
        """Packed batches -> tensors -> the transform (when given) -> the device. A pass counts a
        batch as consumed when it leaves here, so batches in the transform stage are not."""
        if self._transform is None:
            return to_batches(packed, plan, device=self.device, pin_memory=self.pin_memory, prefetch=self.prefetch)
        batches = transform_inputs(packed, plan)
        if self._transform_stage is None:
            out = apply_inline(self._transform, batches, epoch=epoch)
        else:
            out = self._transform_stage.map(batches, epoch=epoch)
        return outputs_to_device(out, self.device, pin_memory=self.pin_memory)

    def _finish_pass(self, epoch: int) -> None:
        self._epoch, self._start, self._consumed, self._active = epoch + 1, 0, 0, False
        self._token = None

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
        if self._following():
            return self._follow_state()
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

    def _follow_state(self) -> dict[str, Any]:
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

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly after the last consumed batch of the saved run (any ``num_workers``)."""
        saved = LoaderState.from_dict(state)
        if saved.follow is not None:
            self._load_follow_state(saved)
            return
        if self.dataset is None:
            # this loader was about to follow a write (or a stream), but the saved run had already
            # finished its followed epoch: resume on the version that epoch ended at, follow no more
            self._leave_follow(saved.version)
        if saved.version is not None and saved.version >= 0 and saved.version != self.dataset.version:
            # the run started on another version: read exactly that one again (while retained)
            self._rebuild(saved.version)
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
        self._len = None
        self._epoch, self._start, self._consumed, self._active = saved.epoch, saved.sample_in_epoch, 0, False
        self._token = None

    def _leave_follow(self, version: Optional[int]) -> None:
        logger.info("%s: the saved state was taken after its followed epoch; resuming on version %s, "
                    "without following", self.source.name, version)
        if self._follower is not None:
            self._follower.close()
        self._follow, self._follower, self._follow_resume = None, None, None
        from sparkbridge.errors import VersionNotFoundError

        try:
            self.dataset = self._build_dataset(version if version is not None and version >= 0 else None)
        except VersionNotFoundError as exc:
            raise StateError(f"the saved state read version {version} of {self.source.name}, which can no longer "
                             f"be read ({exc}); resuming on other data would repeat or skip samples") from None
        self._len = None

    def _load_follow_state(self, saved: LoaderState) -> None:
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
        self._follow["target"] = FollowTarget(int(f["start_version"]), f.get("write_id"), bool(f.get("stream")))
        if self._follower is not None:
            self._follower.close()
            self._follower = None
        if self.dataset is not None:
            self._shutdown_workers()
            self._release(self.dataset)
            self.dataset = None
        self._follow_resume = dict(f)
        self._epoch, self._start, self._consumed, self._active, self._token = 0, 0, 0, False, None

    def _rebuild(self, version: int) -> None:
        from sparkbridge.errors import VersionNotFoundError

        try:
            dataset = self._build_dataset(version)
        except VersionNotFoundError as exc:
            raise StateError(f"the saved state read version {version} of {self.source.name}, which can no longer "
                             f"be read ({exc}); resuming on other data would repeat or skip samples") from None
        logger.info("%s: resuming on version %d, the version the saved run read (the latest is %d)",
                    self.source.name, version, self.dataset.version)
        self._shutdown_workers()
        self._release(self.dataset)
        self.dataset = dataset
        self._len = None

    def _stop_orders(self) -> None:
        orders, self._orders = getattr(self, "_orders", None), None
        if orders is not None:
            orders.close()

    def _release(self, dataset) -> None:
        from sparkbridge.bridge.mosaic import release_shared_memory
        from sparkbridge.bridge.spill import remove_spill_folder

        if getattr(self, "_orders_for", None) is dataset:
            self._stop_orders()
            self._orders_for = None
        release_shared_memory(dataset)
        dataset.release()  # up to decoded_cache_bytes of decoded shards, maps, the resident table
        local = dataset.streams[0].local
        if local in self._spill_folders:
            self._spill_folders.remove(local)
            remove_spill_folder(local)

    def close(self) -> None:
        """Stop the worker processes and the background epoch-order thread and release Mosaic's
        shared memory. The loader cannot be iterated afterwards (``state_dict`` still works)."""
        stage = getattr(self, "_transform_stage", None)
        if stage is not None:
            stage.close()
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._shutdown_workers()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._stop_orders()
        self._board.drop_shared()
        if self._follower is not None:
            self._follower.close()
        self._follower = None
        if self.dataset is not None:
            self._release(self.dataset)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"StreamingLoader({self.source.name!r}, batch_size={self.batch_size}, "
                f"columns={self.columns}, num_workers={self.num_workers}, epoch={self._epoch})")
