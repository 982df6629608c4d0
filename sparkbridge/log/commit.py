"""Committing to the dataset log: put-if-absent of the next version, re-read and retry on a race.

The protocol (optimistic, as Delta Lake's): a writer plans against the version it read
(``read_version``), writes its shards, then tries to create ``_log/<latest + 1>.json``. When another
writer took that number first, it reads the entries that landed since ``read_version`` and decides:

* they do not conflict (two appends with the same schema; a vacuum that did not fence it; partition
  commits of other partitions) → try again at the new latest + 1;
* they conflict → :class:`CommitConflictError` / :class:`SchemaMismatchError` /
  :class:`DatasetExistsError` naming the entry that conflicted; nothing of this commit is visible;
* they already contain this commit's effect → :class:`Superseded` (the partition was claimed by
  another attempt, the stream batch was committed before a replay): the caller discards its files.

The rules, by what the draft does (intervening entry ``e``):

============================  ==============================================================
draft                         conflicts with
============================  ==============================================================
create (``mode="error"``)     any ``e`` that changes data: the dataset now exists
overwrite (write or begin)    any ``e`` that changes data: its rows would vanish unseen
append / stream / partition   an ``e`` that replaces the dataset (overwrite, import) or
                              changes the schema; a partition or complete of a write that is
                              no longer open
anything                      a vacuum ``e`` that fenced this write
============================  ==============================================================
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import fields, replace
from typing import Optional, Sequence

from sparkbridge import _faults
from sparkbridge.errors import CommitConflictError, DatasetExistsError, SchemaMismatchError, SparkbridgeError
from sparkbridge.log.entry import LogEntry, entry_name
from sparkbridge.log.snapshot import CHECKPOINT_INTERVAL, LogReader, Snapshot, checkpoint_bytes
from sparkbridge.storage import Storage

__all__ = ["Draft", "Superseded", "commit", "check_conflicts", "write_checkpoint", "redraft"]

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 200


class Superseded(SparkbridgeError):
    """The log already holds what this commit would add (a claimed partition, a committed stream
    batch): the caller drops its files. ``entry`` is the entry that holds it."""

    def __init__(self, message: str, entry: Optional[LogEntry]) -> None:
        super().__init__(message)
        self.entry = entry


class Draft(LogEntry):
    """A log entry before it has a version number: the same fields, committed by :func:`commit`."""

    def entry(self, version: int, timestamp: float) -> LogEntry:
        values = {f.name: getattr(self, f.name) for f in fields(LogEntry)}
        return LogEntry(**{**values, "version": version, "timestamp": timestamp})

    @property
    def creates(self) -> bool:
        return self.operation in ("write", "begin") and self.mode == "create"


def check_conflicts(draft: Draft, intervening: Sequence[LogEntry], latest: Snapshot) -> None:
    """Raise when ``intervening`` (the entries after ``draft.read_version``) conflict with the draft,
    :class:`Superseded` when they already hold its effect; return when it may commit on top."""
    for e in intervening:
        if e.commit_id == draft.commit_id:
            raise Superseded(f"{e.describe()} is this very commit (an earlier try landed)", e)
        if draft.write_id in e.fence:
            raise CommitConflictError(
                f"{latest.root}: write {draft.write_id} was fenced by a vacuum ({e.describe()}) because it "
                "made no progress for longer than the retention period; its files may be deleted. Nothing "
                "of it was committed: rerun the write")
        if draft.operation == "vacuum":
            if e.operation != "vacuum":
                raise CommitConflictError(f"{latest.root}: {e.describe()} landed while vacuum planned; replan")
            continue
        if draft.operation == "import":
            raise CommitConflictError(f"{latest.root}: {e.describe()} landed while the index was imported")
        if e.operation == "vacuum":
            continue
        if draft.creates and e.changes_data:
            raise DatasetExistsError(
                f"{latest.root}: a dataset was committed while this write ran ({e.describe()}); pass "
                "mode='append' to add to it or mode='overwrite' to replace it")
        if draft.replaces and e.changes_data and e.write_id != draft.write_id:
            raise CommitConflictError(
                f"{latest.root}: {e.describe()} landed while this overwrite was running; committing would "
                "drop its rows unseen. Nothing was committed: rerun the overwrite")
        if e.replaces and e.write_id != draft.write_id:
            raise CommitConflictError(
                f"{latest.root}: the dataset was replaced ({e.describe()}) while this "
                f"{draft.operation} was running; nothing was committed. Rerun it against the new data")
        if e.schema is not None and draft.schema is not None and e.write_id != draft.write_id \
                and e.schema.get("fingerprint") != draft.schema.get("fingerprint"):
            raise SchemaMismatchError(
                f"{latest.root}: the schema changed ({e.describe()}) while this {draft.operation} was "
                "running; nothing was committed")
        if draft.operation == "partition" and e.operation == "partition" and e.write_id == draft.write_id \
                and e.partition == draft.partition:
            raise Superseded(f"partition {draft.partition} of write {draft.write_id} was already committed "
                             f"({e.describe()})", e)
        if draft.operation in ("partition", "complete") and e.operation == "complete" and e.write_id == draft.write_id:
            raise Superseded(f"write {draft.write_id} is already complete ({e.describe()})", e)
        if draft.txn is not None and e.txn is not None and e.txn.get("app_id") == draft.txn["app_id"] \
                and int(e.txn["batch_id"]) >= int(draft.txn["batch_id"]):
            raise Superseded(f"batch {draft.txn['batch_id']} of stream {draft.txn['app_id']} is already "
                             f"committed ({e.describe()})", e)
    _check_against_state(draft, latest)


def _check_against_state(draft: Draft, latest: Snapshot) -> None:
    """What the latest state itself forbids (independent of when it happened)."""
    if draft.write_id in latest.fenced:
        raise CommitConflictError(f"{latest.root}: write {draft.write_id} was fenced by a vacuum; rerun the write")
    if draft.operation in ("partition", "complete"):
        w = latest.writes.get(draft.write_id)
        if w is None:
            raise CommitConflictError(f"{latest.root}: write {draft.write_id} was never begun in the log")
        if w.state == "complete":
            raise Superseded(f"write {draft.write_id} is already complete", None)
        if draft.operation == "partition" and draft.partition in w.partitions:
            raise Superseded(f"partition {draft.partition} of write {draft.write_id} was already committed", None)
    if draft.txn is not None and latest.txns.get(draft.txn["app_id"], -1) >= int(draft.txn["batch_id"]):
        raise Superseded(f"batch {draft.txn['batch_id']} of stream {draft.txn['app_id']} is already committed", None)
    if draft.operation in ("write", "begin", "stream") and not draft.replaces and latest.schema is not None \
            and draft.schema is not None and draft.schema.get("fingerprint") != latest.schema.get("fingerprint"):
        raise SchemaMismatchError(f"cannot append to {latest.root}: its schema (version {latest.version}) differs "
                                  "from this data's")


def commit(storage: Storage, draft: Draft, *, reader: Optional[LogReader] = None,
           max_attempts: int = _MAX_ATTEMPTS) -> LogEntry:
    """Create the draft's entry at the next free version; returns the committed entry."""
    reader = reader or LogReader(storage)
    delay = 0.005
    for attempt in range(max_attempts):
        latest = reader.refresh()
        intervening = reader.entries_after(draft.read_version) if latest.version > draft.read_version else []
        try:
            check_conflicts(draft, intervening, latest)
        except Superseded as exc:
            if exc.entry is not None and exc.entry.commit_id == draft.commit_id:
                return exc.entry  # an earlier try of this very commit landed (an ambiguous PUT)
            raise
        version = latest.version + 1
        entry = draft.entry(version, time.time())
        _faults.point("log.commit.before_put")
        if storage.put_if_absent(entry_name(version), entry.to_bytes()):
            _faults.point("log.commit.after_put")
            logger.debug("committed %s to %s", entry.describe(), storage.root)
            reader.refresh()
            # whoever commits a version on the interval checkpoints it (tasks of a partitioned write
            # too): a replay then never reads more than CHECKPOINT_INTERVAL entries
            write_checkpoint(storage, reader, version)
            return entry
        logger.debug("%s: version %d was taken by another writer (try %d); re-reading the log",
                     storage.root, version, attempt + 1)
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.5)
    raise CommitConflictError(f"{storage.root}: gave up committing {draft.operation} of {draft.write_id} after "
                              f"{max_attempts} lost races; the dataset is being written very busily")


def write_checkpoint(storage: Storage, reader: LogReader, version: int) -> bool:
    """Write the checkpoint of ``version`` when it falls on the interval (best effort: a
    checkpoint is a cache of the replay, never a commit point)."""
    if version <= 0 or version % CHECKPOINT_INTERVAL:
        return False
    try:
        snap = reader.snapshot(version)
        storage.write_bytes_atomic(f"_log/{version:020d}.checkpoint.json", checkpoint_bytes(snap))
        return True
    except Exception as exc:  # never fail a committed write over its cache
        logger.warning("could not write the checkpoint of version %d of %s: %s", version, storage.root, exc)
        return False


def redraft(draft: Draft, **changes) -> Draft:
    """A copy of ``draft`` with changes (a new commit id unless one is given)."""
    changes.setdefault("commit_id", uuid.uuid4().hex)
    return replace(draft, **changes)
