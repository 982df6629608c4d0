"""The followed epoch: train on a dataset while it is written, batch by batch as commits land.

A loader built with ``follow=True`` reads its first epoch from the dataset log as it grows: every
shard of the version it starts on, then the shards of each new log entry (a partition committed by
``write_mds(commit="partition")``, a Structured Streaming micro-batch from ``mds_sink``). The epoch
ends when the followed write is marked complete, or — for a stream — when no commit lands for
``idle_timeout`` seconds. Later epochs read the finished version with Mosaic's order.

Order. Rows are numbered in log order (version, then shard, then row); rank ``r`` of ``w`` owns
the rows numbered ``r mod w``, so ranks are disjoint and their shares differ by at most one row;
the last batch is padded by repeating rows (as Mosaic pads) so every rank takes the same number
of steps and DDP never waits at the end. Without shuffling a rank reads its rows in log order;
with ``shuffle=True`` each batch is drawn at random from the rows that have landed and not yet
been read — a shuffle over what is available so far, not over the whole dataset: early batches
can only mix the first partitions. ``bench/shuffle.py`` measures how close it gets to a global
shuffle (the shuffle score).

Determinism and resumption. New commits are adopted only at batch boundaries and each adoption
is recorded (batch index → version); the draws depend only on the seed, the rank, the batch
index and that record. Under torchrun rank 0 decides the adoptions and broadcasts them, so every
rank holds the same rows at the same step. ``state()`` is that record plus the number of batches
consumed: a resumed loader replays the draws without reading a byte and continues with exactly
the rows the run had not seen.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from sparkbridge.bridge.batch import BatchPlan, PackedBatch
from sparkbridge.bridge.cache import ShardCache
from sparkbridge.bridge.decode import decode_shard
from sparkbridge.bridge.fetch import pick_hash
from sparkbridge.errors import CommitConflictError, FollowTimeoutError, ShardFormatError, UsageError
from sparkbridge.format.check import check_shard
from sparkbridge.format.index import stored_name
from sparkbridge.format.mds import ShardLayout
from sparkbridge.format.paths import confined_path
from sparkbridge.log.snapshot import LogReader, Snapshot

__all__ = ["FollowTarget", "Follower", "find_target"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FollowTarget:
    """What a followed epoch waits for: the completion of ``write_id`` (a partitioned write), or
    ``stream``: quiet for ``idle_timeout`` seconds."""

    start_version: int
    write_id: Optional[str]
    stream: bool


def find_target(reader: LogReader, *, timeout: float, poll: float) -> Optional[FollowTarget]:
    """Wait (up to ``timeout`` s) until something is committed; None when the latest version is
    finished and no stream writes to it (nothing to follow: read it as usual)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = reader.refresh()
        if snap.version >= 0 or snap.legacy:
            break
        if time.monotonic() > deadline:
            raise FollowTimeoutError(f"follow=True waited {timeout:.0f} s for the first commit to {reader.root} "
                                     "(no _log/ entry appeared); is the writer running? Raise follow_timeout to wait longer")
        time.sleep(poll)
    if snap.legacy:
        return None
    if snap.open_writes:
        newest = max(snap.open_writes, key=lambda w: w.begun_at)
        return FollowTarget(snap.version, newest.write_id, False)
    if snap.txns:
        return FollowTarget(snap.version, None, True)
    return None


@dataclass
class _Shard:
    entry: dict
    name: str  # the stored file, as the log lists it
    path: str  # where it is read locally (the dataset root, or the cache folder it is fetched into)
    layout: ShardLayout
    start: int  # global number of its first row

    @property
    def samples(self) -> int:
        return int(self.entry["samples"])


@dataclass
class _Pool:
    """This rank's landed, unread rows (global numbers), with O(batch) draws and removals."""

    rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    size: int = 0

    def add(self, new: np.ndarray) -> None:
        need = self.size + len(new)
        if need > len(self.rows):
            grown = np.empty(max(need, 2 * len(self.rows), 1024), np.int64)
            grown[:self.size] = self.rows[:self.size]
            self.rows = grown
        self.rows[self.size:need] = new
        self.size = need

    def take_front(self, n: int) -> np.ndarray:
        out = self.rows[:n].copy()
        self.rows[:self.size - n] = self.rows[n:self.size]
        self.size -= n
        return out

    def take_random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        picks = rng.choice(self.size, size=n, replace=False)
        out = self.rows[picks].copy()
        # fill the holes with the tail: keep the survivors' positions deterministic
        keep = np.ones(self.size, bool)
        keep[picks] = False
        tail_start = self.size - n
        holes = picks[picks < tail_start]
        movers = np.flatnonzero(keep[tail_start:self.size]) + tail_start
        self.rows[holes] = self.rows[movers]
        self.size = tail_start
        return out


class Follower:
    """One rank's followed epoch (see the module doc). Built by the loader; iterate it once."""

    def __init__(
        self,
        *,
        reader: LogReader,
        target: FollowTarget,
        root_local: str,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
        columns: Optional[Sequence[str]] = None,
        features: Optional[Sequence[str]] = None,
        label: Optional[str] = None,
        validate_hash: Any = None,
        decoded_cache_bytes: int = 1 << 30,
        poll: float = 0.2,
        timeout: float = 600.0,
        idle_timeout: float = 60.0,
        history: Sequence[Sequence[int]] = (),
        skip_batches: int = 0,
        broadcast: Any = None,
    ) -> None:
        if target.stream and idle_timeout is None:
            raise UsageError("following a stream needs follow_idle_timeout (seconds without a commit that end the epoch)")
        self.reader, self.target = reader, target
        self.root_local = root_local
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.options = {"columns": columns, "features": features, "label": label}
        self.validate_hash = validate_hash
        self.cache = ShardCache(decoded_cache_bytes)
        self.poll, self.timeout, self.idle_timeout = poll, timeout, idle_timeout
        self.broadcast = broadcast  # callable(value_on_rank0) -> value, None with one rank
        self.history: list[list[int]] = [list(h) for h in history]  # [batch index, version adopted]
        self.skip_batches = skip_batches
        self.emitted = 0
        self.version = -1  # last version adopted
        self.shards: list[_Shard] = []
        self.total = 0  # rows landed, all ranks
        self.pool = _Pool()
        self.plan: Optional[BatchPlan] = None
        self.manifest = None
        self.finished = False
        self._last_commit_at = time.monotonic()

    # ------------------------------------------------------------------ adopting commits

    def _entries_up_to(self, version: int) -> list:
        latest = self.reader.refresh()
        if version > latest.version:
            raise CommitConflictError(f"{self.reader.root}: version {version} is not in the log")
        return [self.reader.read_entry(v) for v in range(self.version + 1, version + 1)]

    def _adopt(self, version: int) -> None:
        """Add every shard committed up to ``version`` to the numbering and this rank's pool."""
        if version <= self.version:
            return
        if self.version < 0:
            snap: Snapshot = self.reader.snapshot(self.target.start_version)
            self.manifest = snap.manifest()
            new = list(snap.shards)
            self.version = snap.version
            rest = self._entries_up_to(version) if version > snap.version else []
        else:
            new, rest = [], self._entries_up_to(version)
        for e in rest:
            if e.remove and self.shards:
                raise CommitConflictError(f"{self.reader.root}: {e.describe()} removed shards while this loader "
                                          "followed the dataset; the followed epoch cannot continue on replaced data")
            new += list(e.add)
            if self.manifest is None and e.schema is not None:
                self.manifest = self.reader.snapshot(e.version).manifest()
        self.version = version
        if new:
            self._last_commit_at = time.monotonic()
        for entry in new:
            self._add_shard(entry)

    def _add_shard(self, entry: dict) -> None:
        name = stored_name(entry)
        where = f"{self.reader.root}, shard {name}"
        layout = ShardLayout.from_index_entry(entry)
        if self.plan is None:
            self.plan = BatchPlan([layout], shard_names=[name], manifest=self.manifest, **self.options)
        elif (layout.column_names, layout.column_encodings) != (self.shards[0].layout.column_names,
                                                                self.shards[0].layout.column_encodings):
            raise ShardFormatError(f"{where}: its columns differ from the dataset's first shard")
        start = self.total
        n = int(entry["samples"])
        self.shards.append(_Shard(entry, name, confined_path(self.root_local, name, where=where), layout, start))
        self.total += n
        first = start + ((self.rank - start) % self.world)  # this rank's first row number in the shard
        if first < start + n:
            self.pool.add(np.arange(first, start + n, self.world, dtype=np.int64))

    # ------------------------------------------------------------------ deciding (rank 0) and agreeing

    def _ended(self, snap: Snapshot) -> bool:
        if self.target.write_id is not None:
            w = snap.writes.get(self.target.write_id)
            if w is None or w.state in ("fenced", "replaced"):
                raise CommitConflictError(f"{self.reader.root}: the followed write {self.target.write_id} was "
                                          f"{'lost' if w is None else w.state} before it completed")
            return w.state == "complete"
        return time.monotonic() - self._last_commit_at > self.idle_timeout

    def _decide(self, need: int) -> tuple[int, bool]:
        """Rank 0's decision at a batch boundary: the version to adopt and whether the epoch ends
        once this rank's pool is drained. Waits while the pool cannot fill a batch."""
        deadline = time.monotonic() + self.timeout
        while True:
            snap = self.reader.refresh()
            ended = self._ended(snap)
            if snap.version > self.version:
                self._last_commit_at = time.monotonic()
            if ended or snap.version > self.version or self.pool.size >= need:
                return snap.version, ended
            if time.monotonic() > deadline:
                raise FollowTimeoutError(f"follow=True: no commit to {self.reader.root} for {self.timeout:.0f} s while "
                                         f"write {self.target.write_id} is still open; is the writer stuck?")
            time.sleep(self.poll)

    def _agree(self, need: int, k: int) -> tuple[int, bool]:
        if self.world == 1 or self.broadcast is None:
            return self._decide(need)
        return tuple(self.broadcast(lambda: self._decide(need)))

    # ------------------------------------------------------------------ iteration

    def _replay(self) -> None:
        """A resumed epoch: apply the recorded adoptions and draws of the batches already consumed."""
        steps = {k: v for k, v in self.history}
        for k in range(self.skip_batches):
            if k in steps:
                self._adopt(steps[k])
            self._draw(k, self.batch_size)
        self.emitted = self.skip_batches

    def _draw(self, k: int, n: int) -> np.ndarray:
        n = min(n, self.pool.size)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, k, self.rank])
            return self.pool.take_random(n, rng)
        return self.pool.take_front(n)

    def _end_shape(self) -> tuple[int, int]:
        """(steps every rank takes, rows in the last one), from the final row count alone, so all
        ranks agree: the largest share decides; smaller shares pad their last batch by one row."""
        largest = -(-self.total // self.world)
        if self.drop_last:
            steps = largest // self.batch_size
            return steps, self.batch_size
        steps = -(-largest // self.batch_size)
        return steps, largest - (steps - 1) * self.batch_size if steps else 0

    def __iter__(self) -> Iterator[PackedBatch]:
        if self.skip_batches:
            if not self.history:
                raise UsageError("a followed epoch's state has no adoption record to resume from")
            self._replay()
        if self.version < 0:
            self._adopt(self.target.start_version)
            self.history.append([0, self.version])
        k = self.emitted
        while True:
            ended = False
            if self.pool.size < self.batch_size or self.world > 1 or k % 8 == 0:
                version, ended = self._agree(self.batch_size, k)
                if version > self.version:
                    self._adopt(version)
                    self.history.append([k, version])
            if ended and self.pool.size < self.batch_size:
                break
            if self.pool.size >= self.batch_size:
                yield self._gather(self._draw(k, self.batch_size))
                k += 1
                self.emitted = k
        steps, last = self._end_shape()
        while k < steps:
            want = self.batch_size if k < steps - 1 else last
            rows = self._draw(k, want)
            if len(rows) < want:  # a smaller share: repeat some of this rank's rows, as Mosaic pads
                rng = np.random.default_rng([self.seed, self.epoch, k, self.rank, 1])
                mine = np.arange(self.rank, self.total, self.world, dtype=np.int64)
                rows = np.concatenate([rows, rng.choice(mine, size=want - len(rows))])
            yield self._gather(rows)
            k += 1
            self.emitted = k
        self.finished = True

    def _decoded(self, i: int):
        shard = self.shards[i]

        def load():
            if not os.path.exists(shard.path):
                if self._reads_in_place():
                    raise FileNotFoundError(f"shard {shard.name!r} of {self.reader.root} is listed in the log but "
                                            "missing: the dataset is incomplete")
                self._download(shard)
            with open(shard.path, "rb") as f:
                stored = f.read()
            e = shard.entry
            zipped = e.get("zip_data")
            hashes = dict((zipped or e["raw_data"]).get("hashes") or {})
            report = check_shard(stored, where=f"shard {shard.name!r}", compression=e.get("compression") if zipped else None,
                                 raw_bytes=int(e["raw_data"]["bytes"]), samples=shard.samples, stored_hashes=hashes,
                                 hash_names=pick_hash(hashes, self.validate_hash)).raise_first()
            return decode_shard(shard.name, shard.layout, report.raw, report.offsets)

        return self.cache.get(i, load)

    def _reads_in_place(self) -> bool:
        storage = self.reader.storage
        return storage.is_local and os.path.realpath(self.root_local) == os.path.realpath(storage.root)

    def _download(self, shard: _Shard) -> None:
        """Fetch a shard of a remote (or separately cached) dataset into the local folder."""
        data = self.reader.storage.read_bytes(shard.name)
        os.makedirs(os.path.dirname(shard.path), exist_ok=True)
        tmp = f"{shard.path}.{os.getpid()}.part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, shard.path)

    def _gather(self, rows: np.ndarray) -> PackedBatch:
        starts = np.fromiter((s.start for s in self.shards), np.int64, len(self.shards))
        sid = np.searchsorted(starts, rows, side="right") - 1
        local = rows - starts[sid]
        order = np.argsort(sid, kind="stable")
        ss = sid[order]
        cuts = [0, *(np.flatnonzero(ss[1:] != ss[:-1]) + 1).tolist(), len(rows)]
        groups = []
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            pos = order[c0:c1]
            groups.append((self._decoded(int(ss[c0])), local[pos], pos))
        return self.plan.gather(groups, len(rows), lambda n: np.empty(n, np.uint8))

    # ------------------------------------------------------------------ state

    def state(self, consumed: int) -> dict[str, Any]:
        """What resumes this followed epoch after ``consumed`` batches were trained on."""
        return {"start_version": self.target.start_version, "write_id": self.target.write_id,
                "stream": self.target.stream, "history": [h for h in self.history if h[0] <= consumed],
                "batches": consumed}
