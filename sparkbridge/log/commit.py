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

The rules are a list of named checks (:data:`CHECKS`, as delta-rs's conflict checker), each
either against one intervening entry ``e`` or against the latest state; README's table lists
them. A check raises (conflict, or :class:`Superseded`), or lets the next one decide.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Sequence

from sparkbridge import _faults
from sparkbridge.errors import CommitConflictError, DatasetExistsError, SchemaMismatchError, SparkbridgeError
from sparkbridge.log.entry import LogEntry, Operation, entry_name
from sparkbridge.log.snapshot import CHECKPOINT_INTERVAL, LogReader, Snapshot, checkpoint_bytes
from sparkbridge.storage import Storage

__all__ = ["Draft", "Superseded", "Check", "CHECKS", "commit", "check_conflicts", "write_checkpoint", "redraft"]

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
        return self.operation is Operation.CREATE


Verdict = Optional[bool]  # True: this intervening entry is settled, skip the later checks for it


@dataclass(frozen=True)
class Check:
    """One named conflict rule: ``against`` an intervening ``entry`` or the latest ``state``."""

    name: str
    against: str
    rule: str
    run: Callable[..., Verdict]


def _same_commit(d: Draft, e: LogEntry, root: str) -> Verdict:
    if e.commit_id == d.commit_id:
        raise Superseded(f"{e.describe()} is this very commit (an earlier try landed)", e)
    return None


def _fenced(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.write_id in e.fence:
        raise CommitConflictError(
            f"{root}: write {d.write_id} was fenced by a vacuum ({e.describe()}) because it made no progress "
            "for longer than the retention period; it is rolled back and its files may be deleted. Nothing "
            "of it is served: rerun the write")
    return None


def _vacuum_replans(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.operation is Operation.VACUUM:
        if e.operation is not Operation.VACUUM:
            raise CommitConflictError(f"{root}: {e.describe()} landed while vacuum planned; replan")
        return True
    return None


def _import_alone(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.operation is Operation.IMPORT:
        raise CommitConflictError(f"{root}: {e.describe()} landed while the index was imported")
    return None


def _vacuum_is_transparent(d: Draft, e: LogEntry, root: str) -> Verdict:
    return True if e.operation is Operation.VACUUM else None


def _create_once(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.operation is Operation.CREATE and e.write_id != d.write_id:
        raise DatasetExistsError(
            f"{root}: a dataset was committed while this write ran ({e.describe()}); pass "
            "mode='append' to add to it or mode='overwrite' to replace it")
    return None


def _overwrite_sees_all(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.replaces and e.changes_data and e.write_id != d.write_id:
        raise CommitConflictError(
            f"{root}: {e.describe()} landed while this overwrite was running; committing would "
            "drop its rows unseen. Nothing was committed: rerun the overwrite")
    return None


def _replaced_meanwhile(d: Draft, e: LogEntry, root: str) -> Verdict:
    if e.replaces and e.write_id != d.write_id:
        raise CommitConflictError(
            f"{root}: the dataset was replaced ({e.describe()}) while this {d.operation} was running; "
            "nothing was committed. Rerun it against the new data")
    return None


def _schema_changed(d: Draft, e: LogEntry, root: str) -> Verdict:
    if e.schema is not None and d.schema is not None and e.write_id != d.write_id \
            and e.schema.get("fingerprint") != d.schema.get("fingerprint"):
        raise SchemaMismatchError(
            f"{root}: the schema changed ({e.describe()}) while this {d.operation} was running; nothing was committed")
    return None


def _partition_claimed(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.operation is Operation.PARTITION and e.operation is Operation.PARTITION and e.write_id == d.write_id \
            and e.partition == d.partition:
        raise Superseded(f"partition {d.partition} of write {d.write_id} was already committed ({e.describe()})", e)
    return None


def _write_completed(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.operation in (Operation.PARTITION, Operation.COMPLETE) and e.operation is Operation.COMPLETE \
            and e.write_id == d.write_id:
        raise Superseded(f"write {d.write_id} is already complete ({e.describe()})", e)
    return None


def stream_mismatch(txn: Optional[dict], recorded_query: Optional[str], root: str) -> Optional[str]:
    """Why a stream batch must be refused, or None. A stream is its ``app_id`` *and* its
    checkpoint: Spark keeps the query id in the checkpoint, so a restart (or a checkpoint moved
    with its files) keeps it, while a fresh checkpoint gets a new one and restarts batch ids at 0.
    Batches of that new query under a reused ``app_id`` would look committed and be skipped: rows
    lost without a word (issue 22 item 7). Entries without a query id (written before it was
    recorded, or by a Spark Connect client that cannot read it) are not compared."""
    if txn is None or not txn.get("query_id") or not recorded_query or recorded_query == txn["query_id"]:
        return None
    return (f"{root}: stream app_id {txn['app_id']!r} was committed by another checkpoint (query {recorded_query}); "
            f"this query ({txn['query_id']}, batch {txn['batch_id']}) started from another checkpoint, so its batch "
            "ids would be taken for ones already committed and its rows skipped. Nothing was committed: give this "
            "stream a new app_id, or restart it from its own checkpoint")


def _stream_identity(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.txn is not None and e.txn is not None and e.txn.get("app_id") == d.txn["app_id"]:
        message = stream_mismatch(d.txn, e.txn.get("query_id"), root)
        if message:
            raise CommitConflictError(message)
    return None


def _state_stream_identity(d: Draft, latest: Snapshot) -> Verdict:
    if d.txn is not None:
        message = stream_mismatch(d.txn, latest.txn_queries.get(d.txn["app_id"]), latest.root)
        if message:
            raise CommitConflictError(message)
    return None


def _batch_committed(d: Draft, e: LogEntry, root: str) -> Verdict:
    if d.txn is not None and e.txn is not None and e.txn.get("app_id") == d.txn["app_id"] \
            and int(e.txn["batch_id"]) >= int(d.txn["batch_id"]):
        raise Superseded(f"batch {d.txn['batch_id']} of stream {d.txn['app_id']} is already committed "
                         f"({e.describe()})", e)
    return None


def _state_fenced(d: Draft, latest: Snapshot) -> Verdict:
    if d.write_id in latest.fenced:
        raise CommitConflictError(f"{latest.root}: write {d.write_id} was fenced by a vacuum (rolled back); "
                                  "rerun the write")
    return None


def _state_write_open(d: Draft, latest: Snapshot) -> Verdict:
    if d.operation not in (Operation.PARTITION, Operation.COMPLETE):
        return None
    w = latest.writes.get(d.write_id)
    if w is None:
        raise CommitConflictError(f"{latest.root}: write {d.write_id} was never begun in the log")
    if w.state == "complete":
        raise Superseded(f"write {d.write_id} is already complete", None)
    if w.state != "open":
        raise CommitConflictError(f"{latest.root}: write {d.write_id} is {w.state}, no longer open; nothing was "
                                  "committed")
    if d.operation is Operation.PARTITION and d.partition in w.partitions:
        raise Superseded(f"partition {d.partition} of write {d.write_id} was already committed", None)
    return None


def _state_batch_committed(d: Draft, latest: Snapshot) -> Verdict:
    if d.txn is not None and latest.txns.get(d.txn["app_id"], -1) >= int(d.txn["batch_id"]):
        raise Superseded(f"batch {d.txn['batch_id']} of stream {d.txn['app_id']} is already committed", None)
    return None


def _state_schema_matches(d: Draft, latest: Snapshot) -> Verdict:
    if d.operation in (Operation.APPEND, Operation.STREAM) and latest.schema is not None \
            and d.schema is not None and d.schema.get("fingerprint") != latest.schema.get("fingerprint"):
        raise SchemaMismatchError(f"cannot append to {latest.root}: its schema (version {latest.version}) differs "
                                  "from this data's")
    return None


def _state_no_data_on_an_open_schema(d: Draft, latest: Snapshot) -> Verdict:
    """Why: a fence rolls an open write back, schema included; rows another write committed on a
    schema only that open write introduced would then not fit the dataset."""
    if d.operation not in (Operation.APPEND, Operation.STREAM, Operation.CREATE):
        return None
    for w in latest.open_writes:
        if w.write_id != d.write_id and w.mode in ("create", "overwrite") and _fingerprint(w.prior_schema) != \
                _fingerprint(latest.schema):
            raise CommitConflictError(
                f"{latest.root}: write {w.write_id} ({w.mode}, per partition, open since version {w.begun_at}) set "
                f"the schema this {d.operation} would commit on; nothing was committed. Rerun once it completes, "
                "or once a vacuum fenced it")
    return None


def _fingerprint(schema: Optional[dict]) -> Optional[str]:
    return None if schema is None else schema.get("fingerprint")


#: every conflict rule, in the order they are checked (README "The dataset log" shows this table)
CHECKS: tuple[Check, ...] = (
    Check("same-commit", "entry", "the entry is this very commit (an ambiguous PUT landed): done", _same_commit),
    Check("fenced", "entry", "a vacuum fenced this write: refused", _fenced),
    Check("vacuum-replans", "entry", "a vacuum conflicts with any entry but a vacuum: it plans again", _vacuum_replans),
    Check("import-alone", "entry", "an import conflicts with any entry", _import_alone),
    Check("vacuum-is-transparent", "entry", "a vacuum conflicts with no write (unless it fenced it)",
          _vacuum_is_transparent),
    Check("create-once", "entry", "a create conflicts with any entry of another write: DatasetExistsError",
          _create_once),
    Check("overwrite-sees-all", "entry", "an overwrite (or import) conflicts with another write's data change",
          _overwrite_sees_all),
    Check("replaced-meanwhile", "entry", "anything conflicts with another write's overwrite or import",
          _replaced_meanwhile),
    Check("schema-changed", "entry", "a schema other than this write's: SchemaMismatchError", _schema_changed),
    Check("partition-claimed", "entry", "the same partition of the same write: superseded", _partition_claimed),
    Check("write-completed", "entry", "a partition or complete after this write's complete: superseded",
          _write_completed),
    Check("stream-identity", "entry", "a stream batch of the same app_id from another checkpoint: refused",
          _stream_identity),
    Check("batch-committed", "entry", "a stream batch at or below a committed one: superseded", _batch_committed),
    Check("fenced", "state", "the write is fenced: refused", _state_fenced),
    Check("write-open", "state", "a partition or complete needs its write begun and open (complete: superseded)",
          _state_write_open),
    Check("stream-identity", "state", "a stream batch of the same app_id from another checkpoint: refused",
          _state_stream_identity),
    Check("batch-committed", "state", "the stream batch is committed: superseded", _state_batch_committed),
    Check("schema-matches", "state", "an append or stream needs the dataset's schema: SchemaMismatchError",
          _state_schema_matches),
    Check("no-data-on-an-open-schema", "state", "no rows on a schema an open create/overwrite introduced",
          _state_no_data_on_an_open_schema),
)


def check_conflicts(draft: Draft, intervening: Sequence[LogEntry], latest: Snapshot) -> None:
    """Raise when ``intervening`` (the entries after ``draft.read_version``) conflict with the draft,
    :class:`Superseded` when they already hold its effect; return when it may commit on top."""
    for e in intervening:
        for check in CHECKS:
            if check.against == "entry" and check.run(draft, e, latest.root):
                break
    for check in CHECKS:
        if check.against == "state":
            check.run(draft, latest)


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
            try:
                reader.refresh()
            except Exception as exc:
                # the entry landed: this write IS committed. Reporting a transient read error as a
                # failure would make the caller rerun it and add its rows twice (issue 22 item 12)
                logger.warning("committed %s to %s, but re-reading the log failed (%s: %s); the reader "
                               "starts over on its next use", entry.describe(), storage.root, type(exc).__name__, exc)
                reader.forget()
                return entry
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
        latest = reader.latest()
        # the state is only serialized: the latest one needs no copy (a copy of 100,000 shard
        # entries took longer than writing them)
        snap = latest if latest.version == version else reader.snapshot(version)
        storage.write_bytes_atomic(f"_log/{version:020d}.checkpoint.json", checkpoint_bytes(snap))
        return True
    except Exception as exc:  # never fail a committed write over its cache
        logger.warning("could not write the checkpoint of version %d of %s: %s", version, storage.root, exc)
        return False


def redraft(draft: Draft, **changes) -> Draft:
    """A copy of ``draft`` with changes (a new commit id unless one is given)."""
    changes.setdefault("commit_id", uuid.uuid4().hex)
    return replace(draft, **changes)
