"""``BatchDataset``: Mosaic's ``StreamingDataset`` with the per-sample fetch replaced by batches.

Mosaic still decides everything that makes a run correct and elastic: which sample ids each
rank and worker reads, in which order (every shuffle algorithm and seed), download-ahead,
``cache_limit`` eviction, and where a resumed epoch starts. This class only changes how those ids
become data: in chunks of ``batch_size`` ids, mapped to (shard, row) with one ``searchsorted``,
gathered from whole decoded shards (see :mod:`bridge.decode` and :mod:`bridge.batch`).

Epoch and resume position are plain attributes set by :class:`bridge.loader.StreamingLoader`
before each pass (worker processes inherit them), instead of Mosaic's shared-memory counters, so
every process computes the same partition without cross-process barriers at iteration time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from time import time_ns
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from streaming import StreamingDataset

from sparkbridge.bridge.batch import BatchPlan, PackedBatch
from sparkbridge.bridge.decode import DecodedShard, ShardCache, ShardFiles, decode_shard, read_shard
from sparkbridge.bridge.mosaic import ShardState as _ShardState
from sparkbridge.bridge.mosaic import SnapshotStream, World, generate_work
from sparkbridge.errors import DatasetNotFoundError
from sparkbridge.format.mds import ShardLayout
from sparkbridge.format.paths import confined_path
from sparkbridge.log.snapshot import Snapshot

__all__ = ["BatchDataset"]

logger = logging.getLogger(__name__)

_TICK = 0.005
_DEFAULT_DECODED_CACHE = 1 << 30


class BatchDataset(StreamingDataset):
    """An iterable of :class:`~bridge.batch.PackedBatch` for this rank/worker's share of an epoch."""

    def __init__(
        self,
        *,
        snapshot: Snapshot,
        remote: Optional[str],
        local: Optional[str],
        batch_size: int,
        shuffle: bool,
        shuffle_seed: int,
        shuffle_algo: str,
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
    ) -> None:
        source = remote or local
        if not snapshot.shards or snapshot.rows == 0:
            raise DatasetNotFoundError(
                f"{source} (version {snapshot.version}) holds no rows yet: there is nothing to stream")
        stream = SnapshotStream(remote=remote, local=local, shards=snapshot.shards, name=str(source))
        super().__init__(
            streams=[stream],
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=shuffle_seed,
            shuffle_algo=shuffle_algo,
            shuffle_block_size=shuffle_block_size,
            num_canonical_nodes=num_canonical_nodes,
            partition_algo=partition_algo,
            cache_limit=cache_limit,
            predownload=predownload,
            download_retry=download_retry,
            download_timeout=download_timeout,
            validate_hash=None,  # validated by bridge.decode when a shard is read
            allow_unsafe_types=False,
        )
        try:
            stream = self.streams[0]
            root = os.path.join(stream.local, stream.split or "")
            self.root_local = root
            self.source = source
            self.version = snapshot.version
            self.identity = snapshot.identity  # what a resumed run must find again
            self.manifest = snapshot.manifest()
            self.drop_last = bool(drop_last)
            self.validate_hash = validate_hash
            self.shard_files: list[ShardFiles] = []
            self.layouts: list[ShardLayout] = []
            for i, shard in enumerate(self.shards):
                raw_info, zip_info = shard.file_pairs[0]
                where = f"{source}, version {snapshot.version}, shard {i}"
                self.shard_files.append(ShardFiles(
                    name=zip_info.basename if zip_info else raw_info.basename,
                    raw_path=confined_path(root, raw_info.basename, where=where),
                    zip_path=confined_path(root, zip_info.basename, where=where) if zip_info else None,
                    raw_hashes=dict(raw_info.hashes or {}),
                    zip_hashes=dict(zip_info.hashes or {}) if zip_info else {},
                    compression=shard.compression,
                    samples=int(shard.samples),
                ))
                self.layouts.append(ShardLayout.from_index_entry({
                    "column_names": shard.column_names, "column_encodings": shard.column_encodings,
                    "column_sizes": shard.column_sizes}))
            if isinstance(validate_hash, str):
                lacking = [f.name for f in self.shard_files
                           if validate_hash not in f.zip_hashes and validate_hash not in f.raw_hashes]
                if lacking:
                    raise ValueError(
                        f"validate_hash={validate_hash!r} but {len(lacking)} shard(s) of {self.source} have no "
                        f"such hash in index.json (first: {lacking[0]!r}); pass validate_hash=None to use "
                        "what the index has"
                    )
            if validate_hash is None and not any(f.raw_hashes or f.zip_hashes for f in self.shard_files):
                logger.info("%s: shards carry no hashes in index.json, so corruption inside a shard "
                            "cannot be detected (sparkbridge's writer adds xxh64)", self.source)
            self.plan = BatchPlan(self.layouts, shard_names=[f.name for f in self.shard_files], manifest=self.manifest,
                                  columns=columns, features=features, label=label)
        except BaseException:
            # Mosaic has already made its shared memory: give it back now, not at interpreter exit
            from sparkbridge.bridge.distributed import release_shared_memory

            release_shared_memory(self)
            raise
        self.shard_ends = np.cumsum(self.samples_per_shard)
        self.decoded_cache_bytes = int(decoded_cache_bytes or _DEFAULT_DECODED_CACHE)
        self.sb_epoch = 0
        self.sb_sample_in_epoch = 0
        self.sb_work: Optional[tuple[tuple, np.ndarray]] = None
        # set by the loader when it runs persistent DataLoader workers: shared int64 tensors with
        # the pass to read (see sync_from_control) and the epoch's sample ids
        self.sb_control: Any = None
        self.sb_work_shared: Any = None
        # (workers, slots, bytes) shared uint8 tensor: workers gather straight into a slot and
        # send only its number, instead of a new shared-memory segment per batch
        self.sb_slots: Any = None
        self._sb_slot_next = 0
        self._sb_last_slot: Optional[tuple[int, int]] = None
        self._sb_cache: Optional[ShardCache] = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sb_cache"] = None  # holds a lock; each process builds its own
        state["sb_work"] = None  # workers read the pass from the shared control block
        return state

    # ------------------------------------------------------------------ Mosaic hooks

    def _resume(self, world: World, epoch: int) -> tuple[int, int]:
        """Where this pass starts: set by the loader, not read from shared memory."""
        if not self.num_canonical_nodes:
            self.num_canonical_nodes = 64 * world.num_nodes if self.shuffle_algo in ("py1s", "py2s") \
                else world.num_nodes
            logger.debug("num_canonical_nodes defaults to %d (Mosaic's rule for %s)",
                         self.num_canonical_nodes, self.shuffle_algo)
        self._set_shuffle_block_size(world)
        return self.sb_epoch, self.sb_sample_in_epoch

    def _resume_incr_epoch(self) -> tuple[int, int]:
        return self._resume(self._parallel_worker_world, self.sb_epoch)

    def work_world(self, workers_per_rank: int) -> World:
        p = self._parallel_rank_world
        return World(num_nodes=p.num_nodes, ranks_per_node=p.ranks_per_node,
                     workers_per_rank=workers_per_rank, worker=p.rank * workers_per_rank)

    def compute_work(self, epoch: int, sample_in_epoch: int, workers_per_rank: int) -> np.ndarray:
        """Mosaic's sample ids of one epoch for the whole world: (nodes, ranks per node, workers
        per rank, batches per worker, batch size), -1 for padding."""
        world = self.work_world(workers_per_rank)
        self._resume(world, epoch)
        return generate_work(self.batching_method, self, world, epoch, sample_in_epoch)

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        p = self._parallel_worker_world
        key = (epoch, sample_in_epoch, p.workers_per_rank)
        if self.sb_work is not None and self.sb_work[0] == key:
            work = self.sb_work[1]
        else:
            work = self.compute_work(epoch, sample_in_epoch, p.workers_per_rank)
        return np.array(work[p.node, p.rank_of_node, p.worker_of_rank], dtype=np.int64).reshape(-1)

    # ------------------------------------------------------------------ iteration

    def publish(self, epoch: int, start: int, work: np.ndarray) -> None:
        """Hand a pass to persistent worker processes through the shared control block."""
        import torch

        flat = work.reshape(-1)
        self.sb_work_shared[:flat.size].copy_(torch.from_numpy(flat))
        ctl = [epoch, start, *work.shape, _none(self.num_canonical_nodes), _none(self.shuffle_block_size),
               _none(self.initial_physical_nodes)]
        self.sb_control[:len(ctl)] = torch.tensor(ctl, dtype=torch.int64)

    def sync_from_control(self) -> None:
        if self.sb_control is None:
            return
        ctl = self.sb_control.tolist()
        epoch, start, shape = ctl[0], ctl[1], tuple(ctl[2:7])
        self.num_canonical_nodes, self.shuffle_block_size, self.initial_physical_nodes = (
            None if v < 0 else v for v in ctl[7:10])
        size = int(np.prod(shape))
        work = self.sb_work_shared[:size].numpy().reshape(shape)
        self.sb_epoch, self.sb_sample_in_epoch = epoch, start
        self.sb_work = ((epoch, start, shape[2]), work)

    def __iter__(self) -> Iterator[PackedBatch]:
        self.sync_from_control()
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        epoch, start = self._resume_incr_epoch()
        ids = np.asarray(self._get_work(epoch, start), dtype=np.int64)
        return self._iter_batches(ids)

    def _cache(self) -> ShardCache:
        if self._sb_cache is None:
            self._sb_cache = ShardCache(self.decoded_cache_bytes)
        return self._sb_cache

    def decoded(self, shard_id: int, retry: int = 7) -> DecodedShard:
        """The decoded shard, downloading it (through Mosaic, honouring cache_limit) if needed."""
        shard_id = int(shard_id)
        files = self.shard_files[shard_id]

        def load() -> DecodedShard:
            for _ in range(1 + retry):
                try:
                    buf = read_shard(files, validate_hash=self.validate_hash)
                    break
                except FileNotFoundError:
                    if self.streams[0].remote is None:
                        raise FileNotFoundError(
                            f"shard {files.name!r} is listed in {self.source}/index.json but is missing "
                            f"({files.raw_path}); the dataset is incomplete"
                        ) from None
                    self.fetch_shard(shard_id, blocking=True)
            else:
                raise RuntimeError(
                    f"shard {files.name!r} was evicted again before it could be read {1 + retry} times: "
                    f"cache_limit={self.cache_limit} is too small for the read-ahead window"
                )
            return decode_shard(files, self.layouts[shard_id], buf)

        shard = self._cache().get(shard_id, load)
        if self.cache_limit:  # Mosaic evicts the least recently used shard files first
            self._shard_access_times[shard_id] = time_ns()
        return shard

    def fetch_shard(self, shard_id: int, *, blocking: bool) -> None:
        """Mosaic's ``prepare_shard`` (download, cache_limit eviction), except that a failed
        download raises an error naming the shard and does not leave it PREPARING: Mosaic leaves
        that state behind on error, and every process waiting for the shard would spin forever."""
        try:
            self.prepare_shard(shard_id, blocking=blocking)
        except Exception as exc:
            lock = getattr(self, "_cache_filelock", None)
            if lock is not None:
                lock.acquire()
            try:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.REMOTE
            finally:
                if lock is not None:
                    lock.release()
            name = self.shard_files[shard_id].name
            message = f"shard {name!r} of {self.source} could not be downloaded: {type(exc).__name__}: {exc}"
            if _is_missing(exc):
                raise FileNotFoundError(message + " (the dataset is incomplete)") from None
            raise RuntimeError(message) from exc

    def _alloc(self, nbytes: int) -> np.ndarray:
        self._sb_last_slot = None
        if self.sb_slots is not None and nbytes <= self.sb_slots.shape[2]:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            if info is not None:
                k = self._sb_slot_next % self.sb_slots.shape[1]
                self._sb_slot_next += 1
                self._sb_last_slot = (info.id, k)
                return self.sb_slots[info.id, k, :nbytes].numpy()
        return np.empty(nbytes, dtype=np.uint8)

    def _iter_batches(self, ids: np.ndarray) -> Iterator[PackedBatch]:
        B = int(self.batch_size)
        valid_all = ids >= 0
        safe = np.where(valid_all, ids, 0)
        sid = np.searchsorted(self.shard_ends, safe, side="right")
        local = safe - self.sample_offset_per_shard[sid]
        in_worker = _in_dataloader_worker()
        ahead = _ReadAhead(self, sid[valid_all], np.flatnonzero(valid_all))
        ahead.start()
        try:
            nb = -(-len(ids) // B)
            for j in range(nb):
                a, b = j * B, min((j + 1) * B, len(ids))
                s, rows = sid[a:b], local[a:b]
                v = valid_all[a:b]
                if not v.all():
                    s, rows = s[v], rows[v]
                n = len(s)
                if n == 0 or (n < B and self.drop_last):
                    ahead.position = b
                    continue
                lo, hi = int(s.min()), int(s.max())
                if lo == hi:
                    groups = [(self.decoded(lo), rows, None)]
                elif hi - lo < 8:  # py1e/py1b keep a batch within a few neighbouring shards
                    groups = []
                    for sh in range(lo, hi + 1):
                        pos = np.flatnonzero(s == sh)
                        if len(pos):
                            groups.append((self.decoded(sh), rows[pos], pos))
                else:
                    order = np.argsort(s, kind="stable")
                    ss = s[order]
                    cuts = [0, *(np.flatnonzero(ss[1:] != ss[:-1]) + 1).tolist(), n]
                    groups = []
                    for c0, c1 in zip(cuts[:-1], cuts[1:]):
                        pos = order[c0:c1]
                        groups.append((self.decoded(ss[c0]), rows[pos], pos))
                ahead.position = b
                batch = self.plan.gather(groups, n, self._alloc)
                if in_worker:
                    if self._sb_last_slot is not None:
                        batch.buf, batch.slot = None, self._sb_last_slot
                    else:
                        import torch

                        batch.buf = torch.from_numpy(batch.buf)
                yield batch
        finally:
            ahead.stop()


def _none(value: Optional[int]) -> int:
    return -1 if value is None else int(value)


def _in_dataloader_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


class _ReadAhead(threading.Thread):
    """Downloads (through Mosaic) and decodes the shards a worker will need, in the order it
    first needs them, at most ``predownload`` samples ahead of the batch being gathered.
    Decompression and hashing release the GIL, so this overlaps with the gather loop. On an error
    it stops; the foreground then loads the same shard itself and raises the error there
    (:meth:`BatchDataset.fetch_shard` never leaves a failed shard PREPARING)."""

    def __init__(self, ds: BatchDataset, shard_ids: np.ndarray, positions: np.ndarray) -> None:
        super().__init__(name="sparkbridge-read-ahead", daemon=True)
        self.ds = ds
        self.shard_ids = shard_ids
        self.positions = positions
        self.position = 0
        self._halt = threading.Event()
        cache = ds._cache()
        self.needed = not all(sh in cache for sh in range(len(ds.shards)))

    def start(self) -> None:
        if self.needed and len(self.shard_ids):
            super().start()

    def _plan(self) -> list[tuple[int, int]]:
        """Each shard once, with the first position that needs it, in that order."""
        uniq, first = np.unique(self.shard_ids, return_index=True)
        order = np.argsort(first, kind="stable")
        return list(zip(uniq[order].tolist(), self.positions[first[order]].tolist()))

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        ds = self.ds
        window = int(ds.predownload or 0)
        try:
            for shard_id, pos in self._plan():
                while pos > self.position + window:
                    if self._halt.wait(_TICK):
                        return
                if self._halt.is_set():
                    return
                while ds._shard_states[shard_id] != _ShardState.LOCAL:
                    if ds._shard_states[shard_id] == _ShardState.REMOTE:  # not fetched yet, or evicted
                        ds.fetch_shard(shard_id, blocking=False)
                    elif self._halt.wait(_TICK):
                        return
                ds.decoded(shard_id)
        except Exception as exc:  # the foreground raises it when it needs the shard
            logger.debug("read-ahead stopped: %s", exc)


def _is_missing(exc: BaseException) -> bool:
    """Whether a download error means "no such file" (Mosaic raises FileNotFoundError for local
    and some stores, botocore's ClientError with these codes for S3)."""
    if isinstance(exc, FileNotFoundError):
        return True
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    return code in ("403", "404", "NoSuchKey", "NotFound")
