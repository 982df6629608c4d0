"""The one place that touches Mosaic Streaming's internals.

sparkbridge keeps Mosaic for what it does well (sample order, partitioning over ranks and workers,
download and cache-limit eviction, elastic resumption) and replaces the per-sample fetch. That
needs names Mosaic does not document as public; every such use is here, so a Mosaic upgrade
touches this file and ``tests/bridge/test_mosaic_adapter.py``, which pins the behaviour relied on.
The rest of ``bridge/`` calls the functions below and never reads an underscore attribute of a
Mosaic object.

* The tested range is checked at import (:data:`SUPPORTED`); outside it the import fails and says
  which version to install.
* Mosaic is imported without ``streaming/__init__.py`` (see :mod:`bridge.mosaic_import`).
* :class:`SnapshotStream` — a ``Stream`` whose shards come from a dataset version (the log), not
  from ``index.json`` in the cache folder (Mosaic reuses a cached ``index.json``, so after an
  overwrite a loader with the same ``local=`` served the old data silently); it also decompresses
  with :func:`sparkbridge.format.check.check_shard` (hash, bounded size, sample count) instead of
  Mosaic's unbounded decompression, and reads a local dataset's compressed shards in place
  instead of copying them into the cache first.
* Order: :func:`apply_order_defaults`, ``generate_work``, ``get_partitions``; worlds:
  :func:`rank_world`, :func:`detect_worker_worlds`; the shard cache: :func:`shard_states`,
  :func:`touch_shard`, :func:`prepare_shard`; shared memory: :func:`release_shared_memory`,
  :func:`serialize_prefix_registration`, :data:`SHM_NAME`, :class:`building` (per-shard arrays set
  in bulk); :func:`resample_whole` (an unweighted epoch without Mosaic's per-shard loop), and
  Mosaic's ``py1e`` shuffle replaced by :mod:`sparkbridge.bridge.py1e` (the same order, faster).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from time import time_ns
from typing import Any, Callable, Optional, Sequence

from sparkbridge import _faults
from sparkbridge.bridge.mosaic_import import load_streaming_base
from sparkbridge.errors import ShardFormatError, SparkbridgeError

__all__ = ["SUPPORTED", "MOSAIC_VERSION", "check_version", "StreamingDataset", "SnapshotStream", "ShardState",
           "World", "generate_work", "get_partitions", "maybe_init_dist", "download_file", "apply_order_defaults",
           "rank_world", "detect_worker_worlds", "shard_states", "touch_shard", "prepare_shard",
           "release_shared_memory", "serialize_prefix_registration", "SHM_NAME", "building", "resample_whole"]

logger = logging.getLogger(__name__)

#: Mosaic releases this adapter is tested with (inclusive lower, exclusive upper bound).
SUPPORTED = ((0, 13, 0), (0, 14, 0))

load_streaming_base((
    "streaming._version", "streaming.base.dataset", "streaming.base.stream", "streaming.base.batching",
    "streaming.base.partition", "streaming.base.format", "streaming.base.distributed", "streaming.base.world",
    "streaming.base.storage",
))

from streaming._version import __version__ as MOSAIC_VERSION  # noqa: E402


def check_version(version: str) -> None:
    """Refuse a Mosaic release outside :data:`SUPPORTED`, saying what to install."""
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    lo, hi = SUPPORTED
    if not (lo <= parts < hi):
        raise ImportError(
            f"sparkbridge.bridge is tested with mosaicml-streaming {'.'.join(map(str, lo))} up to (not including) "
            f"{'.'.join(map(str, hi))}, but {version} is installed; it relies on Mosaic internals that change "
            f"between releases: `pip install mosaicml-streaming=={'.'.join(map(str, lo))}` (the pinned version)")


check_version(MOSAIC_VERSION)

from streaming.base.batching import generate_work  # noqa: E402
from streaming.base.dataset import StreamingDataset  # noqa: E402
from streaming.base.dataset import _ShardState as ShardState  # noqa: E402
from streaming.base.distributed import maybe_init_dist  # noqa: E402
from streaming.base.format import reader_from_json  # noqa: E402
from streaming.base.format.base.reader import FileInfo  # noqa: E402
from streaming.base.format.mds.reader import MDSReader  # noqa: E402
from streaming.base.partition import get_partitions  # noqa: E402
from streaming.base.storage import CloudDownloader  # noqa: E402
from streaming.base.stream import Stream  # noqa: E402
from streaming.base.world import World  # noqa: E402
from streaming.base.shared import SharedArray  # noqa: E402

class LazySpanner:
    """Mosaic's ``Spanner`` (global sample index -> (shard, index in shard)) without its tables.

    Why: Mosaic's builds, in every ``StreamingDataset.__init__``, an int64 array of every
    sample's shard (``np.repeat``: 8 B a row, 256 MB at 32M rows, 8 GB at 1B) to make a list of
    one small array per 1,024 samples (a million arrays at 1B rows). At 32M rows that took 5.5 of
    the loader's 6 s of build here. A binary search over the shard boundaries answers the same
    question in O(log shards) with O(shards) memory; sparkbridge only maps ids that way in bulk
    (:meth:`sparkbridge.bridge.shards.ShardTable.shard_of`), Mosaic's per-sample path keeps working."""

    def __init__(self, shard_sizes: Any, span_size: int = 1 << 10) -> None:
        import numpy as np

        self.shard_sizes = shard_sizes
        self.span_size = span_size
        self.num_samples = sum(shard_sizes)
        self.shard_bounds = np.concatenate([np.zeros(1, np.int64), np.asarray(shard_sizes, np.int64).cumsum()])

    def __getitem__(self, index: int) -> tuple[int, int]:
        import numpy as np

        if not (0 <= index < self.num_samples):
            raise IndexError(f"Invalid sample index `{index}`: 0 <= {index} < {self.num_samples}")
        shard = int(np.searchsorted(self.shard_bounds, index, side="right")) - 1
        return shard, int(index - self.shard_bounds[shard])


def _install_lazy_spanner() -> None:
    import streaming.base.dataset as mosaic_dataset

    mosaic_dataset.Spanner = LazySpanner


_install_lazy_spanner()

_building = threading.local()


class _SharedArray(SharedArray):
    """Mosaic's ``SharedArray``, whose element writes while a dataset is built (:func:`building`)
    reuse one numpy view of the segment instead of making one per write.

    Why: ``StreamingDataset.__init__`` sets its two per-shard arrays (states, access times) a shard
    at a time, and each write made a numpy view of the shared memory: 200,000 views at 100,000
    shards. The views live only while the dataset is built, because a segment whose buffer a view
    still exports cannot be closed (:func:`release_shared_memory`, Mosaic's exit handler)."""

    def __setitem__(self, index: Any, value: Any) -> None:
        views = getattr(_building, "views", None)
        if views is None:
            super().__setitem__(index, value)
            return
        view = views.get(id(self))
        if view is None:
            view = views[id(self)] = self.numpy()
        view[index] = value


class building:
    """Around a ``StreamingDataset``'s construction in this thread: see :class:`_SharedArray`."""

    def __enter__(self) -> "building":
        self._outer = getattr(_building, "views", None)
        if self._outer is None:
            _building.views = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._outer is None:
            _building.views = None  # the views go: every segment can be closed again


def _install_shared_array() -> None:
    import streaming.base.dataset as mosaic_dataset

    mosaic_dataset.SharedArray = _SharedArray


_install_shared_array()


def _install_py1e() -> None:
    """Mosaic's default shuffle, the same order with less Python per shard (:mod:`sparkbridge.bridge.py1e`)."""
    import streaming.base.shuffle as mosaic_shuffle

    from sparkbridge.bridge.py1e import get_shuffle_py1e

    mosaic_shuffle.algos["py1e"] = get_shuffle_py1e


_install_py1e()

def resample_whole(dataset: Any, epoch: int) -> Optional[tuple]:
    """Mosaic's ``StreamingDataset.resample_streams(epoch)`` (each shard's sample count, and each
    sample's id in the epoch before the shuffle) for a dataset of one stream read whole, every
    shard once (no proportion, repeat or choose): every shard's own count, and every sample's own
    id. None for any other dataset (then Mosaic's own computes it).

    Why: Mosaic makes a list and an array per shard in a Python loop, 0.4 s of every epoch's order
    at 100,000 shards (the first batch waits for it). It draws no random number in this case (a
    whole repeat of each shard), so the result is exactly Mosaic's."""
    import numpy as np

    if dataset.num_streams != 1 or not (epoch >= 0 and dataset.shuffle_seed >= 0
                                        and dataset.sampling_granularity > 0):
        return None  # Mosaic's own, with its own errors
    samples = np.asarray(dataset.samples_per_shard, dtype=np.int64)
    total = int(samples.sum())
    if not len(samples) or int(samples.min()) <= 0 or dataset.streams[0].choose != total:
        return None  # an empty shard is no shuffle unit of Mosaic's: its own loop says so
    return samples.copy(), np.arange(total, dtype=np.int64)


#: Names of the shared-memory segments Mosaic creates (``<6-digit prefix>_<kind>``).
SHM_NAME = re.compile(
    r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|epoch_shape|epoch_data)$")


def _reader(dirname: str, split: Optional[str], info: dict) -> Any:
    """``reader_from_json`` without its ``deepcopy`` of every entry (1.9 s of a loader's start at
    10,000 shards): the entries are this loader's own copy, checked by ``check_index``, and a
    reader only reads them. Other formats than MDS go through Mosaic's function."""
    if info.get("format") != "mds" or info.get("version") != 2:
        return reader_from_json(dirname, split, info)
    args = {k: v for k, v in info.items() if k not in ("format", "version")}
    for key in ("raw_data", "zip_data"):
        args[key] = FileInfo(**args[key]) if args.get(key) else None
    return MDSReader(dirname=dirname, split=split, **args)


class _Readers:
    """Mosaic's ``MDSReader`` of each entry, built from a template per layout: the first entry of
    a layout (its column lists, compression, hashes and size limit) is built by Mosaic's
    constructor, the others copy its attributes and set their own files and sample count, which
    is what the constructor would have set. Why: 100,000 constructor calls (each through three
    ``__init__``s, with a ``FileInfo`` per file) were ~0.5 s of a loader's start."""

    _OWN = ("raw_data", "zip_data", "samples", "file_pairs")

    def __init__(self, dirname: str, split: Optional[str]) -> None:
        self.dirname, self.split = dirname, split
        self._templates: dict[tuple, tuple[Any, dict]] = {}

    def reader(self, info: dict) -> Any:
        if info.get("format") != "mds" or info.get("version") != 2:
            return _reader(self.dirname, self.split, info)
        key = (id(info.get("column_names")), id(info.get("column_encodings")), id(info.get("column_sizes")),
               info.get("compression"), info.get("size_limit"))
        found = self._templates.get(key)
        plain = info.keys() == _MDS_KEYS or info.keys() == _MDS_KEYS_UNZIPPED
        if found is None or not plain or found[0].hashes != info.get("hashes"):
            shard = _reader(self.dirname, self.split, info)
            if found is None and plain:
                lists = (info.get("column_names"), info.get("column_encodings"), info.get("column_sizes"))
                self._templates[key] = (shard, {k: v for k, v in vars(shard).items() if k not in self._OWN}, lists)
            return shard
        template = found[1]
        raw, zipped = info["raw_data"], info.get("zip_data")
        raw = FileInfo(**raw)
        zipped = FileInfo(**zipped) if zipped else None
        shard = object.__new__(MDSReader)
        attrs = vars(shard)
        attrs.update(template)
        attrs["raw_data"], attrs["zip_data"], attrs["samples"], attrs["file_pairs"] = \
            raw, zipped, info["samples"], [(raw, zipped)]
        return shard


#: the keys of an MDS index entry (version 2): an entry with others is built by the constructor
_MDS_KEYS = frozenset(("column_encodings", "column_names", "column_sizes", "compression", "format", "hashes",
                       "raw_data", "samples", "size_limit", "version", "zip_data"))
_MDS_KEYS_UNZIPPED = _MDS_KEYS - {"zip_data"}


class SnapshotStream(Stream):
    """A stream over the shard entries of one dataset version.

    ``remote``/``local`` mean what they mean to Mosaic (a remote root and its cache, or a local
    root alone); the entries were checked (paths confined to the root) before they got here.
    ``check(entry_index, stored_bytes) -> raw bytes`` validates and decompresses one shard (it
    raises naming the shard); it runs wherever Mosaic prepares a shard (any worker process).
    ``count_index``: whether Mosaic's cache accounting needs the size of ``index.json``: only
    with a ``cache_limit`` (without one Mosaic never reads its count of cache usage), and it costs
    a serialization of every entry (~0.4 s at 100,000 shards)."""

    def __init__(self, *, remote: Optional[str], local: Optional[str], shards: Sequence[dict], name: str,
                 check: Callable[[int, bytes], Any], count_index: bool = True) -> None:
        super().__init__(remote=remote, local=local)
        self._shards_json = shards
        self._by_zip_names: Optional[dict[str, int]] = None
        self._count_index = count_index
        self._name = name
        self._check = check

    @property
    def _by_zip(self) -> dict[str, int]:
        if self._by_zip_names is None:
            self._by_zip_names = {s["zip_data"]["basename"]: i for i, s in enumerate(self._shards_json)
                                  if s.get("zip_data")}
        return self._by_zip_names

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list:
        readers = _Readers(self.local, self.split)
        checked: set[int] = set()  # the encodings lists validated (entries of one layout share one)
        shards = []
        for info in self._shards_json:
            shard = readers.reader(info)
            if id(info.get("column_encodings")) not in checked:
                try:
                    shard.validate(allow_unsafe_types)
                except ValueError as exc:
                    raise ShardFormatError(
                        f"{self._name}: {str(exc).split('. To proceed')[0]}; pickle can run arbitrary code, so "
                        "sparkbridge refuses it (rewrite the column as json, str or ndarray)") from None
                if isinstance(info.get("column_encodings"), list):
                    checked.add(id(info["column_encodings"]))
            shards.append(shard)
        return shards

    def get_index_size(self) -> int:
        if not self._count_index:
            return 0
        import json

        return len(json.dumps({"shards": list(self._shards_json), "version": 2}))

    def set_up_local(self, shards: list, cache_usage_per_shard: Any) -> None:
        """Mosaic's ``Stream.set_up_local`` (list the cache folder once, then each shard makes its
        files consistent and says what they occupy), asking only the shards with a file in the
        folder: a shard with none has nothing to make consistent and occupies 0 bytes, which is
        what Mosaic's own check returns for it. Why: 100,000 shards asked one by one cost ~0.3 s
        of a loader's start, most of it for an empty spill or cache folder."""
        folder = os.path.join(self.local, self.split)
        listing = set()
        for dirname, _, subfiles in os.walk(folder):
            for subfile in subfiles:
                listing.add(os.path.join(dirname, subfile))
        if not listing:
            return
        prefix = os.path.join(folder, "")
        present = {name[len(prefix):] for name in listing if name.startswith(prefix)}
        for i, shard in enumerate(shards):
            if any(info is not None and info.basename in present for pair in shard.file_pairs for info in pair):
                cache_usage_per_shard[i] = shard.set_up_local(listing, self.safe_keep_zip)

    def _write_raw(self, zip_info: Any, zipped: bytes, raw_filename: str) -> None:
        from sparkbridge.bridge.shard_source import write_file

        write_file(raw_filename, self._check(self._by_zip[zip_info.basename], zipped))

    # Mosaic 0.13: Stream._decompress_shard_part(zip_info, zip_filename, raw_filename, compression)
    def _decompress_shard_part(self, zip_info: Any, zip_filename: str, raw_filename: str,
                               compression: Optional[str]) -> None:
        self._write_raw(zip_info, _read_zip(zip_filename, zip_info), raw_filename)
        if not self.safe_keep_zip:
            os.remove(zip_filename)

    # Mosaic 0.13: Stream._prepare_shard_part(raw_info, zip_info, compression) -> change in cache bytes
    def _prepare_shard_part(self, raw_info: Any, zip_info: Any = None, compression: Optional[str] = None) -> int:
        remote = self.remote
        if zip_info is None or remote is None or "://" in remote:
            return super()._prepare_shard_part(raw_info, zip_info, compression)
        # a local dataset read through a cache folder: decompress its shard in place, no copy
        raw_filename = os.path.join(self.local, self.split, raw_info.basename)
        if os.path.isfile(raw_filename):
            return 0
        zip_filename = os.path.join(remote, self.split, zip_info.basename)
        self._write_raw(zip_info, _read_zip(zip_filename, zip_info), raw_filename)  # FileNotFoundError: incomplete
        return int(raw_info.bytes)


def _read_zip(path: str, info: Any) -> bytes:
    """A compressed shard file's bytes, its size checked against the index first (the one check
    of a small shard's size: :meth:`sparkbridge.bridge.shards.ShardTable.check_declared_sizes`)."""
    from sparkbridge.bridge.shard_source import read_declared

    data = read_declared(path, int(info.bytes), info.basename)
    if data is None:
        raise FileNotFoundError(f"no such file: {path}")
    return data


def download_file(remote: str, local: str, timeout: float) -> None:
    """Download one file with Mosaic's downloader for ``remote``'s scheme (gs://, hf://, ...)."""
    CloudDownloader.direct_download(remote, local, timeout)


def apply_order_defaults(dataset: Any, world: Any) -> None:
    """Mosaic's defaults for ``num_canonical_nodes`` (64 per node for py1s/py2s, else one per
    node) and ``shuffle_block_size``, as its ``_resume`` sets them when nothing is resumed."""
    if not dataset.num_canonical_nodes:
        dataset.num_canonical_nodes = 64 * world.num_nodes if dataset.shuffle_algo in ("py1s", "py2s") \
            else world.num_nodes
        logger.debug("num_canonical_nodes defaults to %d (Mosaic's rule for %s)", dataset.num_canonical_nodes,
                     dataset.shuffle_algo)
    dataset._set_shuffle_block_size(world)


def rank_world(dataset: Any) -> Any:
    """This rank's ``World`` as Mosaic sees it for iteration (``replication`` applied)."""
    return dataset._parallel_rank_world


def detect_worker_worlds(dataset: Any) -> Any:
    """Inside ``__iter__``: this worker's ``World`` (Mosaic keeps both views on the dataset)."""
    dataset._unique_worker_world = dataset._unique_rank_world.detect_workers()
    dataset._parallel_worker_world = dataset._parallel_rank_world.detect_workers()
    return dataset._parallel_worker_world


def shard_states(dataset: Any) -> Any:
    """Mosaic's shared per-shard state array (``ShardState`` values), as numpy."""
    return dataset._shard_states.numpy()


def touch_shard(dataset: Any, shard_id: int) -> None:
    """Mark a shard recently used, so that ``cache_limit`` eviction keeps it."""
    dataset._shard_access_times[shard_id] = time_ns()


def prepare_shard(dataset: Any, shard_id: int, *, blocking: bool, name: str, source: str) -> None:
    """Mosaic's ``prepare_shard`` (download, cache_limit eviction), except that a failed download
    raises an error naming the shard and does not leave it PREPARING: Mosaic leaves that state
    behind on error, and every process waiting for the shard would spin forever."""
    try:
        dataset.prepare_shard(shard_id, blocking=blocking)
    except Exception as exc:
        lock = getattr(dataset, "_cache_filelock", None)
        if lock is not None:
            lock.acquire()
        try:
            if dataset._shard_states[shard_id] == ShardState.PREPARING:
                dataset._shard_states[shard_id] = ShardState.REMOTE
        finally:
            if lock is not None:
                lock.release()
        if isinstance(exc, SparkbridgeError):  # a corrupt shard, named by the check
            raise
        message = f"shard {name!r} of {source} could not be downloaded: {type(exc).__name__}: {exc}"
        if _is_missing(exc):
            raise FileNotFoundError(message + " (the dataset is incomplete)") from None
        raise RuntimeError(message) from exc


def _is_missing(exc: BaseException) -> bool:
    """Whether a download error means "no such file" (Mosaic raises FileNotFoundError for local
    and some stores, botocore's ClientError with these codes for S3)."""
    if isinstance(exc, FileNotFoundError):
        return True
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    return code in ("403", "404", "NoSuchKey", "NotFound")


def release_shared_memory(dataset: Any) -> int:
    """Close a ``StreamingDataset``'s shared memory now (unlinking what this process created).

    Mosaic registers every segment it opens with ``atexit``, so each dataset keeps its file
    descriptors until the interpreter exits, and every later dataset in the process opens the
    segments of all earlier ones again: a process that builds many loaders runs out of file
    descriptors. Returns how many segments were released."""
    import atexit

    holders = [getattr(dataset, "_locals_shm", None), getattr(dataset, "_resume_shm", None)]
    for name in ("_next_epoch", "_cache_usage"):
        holders.append(getattr(getattr(getattr(dataset, name, None), "arr", None), "shm", None))
    for name in ("_shard_states", "_shard_access_times"):
        holders.append(getattr(getattr(dataset, name, None), "shm", None))
    holders.append(getattr(getattr(getattr(dataset, "_shared_barrier", None), "_arr", None), "shm", None))
    released = 0
    for shm in holders:
        if shm is None or not hasattr(shm, "cleanup"):
            continue
        try:
            shm.cleanup()
        except (BufferError, OSError):  # still exported to a live array: leave it to atexit
            continue
        atexit.unregister(shm.cleanup)
        released += 1
    return released


#: Taken (``flock``) around Mosaic's shared-memory prefix registration by every sparkbridge
#: loader on the host; in ``/dev/shm`` because the names it guards live there.
PREFIX_LOCK = "/dev/shm/sparkbridge-shm-prefix.lock"


def serialize_prefix_registration() -> None:
    """Make Mosaic's shared-memory prefix registration safe between processes (installed once).

    Why: each rank of a ``StreamingDataset`` picks the first prefix ``N`` whose segments do not
    exist yet, then the node's leader creates ``/N_locals`` and the other ranks open it. Two
    loaders in unrelated processes on one host (two jobs, an evaluation beside a training run)
    that start together pick the same ``N``: the second leader failed with ``FileExistsError:
    '/000920_locals'`` from inside Mosaic (1 of 2 randomized follow runs while other loaders
    started on the machine), and a rank could pick ``N`` while its leader picked ``N + 1``.

    Here (:func:`_register_prefix`) the leader picks ``N`` and creates ``/N_locals`` under a
    host-wide ``flock``, so the next loader finds ``N`` taken; the other ranks of the job take
    ``N`` from their leader (one all-gather, where Mosaic had two barriers) and check it as Mosaic
    does. A stock Mosaic dataset elsewhere on the host takes no lock: when it takes ``N`` first,
    the leader picks again."""
    from streaming.base import dataset as mosaic_dataset

    if getattr(mosaic_dataset.get_shm_prefix, "__sparkbridge_serialized__", False):
        return
    _register_prefix.__sparkbridge_serialized__ = True  # type: ignore[attr-defined]
    mosaic_dataset.get_shm_prefix = _register_prefix


def _register_prefix(streams_local: list, streams_remote: list, world: Any, retry: int = 100) -> tuple:
    """Mosaic's ``get_shm_prefix`` (same arguments, same result), race-free between processes; a
    failure of the leader's registration is raised on every rank (Mosaic's ranks waited for it in
    a barrier until the process group's timeout)."""
    import torch.distributed as dist
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as mosaic_prefix

    mosaic_prefix._check_self(streams_local)
    prefix_int, shm, failure = -1, None, None
    if world.is_local_leader:
        try:
            prefix_int, shm = _register_as_leader(streams_local, streams_remote, retry)
        except Exception as exc:  # every rank of the job raises it, below: none waits for the leader
            failure = exc
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from sparkbridge.bridge.distributed import portable_error, rebuilt_error

        answers: list = [None] * dist.get_world_size()
        dist.all_gather_object(answers, (prefix_int, None if failure is None else portable_error(failure)))
        leader = world.node * world.ranks_per_node  # ranks are numbered node by node (Mosaic's World)
        prefix_int, error = answers[leader]
        if failure is not None:
            raise failure
        if error is not None:
            raise rebuilt_error(error, leader)
    elif failure is not None:
        raise failure
    if not world.is_local_leader:
        name = mosaic_prefix._get_path(prefix_int, mosaic_prefix.LOCALS)
        try:
            shm = SharedMemory(name, False)
        except FileNotFoundError:
            raise SparkbridgeError(f"rank {world.rank}: shared memory {name} of its node's first rank is missing: "
                                   "give every rank the same remote= and local=") from None
        their_locals, their_prefix = mosaic_prefix._unpack_locals(bytes(shm.buf))
        if their_locals != streams_local or their_prefix != prefix_int:
            raise SparkbridgeError(f"rank {world.rank} reads {streams_local} but its node's first rank registered "
                                   f"{their_locals}: give every rank the same remote= and local=")
    return prefix_int, shm


def _register_as_leader(streams_local: list, streams_remote: list, retry: int) -> tuple:
    """The node leader's part: choose the first free prefix and create its ``_locals`` segment,
    under the host-wide lock; choose again when a lock-free Mosaic dataset took it meanwhile."""
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as mosaic_prefix

    for _ in range(1 + retry):
        with _prefix_lock():
            prefix_int = max(mosaic_prefix._check_and_find_retrying(streams_local, streams_remote,
                                                                    shm_name=name, retry=retry)
                             for name in mosaic_prefix.SHM_TO_CLEAN)
            _faults.point("shm-prefix-chosen")
            data = mosaic_prefix._pack_locals(streams_local, prefix_int)
            try:
                shm = SharedMemory(mosaic_prefix._get_path(prefix_int, mosaic_prefix.LOCALS), True, len(data))
            except FileExistsError:  # taken meanwhile by a Mosaic dataset that takes no lock
                logger.debug("shared-memory prefix %d was taken meanwhile; choosing again", prefix_int)
                continue
            shm.buf[:len(data)] = data
            return prefix_int, shm
    raise SparkbridgeError(f"no free shared-memory prefix for {streams_remote[0] or streams_local[0]} "
                           f"after {1 + retry} tries: other Mosaic datasets on this host took each one")


class _prefix_lock:
    """A host-wide exclusive ``flock`` on :data:`PREFIX_LOCK`; nothing where ``/dev/shm`` is absent
    or the lock file cannot be opened (another user's, read-only: a shared lock file is opened
    read-only, which ``flock`` allows)."""

    def __enter__(self) -> "_prefix_lock":
        import fcntl

        self._fd = None
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                self._fd = os.open(PREFIX_LOCK, flags, 0o644)
                break
            except OSError:
                continue
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
