"""Whole-shard decoding: one read (or mmap), one hash check, one decompression per shard.

Stock Mosaic opens, seeks and decodes once per *sample*; here a shard is turned into a numpy view
once and every batch gathers from it. Decoded shards live in a small LRU bounded in bytes, shared
by the foreground gather and the background read-ahead thread of one process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from sparkbridge.errors import CorruptShardError
from sparkbridge.format.mds import ShardFormatError, ShardLayout, column_starts, sample_offsets
from sparkbridge.format.codecs import decompress, hash_bytes

__all__ = ["CorruptShardError", "DecodedShard", "ShardFiles", "ShardCache", "read_shard", "decode_shard"]

logger = logging.getLogger(__name__)




@dataclass(frozen=True)
class ShardFiles:
    """Where one shard lives locally and what the index says about it."""

    name: str  # basename relative to the dataset root, as listed in index.json (used in errors)
    raw_path: str
    zip_path: Optional[str]
    raw_hashes: dict
    zip_hashes: dict
    compression: Optional[str]
    samples: int


@dataclass
class DecodedShard:
    """A shard's bytes plus what a gather needs: sample offsets and, when every column is
    fixed-width, ``rows``: one opaque record (``void`` of the row size) per sample."""

    name: str
    buf: np.ndarray
    offsets: np.ndarray
    layout: ShardLayout
    rows: Optional[np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes + self.offsets.nbytes)


def _check_hash(files: ShardFiles, which: str, data, hashes: dict, algo: Optional[str]) -> None:
    if algo is None or not hashes:
        return
    if algo not in hashes:
        raise CorruptShardError(
            f"shard {files.name!r}: validate_hash={algo!r} but the index only has "
            f"{sorted(hashes)} for its {which} file"
        )
    got = hash_bytes(algo, data)
    if got != hashes[algo]:
        raise CorruptShardError(
            f"shard {files.name!r}: {algo} of the {which} file is {got}, the index says "
            f"{hashes[algo]}: the file is corrupt (re-download or rewrite the dataset)"
        )


def _pick_algo(hashes: dict, validate_hash: Union[str, bool, None]) -> Optional[str]:
    if validate_hash is False:
        return None
    if isinstance(validate_hash, str):
        return validate_hash
    if not hashes:
        return None
    return "xxh64" if "xxh64" in hashes else sorted(hashes)[0]


def _read_file(path: str) -> np.ndarray:
    # read, not mmap: a mapping keeps a file descriptor open per cached shard, and processes
    # reading many datasets run out of them; the copy costs about what hashing it costs
    return np.fromfile(path, dtype=np.uint8)


def read_shard(files: ShardFiles, *, validate_hash: Union[str, bool, None] = None) -> np.ndarray:
    """The uncompressed shard bytes, validated. Compressed shards are decompressed in memory,
    never written back beside the zip.

    Raises FileNotFoundError when neither form is present (the caller then downloads it)."""
    if os.path.isfile(files.raw_path):
        buf = _read_file(files.raw_path)
        _check_hash(files, "raw", buf, files.raw_hashes, _pick_algo(files.raw_hashes, validate_hash))
        return buf
    if files.zip_path is not None and os.path.isfile(files.zip_path):
        with open(files.zip_path, "rb") as f:
            zipped = f.read()
        _check_hash(files, "compressed", zipped, files.zip_hashes, _pick_algo(files.zip_hashes, validate_hash))
        try:
            raw = decompress(files.compression, zipped)
        except Exception as exc:  # codec errors have no common base class
            raise CorruptShardError(
                f"shard {files.name!r}: {files.compression} decompression failed ({exc}): the file is corrupt"
            ) from None
        return np.frombuffer(raw, dtype=np.uint8)
    raise FileNotFoundError(f"shard {files.name!r} is not present locally ({files.raw_path})")


def decode_shard(files: ShardFiles, layout: ShardLayout, buf: np.ndarray) -> DecodedShard:
    """Check the shard's layout against its index entry and build the views a gather needs."""
    try:
        offsets = sample_offsets(buf, name=files.name)
    except ShardFormatError as exc:
        raise CorruptShardError(str(exc)) from None
    n = len(offsets) - 1
    if n != files.samples:
        raise CorruptShardError(
            f"shard {files.name!r} holds {n} samples but the index says {files.samples}: the file is corrupt"
        )
    rows = None
    row_dtype = layout.row_dtype()
    if row_dtype is not None:
        if n and not np.all(np.diff(offsets) == row_dtype.itemsize):
            raise CorruptShardError(
                f"shard {files.name!r}: samples are not all {row_dtype.itemsize} bytes although "
                "every column is fixed-width: the file is corrupt"
            )
        # opaque fixed-size records: numpy's take() copies them with one memcpy each
        rows = np.frombuffer(buf, dtype=np.dtype((np.void, row_dtype.itemsize)), count=n, offset=int(offsets[0]))
    elif n:
        # Each row's size header must add up to the row: without hashes (stock MDSWriter writes
        # none) a damaged header would otherwise read a neighbour's bytes or index out of range.
        nvar = len(layout.var_columns)
        if int(np.diff(offsets).min()) < 4 * nvar:
            raise CorruptShardError(f"shard {files.name!r}: a sample is shorter than its size header: the file is corrupt")
        starts, sizes = column_starts(buf, offsets, layout)
        if not np.array_equal(starts[:, -1] + sizes[:, -1], offsets[1:]):
            raise CorruptShardError(
                f"shard {files.name!r}: the column sizes of some samples do not add up to the sample: "
                "the file is corrupt"
            )
    return DecodedShard(files.name, buf, offsets, layout, rows)


class ShardCache:
    """LRU of decoded shards, bounded in bytes, safe for a foreground and a read-ahead thread.

    The most recently inserted shard is never evicted, so one shard larger than the bound still
    works (the bound is then exceeded by that shard alone)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"decoded shard cache needs a positive byte bound, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[int, DecodedShard]" = OrderedDict()
        self._loading: dict[int, threading.Event] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __contains__(self, shard_id: int) -> bool:
        return shard_id in self._items

    def peek(self, shard_id: int) -> Optional[DecodedShard]:
        return self._items.get(shard_id)

    def get(self, shard_id: int, load: Callable[[], DecodedShard]) -> DecodedShard:
        """The decoded shard, loading it once even when two threads ask at the same time."""
        while True:
            with self._lock:
                item = self._items.get(shard_id)
                if item is not None:
                    self._items.move_to_end(shard_id)
                    return item
                event = self._loading.get(shard_id)
                if event is None:
                    event = self._loading[shard_id] = threading.Event()
                    break
            event.wait()  # then look again: loaded, or failed (and this thread retries the load)
        try:
            item = load()
        except BaseException as exc:
            with self._lock:
                self._loading.pop(shard_id).set()
            raise exc
        with self._lock:
            self._items[shard_id] = item
            self._bytes += item.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
            self._loading.pop(shard_id).set()
        return item

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
