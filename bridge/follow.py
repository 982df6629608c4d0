"""The followed epoch: train on a dataset while it is written, batch by batch as commits land.

A loader built with ``follow=True`` reads its first epoch from the dataset log as it grows: every
shard of the version it starts on, then the shards of each new log entry (a partition committed by
``write_mds(commit="partition")``, a Structured Streaming micro-batch from ``mds_sink``). The epoch
ends when the followed write is marked complete, or — for a stream — when no commit lands for
``idle_timeout`` seconds. Later epochs read the finished version in the loader's order (``shuffle_algo``).

Order. Rows are numbered in log order (version, then shard, then row); rank ``r`` of ``w`` owns
the rows numbered ``r mod w``, so ranks are disjoint and their shares differ by at most one row.
A step is taken only when every rank can fill its batch; once the write has ended, the largest
share decides how many steps remain and a smaller share pads its last batch by repeating its own
rows (any rows, for a rank that owns none), as Mosaic pads, so every rank takes the same number of
steps. Padded rows are the last ``padding[k]`` rows of batch ``k`` (the loader's ``padding``), so
a loss or a metric can mask them. Without shuffling a rank reads its rows in log order; with
``shuffle=True`` each batch is drawn at random from the rows that have landed and not yet been
read — a shuffle over what is available so far, not over the whole dataset: early batches can
only mix the first partitions. ``bench/shuffle.py`` measures how close it gets to a global
shuffle (the shuffle score).

Mixing pool (``follow_shuffle_rows=N``, with ``shuffle=True``). A loader that keeps pace with the
writer drains each partition as it lands, so the epoch follows landing order (score 0.15 in
``bench/shuffle.py``). With ``N`` > 0 a step is taken only while every rank holds at least
``max(batch_size, ceil(N / world))`` landed, unread rows: each batch is drawn uniformly from all
of them, and the loader waits (reading the log every ``follow_poll``) while fewer have landed.
Once the write has ended the hold is lifted: the rest, however many rows that is (a write that
completes with fewer than ``N`` rows included), is drawn as at the end of any followed epoch.
``N`` trades mixing for time to first batch: the first batch comes once about ``N`` rows have
landed. The hold is rank 0's value, sent with every step's facts (ranks cannot disagree), and it
is recorded in ``state()``; ``N`` = 0 is the loader without a pool.

Lockstep by construction (torchrun). At every batch boundary — a step, a wait for commits, the
end — every rank takes part in one exchange: rank 0 contributes the facts (the version to adopt,
whether the write has ended), every rank its failure if it has one. Each rank adopts exactly that
version, so all hold the same row total, and whether a step is taken, waited for or is the last
follows from that total alone. No rank decides from its own pool, and no rank leaves the
exchanges while another stays: an error on any rank (a timeout, a replaced or fenced write seen
by rank 0, a shard one rank could not read) is raised on every rank, same class and message.

Memory. Decoded shards stay within ``decoded_cache_bytes``; once the landed data outgrows it,
shards are decompressed once into a spill folder on local disk and memory-mapped from there
(page cache), so a shuffled draw does not decompress evicted shards again every batch.

Determinism and resumption. New commits are adopted only at batch boundaries and each adoption
is recorded (batch index → version); the draws depend only on the seed, the rank, the batch
index and that record (not on when commits landed, nor on the pool's hold, which only decides
*when* a step is taken). ``state()`` is that record plus the number of batches consumed and the
hold: a resumed loader replays the draws without reading a byte and continues with exactly the
rows the run had not seen. The record holds one pair per adoption, and an adoption needs a new
log version, so it is bounded by the commits of the followed write (a partition each), not by
the rows or the batches.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from sparkbridge.bridge.batch import BatchPlan, PackedBatch
from sparkbridge.bridge.cache import ShardCache
from sparkbridge.bridge.distributed import portable_error, rebuilt_error
from sparkbridge.bridge.shard_source import LoggedShards
from sparkbridge.errors import CommitConflictError, FollowTimeoutError, ShardFormatError, UsageError
from sparkbridge.format.index import stored_name
from sparkbridge.format.mds import ShardLayout
from sparkbridge.format.paths import confined_path
from sparkbridge.log.snapshot import LogReader, Snapshot

__all__ = ["FollowTarget", "Follower", "check_shuffle_rows", "find_target"]

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


class _Pool:
    """This rank's landed, unread rows (global numbers), with O(batch) draws and removals.

    The live rows are ``rows[head:end]``: a front draw moves ``head`` (nothing is shifted), a
    random draw fills its holes with the tail's survivors and moves ``end``; the buffer grows by
    doubling and is compacted only when it is full, so every operation costs O(rows drawn or
    added), amortized, whatever the pool's size (a 40M-row pool used to cost 63 ms a batch).
    ``touched`` counts the elements the pool wrote or scanned: the structural cost, for tests."""

    def __init__(self) -> None:
        self.rows = np.empty(0, np.int64)
        self.head = 0
        self.end = 0
        self.touched = 0

    @property
    def size(self) -> int:
        return self.end - self.head

    def add(self, new: np.ndarray) -> None:
        n = len(new)
        if self.end + n > len(self.rows):
            live = self.size
            if live + n <= len(self.rows) // 2:  # room enough once compacted
                target = self.rows
            else:
                target = np.empty(max(2 * (live + n), 1024), np.int64)
            target[:live] = self.rows[self.head:self.end]  # numpy copies overlapping ranges safely
            self.rows, self.head, self.end = target, 0, live
            self.touched += live
        self.rows[self.end:self.end + n] = new
        self.end += n
        self.touched += n

    def take_front(self, n: int) -> np.ndarray:
        out = self.rows[self.head:self.head + n].copy()
        self.head += n
        self.touched += n
        return out

    def take_random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        size = self.size
        # numpy draws n of size without replacement in O(n) (Floyd's algorithm) when size > 50 n,
        # else by a partial shuffle of size <= 50 n: O(batch) either way
        picks = rng.choice(size, size=n, replace=False)
        live = self.rows[self.head:self.end]
        out = live[picks]
        # fill the holes with the tail's survivors: the survivors' positions stay deterministic
        tail_start = size - n
        tail_keep = np.ones(n, bool)
        tail_keep[picks[picks >= tail_start] - tail_start] = False
        holes = picks[picks < tail_start]
        live[holes] = live[np.flatnonzero(tail_keep) + tail_start]
        self.end -= n
        self.touched += 3 * n
        return out


@dataclass(frozen=True)
class _Facts:
    """What every rank acts on at a batch boundary, decided by rank 0: the version to adopt and
    whether the followed write has ended (its row count is then final)."""

    version: int
    ended: bool
    hold: int = 0  # rank 0's follow_shuffle_rows: the landed, unread rows a step needs (all ranks)


_WAIT, _DONE = "wait", "done"


class Follower:
    """One rank's followed epoch (see the module doc). Built by the loader; iterate it once.

    Lockstep by construction: at every batch boundary all ranks take part in one exchange
    (``exchange``, an all-gather) in which rank 0 contributes the facts (:class:`_Facts`) and
    every rank its failure, if any. Every rank then adopts exactly the version decided, so all
    hold the same shards and the same row total; whether a step is taken, waited for or is the
    last is computed from that total alone (rank ``r`` owns the rows ``r mod world``, each step
    takes ``batch_size`` of each rank's rows), so every rank takes the same steps and walks the
    same collectives. A failure on any rank (rank 0's decision: a timeout, a replaced or fenced
    write; or a shard another rank could not read) is raised on every rank at that exchange."""

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
        exchange: Optional[Callable[[Any], list]] = None,
        shuffle_rows: int = 0,
    ) -> None:
        if target.stream and idle_timeout is None:
            raise UsageError("following a stream needs follow_idle_timeout (seconds without a commit that end the epoch)")
        if world > 1 and exchange is None:
            raise UsageError("a followed epoch on several ranks needs an exchange between them (torch.distributed)")
        self.reader, self.target = reader, target
        self.root_local = root_local
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.options = {"columns": columns, "features": features, "label": label}
        self.validate_hash = validate_hash
        self.cache = ShardCache(decoded_cache_bytes)
        storage = reader.storage
        self.files = LoggedShards(
            root_local=root_local, storage=storage, source=str(reader.root), validate_hash=validate_hash,
            in_place=storage.is_local and os.path.realpath(root_local) == os.path.realpath(storage.root),
            spill_dir=self._spill_folder)
        self.poll, self.timeout, self.idle_timeout = poll, timeout, idle_timeout
        self.exchange = exchange  # callable(obj) -> [obj of rank 0, obj of rank 1, ...]; None with one rank
        self.shuffle_rows = int(shuffle_rows)  # this rank's (check_shuffle_rows); rank 0's is used
        self.hold = self.shuffle_rows  # the hold in effect: rank 0's, from the facts
        self.history: list[list[int]] = [list(h) for h in history]  # [batch index, version adopted]
        self.skip_batches = skip_batches
        self.emitted = 0
        self.version = -1  # last version adopted
        self.shards: list[_Shard] = []
        self._starts = np.empty(0, np.int64)  # the shards' first row numbers, grown by doubling
        self.total = 0  # rows landed, all ranks
        self.landed_bytes = 0  # decompressed bytes of the landed shards
        self.pool = _Pool()
        self.plan: Optional[BatchPlan] = None
        self.manifest = None
        self.finished = False
        self.padding: dict[int, int] = {}  # batch index -> how many of its last rows are repeats
        self._spill_dir: Optional[str] = None
        self._ended = False
        self._in_end = False
        self._said_hold = False
        self._wait_since: Optional[float] = None
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
        path = confined_path(self.root_local, name, where=where)
        self.shards.append(_Shard(entry, name, path, layout, start))
        self.files.add(entry, name=name, path=path, layout=layout)
        if len(self.shards) > len(self._starts):
            grown = np.empty(max(64, 2 * len(self._starts)), np.int64)
            grown[:len(self.shards) - 1] = self._starts[:len(self.shards) - 1]
            self._starts = grown
        self._starts[len(self.shards) - 1] = start
        self.total += n
        self.landed_bytes += int(entry["raw_data"]["bytes"])
        first = start + ((self.rank - start) % self.world)  # this rank's first row number in the shard
        if first < start + n:
            self.pool.add(np.arange(first, start + n, self.world, dtype=np.int64))

    # ------------------------------------------------------------------ deciding (rank 0) and agreeing

    def _landed(self, rank: int) -> int:
        """Rows rank ``rank`` owns among those landed: the same figure on every rank."""
        return max(0, -(-(self.total - rank) // self.world))

    def _need(self, hold: int) -> int:
        """Unread rows every rank must hold for a step of the main phase: a batch, and with a
        mixing pool (``hold`` rows of the write) its share, until the write has ended."""
        if self._ended or not hold:
            return self.batch_size
        return max(self.batch_size, -(-hold // self.world))

    def _smallest(self, k: int) -> int:
        """Unread rows of the rank with the fewest before step ``k`` of the main phase (every step
        took ``batch_size`` rows of each rank): whether every rank can fill a batch."""
        return self._landed(self.world - 1) - k * self.batch_size

    def _write_ended(self, snap: Snapshot) -> bool:
        if self.target.write_id is not None:
            w = snap.writes.get(self.target.write_id)
            if w is None or w.state in ("fenced", "replaced"):
                raise CommitConflictError(f"{self.reader.root}: the followed write {self.target.write_id} was "
                                          f"{'lost' if w is None else w.state} before it completed")
            return w.state == "complete"
        return time.monotonic() - self._last_commit_at > self.idle_timeout

    def _decide(self, k: int) -> _Facts:
        """Rank 0's facts for step ``k``. The log is read when a rank could not fill the step, and
        every 8 steps (new commits widen the shuffle); never once the write has ended."""
        can_step = self._smallest(k) >= self._need(self.shuffle_rows) and not self._in_end
        if self._ended or (can_step and k % 8):
            return _Facts(self.version, self._ended, self.shuffle_rows)
        snap = self.reader.refresh()
        ended = self._write_ended(snap)
        if snap.version > self.version:
            self._last_commit_at = time.monotonic()
        if can_step or ended or snap.version > self.version:
            self._wait_since = None
        else:
            now = time.monotonic()
            if self._wait_since is None:
                self._wait_since = now
            elif now - self._wait_since > self.timeout:
                raise FollowTimeoutError(f"follow=True: no commit to {self.reader.root} for {self.timeout:.0f} s while "
                                         f"write {self.target.write_id} is still open; is the writer stuck?")
        return _Facts(snap.version, ended, self.shuffle_rows)

    def _agree(self, k: int, failure: Optional[BaseException]) -> _Facts:
        """The one exchange of a batch boundary (see the class doc): rank 0's facts for step ``k``,
        or the failure of any rank, raised on every rank."""
        facts = None
        if failure is None and self.rank == 0:
            try:
                facts = self._decide(k)
            except Exception as exc:
                failure = exc
        if self.exchange is None:
            if failure is not None:
                raise failure
            return facts
        everyone = self.exchange({"facts": facts, "failure": portable_error(failure) if failure is not None else None})
        for r, theirs in enumerate(everyone):
            if theirs["failure"] is None:
                continue
            if r == self.rank:
                raise failure
            raise rebuilt_error(theirs["failure"], r)
        return everyone[0]["facts"]

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
        ranks agree: the largest share decides; smaller shares pad their last batch."""
        largest = self._landed(0)
        if self.drop_last:
            steps = largest // self.batch_size
            return steps, self.batch_size
        steps = -(-largest // self.batch_size)
        return steps, largest - (steps - 1) * self.batch_size if steps else 0

    def _rows(self, k: int, facts: _Facts) -> Any:
        """Step ``k``'s rows for this rank after adopting ``facts``, or _WAIT / _DONE (the same on
        every rank: computed from the adopted total and ``k`` alone)."""
        if facts.version > self.version:
            self._adopt(facts.version)
            self.history.append([k, self.version])
        self._ended = self._ended or facts.ended
        self.hold = facts.hold
        if not self._in_end and self._smallest(k) >= self._need(facts.hold):
            return self._draw(k, self.batch_size)
        if not self._ended:
            if not self._said_hold and self._smallest(k) >= self.batch_size:
                self._said_hold = True
                logger.info("%s: follow_shuffle_rows=%d: waiting until that many landed rows are unread (or the write "
                            "ends) before step %d", self.reader.root, facts.hold, k)
            return _WAIT
        self._in_end = True
        steps, last = self._end_shape()
        if k >= steps:
            return _DONE
        want = self.batch_size if k < steps - 1 else last
        rows = self._draw(k, want)
        pad = want - len(rows)
        if pad:  # a smaller share: repeat some rows (as Mosaic pads), flagged by self.padding[k]
            rng = np.random.default_rng([self.seed, self.epoch, k, self.rank, 1])
            mine = self._landed(self.rank)
            if mine:  # this rank's own rows
                extra = self.rank + self.world * rng.integers(0, mine, size=pad)
            else:  # it owns none (fewer rows than ranks): any row
                extra = rng.integers(0, self.total, size=pad)
            rows = np.concatenate([rows, extra.astype(np.int64)])
            self.padding[k] = pad
        return rows

    def __iter__(self) -> Iterator[PackedBatch]:
        failure: Optional[BaseException] = None
        try:
            if self.skip_batches:
                if not self.history:
                    raise UsageError("a followed epoch's state has no adoption record to resume from")
                self._replay()
            if self.version < 0:
                self._adopt(self.target.start_version)
                self.history.append([0, self.version])
        except Exception as exc:
            failure = exc
        k = self.emitted
        facts = self._agree(k, failure)
        while True:
            batch, rows = None, _WAIT
            try:
                rows = self._rows(k, facts)
                if not isinstance(rows, str):
                    batch = self._gather(rows)
            except Exception as exc:
                failure = exc
            if rows is _WAIT and failure is None:
                time.sleep(self.poll)
            # every rank walks here once per step, wait and end included: the next step's facts,
            # and any rank's failure, reach every rank before this batch is handed out
            nxt = k + 1 if batch is not None else k
            if rows is _DONE and self.exchange is None:
                break
            facts = self._agree(nxt, failure)
            if rows is _DONE:
                break
            if batch is not None:
                yield batch
                k = nxt
                self.emitted = k
        self.finished = True

    # ------------------------------------------------------------------ reading shards

    def _spills(self) -> bool:
        """Whether shards are read through files on local disk, memory-mapped (page cache, not
        ``decoded_cache_bytes``): once the landed data no longer fits the budget, a shuffled draw
        would otherwise evict and decompress shards again almost every batch. (Unshuffled, a
        rank reads its rows in log order: a shard is needed for consecutive batches only.)"""
        return self.shuffle and self.landed_bytes > self.cache.max_bytes

    def _decoded(self, i: int):
        """Shard ``i``, checked (:class:`~sparkbridge.bridge.shard_source.LoggedShards`): decoded
        in memory, or — spilling — mapped from its decompressed file (the stored file itself when
        it is not compressed), checked once per file."""
        return self.cache.get(i, lambda: self.files.load(i, spill=self._spills()))

    def _spill_folder(self) -> str:
        if self._spill_dir is None:
            from sparkbridge.bridge.spill import new_spill_folder, remove_stale_spill_folders

            remove_stale_spill_folders()
            self._spill_dir = new_spill_folder(self.reader.root)
            os.makedirs(self._spill_dir, mode=0o700, exist_ok=True)
            logger.info("%s: the followed data outgrew decoded_cache_bytes; shards are decompressed once into %s "
                        "and memory-mapped from there (removed when the epoch ends)", self.reader.root, self._spill_dir)
        return self._spill_dir

    def close(self) -> None:
        """Drop the decoded shards and remove the spill folder."""
        self.cache.clear()
        self.files.forget_spilled()
        if self._spill_dir is not None:
            from sparkbridge.bridge.spill import remove_spill_folder

            remove_spill_folder(self._spill_dir)
            self._spill_dir = None

    def _gather(self, rows: np.ndarray) -> PackedBatch:
        starts = self._starts[:len(self.shards)]
        sid = np.searchsorted(starts, rows, side="right") - 1
        local = rows - starts[sid]
        order = np.argsort(sid, kind="stable")
        ss = sid[order]
        cuts = [0, *(np.flatnonzero(ss[1:] != ss[:-1]) + 1).tolist(), len(rows)]
        groups = []
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            pos = order[c0:c1]
            groups.append((self._decoded(int(ss[c0])), local[pos], pos))
        batch = self.plan.gather(groups, len(rows), lambda n: np.empty(n, np.uint8))
        batch.ids = rows  # named by a TransformError
        return batch

    # ------------------------------------------------------------------ state

    def state(self, consumed: int) -> dict[str, Any]:
        """What resumes this followed epoch after ``consumed`` batches were trained on."""
        return {"start_version": self.target.start_version, "write_id": self.target.write_id,
                "stream": self.target.stream, "history": [h for h in self.history if h[0] <= consumed],
                "batches": consumed, "shuffle_rows": self.hold}


def check_shuffle_rows(value: Any, *, shuffle: bool) -> int:
    """``follow_shuffle_rows`` as a row count (None: 0, no pool), validated once. Why an error
    without ``shuffle=True``: an unshuffled followed epoch reads rows in log order, so a pool
    would only delay the first batch."""
    if value is None:
        return 0
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise UsageError(f"follow_shuffle_rows must be a number of rows >= 0 (the landed, unread rows each batch of a "
                         f"followed epoch is drawn from), got {value!r}")
    if value and not shuffle:
        raise UsageError(f"follow_shuffle_rows={value} mixes the rows of a followed epoch; it needs shuffle=True "
                         "(unshuffled, a followed epoch reads its rows in log order)")
    return int(value)

