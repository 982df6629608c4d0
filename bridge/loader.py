"""``StreamingLoader``: batches of tensors from an MDS dataset, resumable and distributed.

Usage::

    loader = StreamingLoader("s3://bucket/flights", local="/tmp/cache", batch_size=1024, shuffle=True,
                             features=["dep_delay", "distance"], label="arr_delay", device="cuda")
    for epoch in range(loader.epoch, 10):
        for x, y in loader:
            ...
            ckpt["loader"] = loader.state_dict()   # counts batches handed to you, not prefetched

The loader is the public face of a chain of stages (see :mod:`sparkbridge.bridge.epochs`): an
epoch source (:class:`~sparkbridge.bridge.epochs.SnapshotEpochs` over a pinned version in Mosaic's
order, or :class:`~sparkbridge.bridge.epochs.FollowedEpoch` while the dataset is written), reading
shards through :mod:`sparkbridge.bridge.shard_source`; then batch assembly (packed bytes to tensors,
:func:`sparkbridge.bridge.device.to_batches`), the optional transform stage
(:mod:`sparkbridge.bridge.transform`) and the device stage (:mod:`sparkbridge.bridge.device`). Its
settings are one :class:`~sparkbridge.bridge.options.LoaderOptions`; its state is the epoch source's.
With ``num_workers=0`` batches are gathered in this process (no DataLoader, ~60 µs a batch cheaper),
otherwise a torch ``DataLoader(batch_size=None)`` runs the workers and Mosaic interleaves their
batches so that the order is the same for any ``num_workers``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from sparkbridge.bridge.device import outputs_to_device, resolve_device, to_batches
from sparkbridge.bridge.epochs import FollowedEpoch, Position, SnapshotEpochs, without_repeats
from sparkbridge.bridge.options import LoaderOptions
from sparkbridge.bridge.order import ShuffleAlgo
from sparkbridge.bridge.passes import PassBoard
from sparkbridge.bridge.source import mark_cache, resolve_source
from sparkbridge.bridge.state import LoaderState, StateError
from sparkbridge.bridge.transform import TransformStage, apply_inline, transform_inputs

__all__ = ["StreamingLoader", "LoaderOptions", "StateError", "without_repeats"]

logger = logging.getLogger(__name__)


class StreamingLoader:
    """An iterable of batches: ``dict`` column -> tensor (str/bytes/json columns as lists, variable
    ndarrays as lists of tensors), or ``(features float32 [B, F], label)`` with ``features=`` and
    ``label=``. ``len(loader)`` is the number of batches one epoch gives this rank.

    * Order: with ``shuffle=True``, by default ``ShuffleAlgo.GLOBAL`` ("global"): a uniform global
      shuffle computed per batch, O(1) order memory whatever the dataset size
      (:mod:`sparkbridge.bridge.order`); or Mosaic's, for every Mosaic ``shuffle_algo`` and ``seed``
      (its exact sample order: pass ``shuffle_algo="py1e"`` for Mosaic's default). Without
      ``shuffle``, Mosaic's partition (shards in order). A new shuffle each epoch. A loader left at
      the default ``shuffle_algo`` resumes a saved state in the order it names (states saved before
      ``global`` became the default name ``py1e``). Calling
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
        shuffle_algo: Optional[Union[ShuffleAlgo, str]] = None,
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
        options = LoaderOptions(
            remote_or_local=remote_or_local, local=local, batch_size=batch_size, shuffle=shuffle, seed=seed,
            columns=columns, features=features, label=label, device=device, drop_last=drop_last,
            pad_ranks=pad_ranks, num_workers=num_workers, shuffle_algo=shuffle_algo,
            shuffle_block_size=shuffle_block_size, num_canonical_nodes=num_canonical_nodes,
            partition_algo=partition_algo, cache_limit=cache_limit, predownload=predownload,
            validate_hash=validate_hash, pin_memory=pin_memory, prefetch=prefetch,
            decoded_cache_bytes=decoded_cache_bytes, download_retry=download_retry,
            download_timeout=download_timeout, clean_stale_shm=clean_stale_shm, version=version, follow=follow,
            follow_timeout=follow_timeout, follow_idle_timeout=follow_idle_timeout, follow_poll=follow_poll,
            follow_shuffle_rows=follow_shuffle_rows,
            transform=transform, transform_workers=transform_workers,
        )
        self._init(options)

    @classmethod
    def from_options(cls, options: LoaderOptions) -> "StreamingLoader":
        """A loader built from a :class:`~sparkbridge.bridge.options.LoaderOptions`."""
        loader = cls.__new__(cls)
        loader._init(options)
        return loader

    def _init(self, options: LoaderOptions) -> None:
        self.options = options
        transform, transform_workers = options.transform, options.transform_workers
        self._transform = transform
        self._transform_stage: Optional[TransformStage] = None
        self._closed = True  # until construction completes (close() then stops only the transform stage)
        if transform is not None and transform_workers > 0:
            # forked first, before this loader starts any thread (the early fill, the order
            # process): the workers only ever run the transform, on batches handed to them
            self._transform_stage = TransformStage(transform, workers=transform_workers)
            self._transform_stage.start()
        self.source = resolve_source(options.remote_or_local, options.local, must_exist=not options.follow)
        if self.source.remote is not None and self.source.local is not None:
            mark_cache(self.source.local, self.source.remote)  # claimed for one version in _build_dataset
        device = resolve_device(options.device)  # before Mosaic allocates shared memory: fail cheaply
        if options.decoded_cache_bytes is None:
            logger.debug("decoded shard cache defaults to 1 GiB per process")
        # everything the dataset is built from but the version: load_state_dict may rebuild it on
        # the version a saved run read
        dataset_options = options.dataset_options(remote=self.source.remote, local=self.source.local)
        self._pos = Position()
        self._padding = 0  # see the padding property
        self._snapshot = SnapshotEpochs(options=options, source=self.source, board=PassBoard(), pos=self._pos,
                                        dataset_options=dataset_options)
        self._followed = FollowedEpoch(options=options, source=self.source, pos=self._pos,
                                       dataset_options=dataset_options)
        # no dataset while the first epoch follows a write that is still running (built when it completes)
        if not (options.follow and self._followed.start()):
            self._snapshot.open_first(options.version)
        self.batch_size = options.batch_size
        self.num_workers = options.num_workers
        self.drop_last = bool(options.drop_last)
        self.pad_ranks = bool(options.pad_ranks)
        self.prefetch = options.prefetch
        self.device = device
        is_cuda = self.device is not None and self.device.type == "cuda"
        pin_memory = options.pin_memory
        if pin_memory is None:
            pin_memory = is_cuda
            if is_cuda:
                logger.info("pin_memory defaults to True for device %s", self.device)
        self.pin_memory = bool(pin_memory) and is_cuda
        self._closed = False

    # ------------------------------------------------------------------ the stages' insides, by their old names

    @property
    def dataset(self) -> Any:
        """The :class:`~sparkbridge.bridge.dataset.BatchDataset` read (None while following)."""
        return self._snapshot.dataset

    @property
    def _orders(self) -> Any:
        return self._snapshot._orders

    @property
    def _lock(self) -> Any:
        return self._snapshot._lock

    @property
    def _futures(self) -> dict:
        return self._snapshot._futures

    @property
    def _dl(self) -> Any:
        return self._snapshot._dl

    @property
    def _board(self) -> PassBoard:
        return self._snapshot._board

    @property
    def _follower(self) -> Any:
        return self._followed._follower

    @property
    def _epoch(self) -> int:
        return self._pos.epoch

    def _compute_order(self, ds: Any, epoch: int, start: int, workers: int) -> Any:
        return self._snapshot._compute_order(ds, epoch, start, workers)

    def _submit(self, epoch: int, start: int, *, prune: bool = True) -> Any:
        return self._snapshot._submit(epoch, start, prune=prune)

    def _start_orders(self, *, idle: bool = False) -> None:
        self._snapshot._start_orders(idle=idle)

    def _build_dataset(self, version: Optional[int], *, early: bool = False) -> Any:
        return self._snapshot._build_dataset(version, early=early)

    def _release(self, dataset: Any) -> None:
        self._snapshot._release(dataset)

    def _follow_cache(self) -> str:
        return self._followed._follow_cache()

    def _following(self) -> bool:
        return self._followed.following and self._pos.epoch == 0

    # ------------------------------------------------------------------ facts

    @property
    def version(self) -> int:
        """The dataset version this loader reads (-1 for a dataset without a log); while the first
        epoch follows a running write, the newest version it has taken in."""
        if self.dataset is None:
            f = self._followed
            return f._follower.version if f._follower is not None else f._follow["target"].start_version
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
        return self._snapshot.world_size

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
        return self._pos.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` read ``epoch`` from its start."""
        self._snapshot.set_epoch(epoch)

    def __len__(self) -> int:
        if self._following():
            raise TypeError("the length of a followed epoch is unknown until its write completes "
                            "(iterate it; len() works from the second epoch on)")
        return len(self._snapshot)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Any]:
        if self._closed:
            raise RuntimeError("this StreamingLoader was closed; build a new one (load_state_dict resumes it)")
        if self._following():
            follower, token = self._followed.begin()
            return self._follow_pass(follower, token)
        token, epoch = self._snapshot.begin()
        return self._run(token, epoch)

    def _follow_pass(self, follower: Any, token: object) -> Iterator[Any]:
        """The followed first epoch; when it ends, the finished version is opened for the next."""

        class _Plan:  # the follower learns its columns from the first shard that lands
            def to_tensors(self, batch, buf_tensor=None, **kw):
                return follower.plan.to_tensors(batch, buf_tensor, **kw)

        k = follower.skip_batches
        for out in self._outputs(iter(follower), _Plan(), epoch=0):
            if self._pos.handed(token):
                self._padding = follower.padding.get(k, 0)
            k += 1
            yield out
        if self._pos.token is not token or not follower.finished:
            return
        logger.info("%s: the followed epoch ended at version %d (%d batches); later epochs read that version",
                    self.source.name, follower.version, self._pos.consumed)
        follower.close()
        self._snapshot.adopt(follower.version)
        self._followed.end()
        self._snapshot._finish_pass(0)

    def _run(self, token: object, epoch: int) -> Iterator[Any]:
        snapshot = self._snapshot
        self._padding = 0
        ahead = False
        for k, out in enumerate(self._outputs(snapshot.packed(epoch, copy=self._transform_stage is None), snapshot.dataset.plan, epoch=epoch)):
            if k == 1:
                snapshot.ahead(epoch)
                ahead = True
            self._pos.handed(token)
            yield out
        if self._pos.token is token:
            if not ahead:  # a pass of one batch
                snapshot._submit_ahead(epoch)
            snapshot._finish_pass(epoch)

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

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Where to resume: every batch handed out so far counts as consumed (call it after the
        training step on the last batch). The same on every rank."""
        if self._following():
            return self._followed.state_dict()
        return self._snapshot.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly after the last consumed batch of the saved run (any ``num_workers``)."""
        saved = LoaderState.from_dict(state)
        if saved.follow is not None:
            self._followed.reset(saved)
            self._snapshot.drop_dataset()
            return
        if self.dataset is None:
            # this loader was about to follow a write (or a stream), but the saved run had already
            # finished its followed epoch: resume on the version that epoch ended at, follow no more
            self._followed.leave()
            self._snapshot.adopt(saved.version)
        self._snapshot.reset(saved)

    def close(self) -> None:
        """Stop the worker processes and the background epoch-order thread and release Mosaic's
        shared memory. The loader cannot be iterated afterwards (``state_dict`` still works)."""
        stage = getattr(self, "_transform_stage", None)
        if stage is not None:
            stage.close()
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._snapshot.close()
        self._followed.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"StreamingLoader({self.source.name!r}, batch_size={self.batch_size}, "
                f"columns={self.columns}, num_workers={self.num_workers}, epoch={self._epoch})")
