"""A Spark write's commit: its shards become visible through one entry of the dataset log.

Steps of :class:`WriteJob` (``commit="job"``), and what a crash after each one leaves:

1. ``start``: read the latest version (the *base*), apply ``mode``; local roots get
   ``_staging/W/`` so attempts can ``os.mkdir`` in it. — Nothing visible; an empty folder.
2. tasks write shards: local under ``_staging/W/<attempt>/``, S3 under ``W/<attempt>/``. —
   Orphans only (``validate`` reports them, ``vacuum`` removes them once the write is fenced).
3. ``finish``: fsync the accepted attempts' files and folders, then (local) rename each into
   ``W/<attempt>/``. — Orphans only.
4. commit the log entry (put-if-absent; re-read and retry on a race; refuse on a conflict). — The
   dataset is at the base version (entry absent) or at the new one (entry present), never between.
   An ambiguous S3 answer is resolved by reading the entry back; when it cannot be resolved the
   files are *kept* (a vacuum removes them if the entry really is absent).
5. derived ``index.json``/``manifest.json``, a checkpoint, staging removed, vacuum. — The dataset
   is at the new version; stock readers may still see the previous one until the next commit or
   ``sparkbridge vacuum`` repairs the derived files.

No liveness is trusted: the job descriptor's heartbeat only tells a vacuum that the write is still
making progress; a vacuum that fences a live write makes its commit fail with a clear error, and
no commit ever deletes another writer's files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Optional, Sequence, Union

from sparkbridge.errors import (
    CommitConflictError,
    DatasetExistsError,
    SchemaMismatchError,
    UnsafePathError,
)
from sparkbridge.format.index import stored_name
from sparkbridge.format.manifest import ColumnSpec
from sparkbridge.log.commit import Draft, Superseded, commit
from sparkbridge.log.derived import sync_derived
from sparkbridge.log.entry import CommitUnit, Operation
from sparkbridge.log.layout import STAGING, is_write_id, job_file, new_run_id, new_write_id, staging_prefix
from sparkbridge.log.snapshot import LogReader, Snapshot
from sparkbridge.log.vacuum import vacuum
from sparkbridge.storage import Storage, publish_folders

__all__ = ["MODES", "WriteJob", "schema_diff", "schema_record"]

log = logging.getLogger(__name__)

MODES = ("error", "overwrite", "append")
HEARTBEAT_SECONDS = 60.0
#: ``write_mds``'s ``mode`` (what to do when a dataset exists) -> the log's operation (what the write does)
OPERATION_OF_MODE = {"error": Operation.CREATE, "append": Operation.APPEND, "overwrite": Operation.OVERWRITE}
_MODE_OF = {v.value: k for k, v in OPERATION_OF_MODE.items()}


def schema_record(*, columns: Sequence[ColumnSpec], fingerprint: str, nulls: str, compression: Optional[str],
                  hashes: Sequence[str]) -> dict[str, Any]:
    """The logical schema as the log stores it (and ``manifest.json`` repeats)."""
    from dataclasses import asdict

    return {"columns": [asdict(c) for c in columns], "fingerprint": fingerprint, "nulls": nulls,
            "compression": compression, "hashes": list(hashes)}


def _logical(col: ColumnSpec) -> dict[str, Any]:
    decimal_as = None
    if col.logical == "decimal":
        decimal_as = "float64" if col.encoding == "float64" else "string"
    return {"logical": col.logical, "element": col.element, "null_mask": col.null_mask,
            "decimal_as": decimal_as}


def schema_diff(old: Sequence[ColumnSpec], new: Sequence[ColumnSpec]) -> list[str]:
    """Human-readable differences between two logical schemas (empty when they match)."""
    diffs = []
    old_by = {c.name: c for c in old}
    new_by = {c.name: c for c in new}
    for name in old_by:
        if name not in new_by:
            diffs.append(f"column {name!r} ({old_by[name].logical}) is missing from the new data")
    for name in new_by:
        if name not in old_by:
            diffs.append(f"column {name!r} ({new_by[name].logical}) is not in the existing dataset")
    for name in old_by:
        if name in new_by:
            a, b = _logical(old_by[name]), _logical(new_by[name])
            for key in a:
                if a[key] != b[key]:
                    diffs.append(f"column {name!r}: {key} is {a[key]!r} in the dataset but {b[key]!r} now")
    if not diffs and [c.name for c in old] != [c.name for c in new]:
        diffs.append(f"column order differs: dataset {[c.name for c in old]}, now {[c.name for c in new]}")
    return diffs


class WriteJob:
    """One ``write_mds`` call, from the mode check to the commit (see the module doc)."""

    def __init__(self, storage: Storage, mode: str, *, resume: Union[bool, str] = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.storage = storage
        self.mode = mode
        self.reader = LogReader(storage)
        self.write_id = new_write_id()
        self.run_id = new_run_id()  # attempt folders of this run: unique across Spark applications
        self.base: Snapshot = self.reader.refresh().copy()
        self.commit_attempted = False
        self.committed = False
        self.begin_version: Optional[int] = None  # commit="partition": the version of the begin entry
        self.resumed = False
        if resume:
            self._resume_open_write(resume)
        else:
            self._check_mode()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ before the tasks

    @property
    def columns(self) -> Optional[list[ColumnSpec]]:
        """The existing dataset's logical columns (None when it has none recorded)."""
        cols = self.base.columns()
        return cols if self.base.exists and (self.base.schema is not None or self.base.legacy_manifest) else None

    def _check_mode(self) -> None:
        if not self.base.exists:
            return
        if self.mode == "error":
            raise DatasetExistsError(
                f"{self.storage.root} already holds a dataset (version {self.base.version}); pass "
                "mode='overwrite' to replace it or mode='append' to add to it")
        if self.mode == "append" and self.columns is None and (self.base.shards or self.base.legacy):
            # (a log whose every write was rolled back holds no rows and no schema: an append there
            # writes the first rows and records their schema, as on an empty root)
            raise SchemaMismatchError(
                f"{self.storage.root} has no recorded schema (it was not written by sparkbridge), so its "
                "logical schema is unknown and append cannot check it; use mode='overwrite' or a new output")

    def _resume_open_write(self, resume: Union[bool, str]) -> None:
        """Continue an open partitioned write instead of starting one. ``resume="<write id>"``
        names it; ``resume=True`` takes the only open write and is refused when several are open
        (why: a rerun of yesterday's job must never complete today's write with its own rows)."""
        root = self.storage.root
        if isinstance(resume, str):
            w = self.base.writes.get(resume)
            if w is None:
                raise CommitConflictError(f"{root}: resume={resume!r}: write {resume} was never begun in this "
                                          "dataset's log; rerun the write without resume")
            if w.state != "open":
                why = {"complete": f"write {resume} is complete (it has nothing left to commit)",
                       "fenced": f"write {resume} was fenced by a vacuum: it is rolled back, none of its rows "
                                 "are served",
                       "replaced": f"write {resume} was replaced by an overwrite while it was open"}.get(
                    w.state, f"write {resume} is {w.state}")
                raise CommitConflictError(f"{root}: resume={resume!r}: {why}; rerun the write without resume")
        else:
            open_writes = sorted(self.base.open_writes, key=lambda w: w.begun_at)
            if not open_writes:
                raise CommitConflictError(
                    f"{root}: resume=True but no write is open there (it completed, was replaced or "
                    "fenced by a vacuum); run the write again with mode='append' or mode='overwrite'")
            if len(open_writes) > 1:
                listed = "; ".join(f"{w.write_id} ({_MODE_OF[w.mode]}, begun at version {w.begun_at}, "
                                   f"{len(w.partitions)} partition(s) committed)" for w in open_writes)
                raise CommitConflictError(
                    f"{root}: resume=True but {len(open_writes)} writes are open: {listed}. Name the one this "
                    f"job continues: resume='<write id>' (its failure said which)")
            w = open_writes[0]
        self.write_id, self.begin_version, self.resumed = w.write_id, w.begun_at, True
        if w.mode != OPERATION_OF_MODE[self.mode].value:
            raise CommitConflictError(f"{root}: the open write {w.write_id} was begun with mode "
                                      f"{_MODE_OF[w.mode]!r}, not {self.mode!r}; resume it with that mode")
        self.base = self.reader.snapshot(w.begun_at - 1) if w.begun_at > 0 else Snapshot(root=root, version=-1)
        log.info("resuming write %s (begun at version %d, %d partition(s) committed)", w.write_id, w.begun_at,
                 len(w.partitions))

    def check_schema(self, specs: Sequence[ColumnSpec]) -> None:
        if self.mode == "append" and self.columns is not None:
            diffs = schema_diff(self.columns, specs)
            if diffs:
                raise SchemaMismatchError(f"cannot append to {self.storage.root}: the logical schema differs — "
                                          + "; ".join(diffs))

    def start(self) -> None:
        """Create the staging folder (local) and the job descriptor, start its heartbeat."""
        if self.storage.is_local:
            folder = self.storage.local_path(staging_prefix(self.write_id))
            if os.path.islink(folder) or os.path.islink(os.path.dirname(folder)):
                # tasks would write, and cleanup delete, wherever the link points
                raise UnsafePathError(f"{folder} (or {STAGING}/) is a symbolic link; a write's staging folder must "
                                      f"be a real folder inside {self.storage.root}. Remove the link")
            for attempt in range(5):  # another write may remove an empty _staging/ meanwhile
                try:
                    os.makedirs(self.storage.local_path(staging_prefix(self.write_id)), exist_ok=self.resumed)
                    break
                except FileNotFoundError:
                    if attempt == 4:
                        raise
        self._describe()
        self._thread = threading.Thread(target=self._beat, name=f"sparkbridge-heartbeat-{self.write_id}", daemon=True)
        self._thread.start()

    def _describe(self) -> None:
        info = {"write_id": self.write_id, "host": socket.gethostname(), "pid": os.getpid(), "mode": self.mode,
                "base_version": self.base.version, "heartbeat_at": time.time()}
        self.storage.write_bytes_atomic(job_file(self.write_id), json.dumps(info, sort_keys=True).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._describe()  # a hint for vacuum that this write still makes progress
            except Exception as exc:
                log.debug("heartbeat of %s failed: %s", self.write_id, exc)

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ after the tasks

    def _base_version(self) -> int:
        """The version this write commits on top of: the base, after adopting a pre-log index."""
        if not self.base.legacy:
            return self.base.version
        draft = Draft(operation=Operation.IMPORT, write_id=new_write_id(), read_version=-1, add=tuple(self.base.shards),
                      schema=_legacy_schema(self.base),
                      info={"index_sha256": self.base.legacy_sha256, "reason": "adopt index.json written without a log"})
        try:
            commit(self.storage, draft, reader=self.reader, max_attempts=1)
        except CommitConflictError:
            pass  # another writer adopted it first: its import is version 0 as well
        first = self.reader.read_entry(0)
        if first.operation is not Operation.IMPORT or first.info.get("index_sha256") != self.base.legacy_sha256:
            raise CommitConflictError(f"{self.storage.root}: the dataset changed while this write ran "
                                      f"({first.describe()}); nothing was committed, rerun the write")
        self.base = self.reader.snapshot(0)
        return 0

    def _publish_local(self, attempts: Sequence[str]) -> None:
        """fsync the accepted attempts, then move each from staging to ``W/<attempt>``."""
        publish_folders(self.storage.local_path(staging_prefix(self.write_id)), attempts,
                        self.storage.local_path(self.write_id))

    def finish(self, tasks: Sequence[dict[str, Any]], *, schema: dict[str, Any], info: dict[str, Any],
               txn: Optional[dict[str, Any]] = None):
        """Commit the accepted attempts' shards as one log entry (a ``stream`` entry carrying ``txn``
        for a micro-batch); returns the entry. A micro-batch found already committed (a replay that
        raced its first run) discards its shards and returns that earlier entry."""
        from sparkbridge import _faults

        from sparkbridge.etl.partition import attempt_entries

        tasks = sorted(tasks, key=lambda t: t["partition"])
        entries = [e for task in tasks for e in attempt_entries(self.write_id, task)]
        read_version = self._base_version()
        if self.storage.is_local:
            try:
                self._publish_local([t["attempt"] for t in tasks if t["entries"]])
            except FileNotFoundError:
                # a vacuum fenced this write (idle past its retention) and deleted its staged files:
                # say so, as the commit itself would, instead of a bare rename error
                if self.write_id in self.reader.refresh().fenced:
                    raise CommitConflictError(
                        f"{self.storage.root}: write {self.write_id} was fenced by a vacuum (no progress within "
                        "the retention period) and its staged files were deleted; nothing of it was committed: "
                        "rerun the write") from None
                raise
        _faults.point("etl.commit.before_log")
        remove = tuple(stored_name(e) for e in self.base.shards) if self.mode == "overwrite" else ()
        rows = int(sum(t["rows"] for t in tasks))
        if txn is not None:
            draft = Draft(operation=Operation.STREAM, write_id=self.write_id, read_version=read_version, add=tuple(entries),
                          schema=schema, rows=rows, txn=dict(txn), info=info)
        else:
            draft = Draft(operation=OPERATION_OF_MODE[self.mode], commit=CommitUnit.JOB, write_id=self.write_id,
                          read_version=read_version, add=tuple(entries), remove=remove, schema=schema, rows=rows,
                          info=info)
        self.commit_attempted = True
        try:
            entry = commit(self.storage, draft, reader=self.reader)
        except Superseded as exc:
            log.info("%s: %s; this run's shards are discarded", self.storage.root, exc)
            self.commit_attempted = False  # nothing of this run is referenced: abort may delete it
            raise
        self.committed = True
        self._stop_heartbeat()
        _faults.point("etl.commit.after_log")
        return entry

    def begin(self, *, schema: dict[str, Any], info: dict[str, Any]):
        """``commit="partition"``: open the write in the log before any task runs (tasks commit
        their partitions on top of it). Returns the begin entry (None when resuming)."""
        if self.resumed:
            latest = self.reader.refresh()
            if latest.schema is not None and latest.schema.get("fingerprint") != schema.get("fingerprint"):
                raise SchemaMismatchError(f"{self.storage.root}: resume=True with another schema than the open "
                                          f"write {self.write_id} was begun with")
            return None
        read_version = self._base_version()
        remove = tuple(stored_name(e) for e in self.base.shards) if self.mode == "overwrite" else ()
        draft = Draft(operation=OPERATION_OF_MODE[self.mode], commit=CommitUnit.PARTITION, write_id=self.write_id,
                      read_version=read_version,
                      remove=remove, schema=schema, info=info)
        self.commit_attempted = True
        entry = commit(self.storage, draft, reader=self.reader)
        self.begin_version = entry.version
        return entry

    def complete(self, tasks: Sequence[dict[str, Any]], *, partitions: int):
        """``commit="partition"``: every partition is claimed; close the write with its row count."""
        latest = self.reader.refresh()
        state = latest.writes.get(self.write_id)
        claimed = set(state.partitions) if state is not None else set()
        missing = sorted(set(range(partitions)) - claimed)
        if missing:
            raise CommitConflictError(
                f"{self.storage.root}: write {self.write_id} ended but partitions {missing[:10]} have no commit in "
                "the log (it was fenced, replaced, or its tasks were lost); rerun with resume=True")
        draft = Draft(operation=Operation.COMPLETE, write_id=self.write_id, read_version=self.begin_version,
                      rows=int(state.rows), info={"partitions": partitions})
        entry = commit(self.storage, draft, reader=self.reader)
        self.committed = True
        self._stop_heartbeat()
        return entry

    def after_commit(self, *, retention_seconds: float, run_vacuum: bool = True) -> None:
        """Derived files, checkpoint, staging, vacuum: none of it decides the commit, so a failure
        here is logged (``sparkbridge validate`` reports leftovers, ``vacuum`` repairs)."""
        from sparkbridge import _faults

        try:
            sync_derived(self.storage, self.reader)
            _faults.point("etl.commit.after_derived")
            self._remove_staging()
            if run_vacuum:
                vacuum(self.storage, retention_seconds=retention_seconds, reader=self.reader)
        except Exception as exc:
            log.warning("after committing to %s: %s: %s (run `sparkbridge vacuum %s`)", self.storage.root,
                        type(exc).__name__, exc, self.storage.root)

    def abort(self, exc: Optional[BaseException] = None) -> None:
        """The write failed. Its files are removed unless its log entry may have landed (an
        ambiguous commit): then they stay for a vacuum to judge against the log."""
        self._stop_heartbeat()
        if self.committed:
            return
        if self.begin_version is not None:
            # a partitioned write: its committed partitions stay readable, marked incomplete (resume=True
            # finishes the write, mode='overwrite' replaces it, a vacuum fences it once idle)
            log.warning("%s: write %s stopped before it completed; its committed partitions stay readable "
                        "(version %d onwards) by followers only, marked incomplete: rerun with resume=%r to "
                        "finish it", self.storage.root, self.write_id, self.begin_version, self.write_id)
            if isinstance(exc, Exception):
                try:
                    w = self.reader.refresh().writes.get(self.write_id)
                except Exception:  # the note is a hint; the write's own error is the one to report
                    w = None
                if w is not None and w.state == "open":
                    exc.add_note(f"write {self.write_id} is open in {self.storage.root} with {len(w.partitions)} "
                                 f"partition(s) committed: rerun the same job with resume={self.write_id!r} to "
                                 "finish it (default readers do not see it until it completes)")
            try:
                self._remove_staging()
            except Exception as cleanup_exc:
                log.warning("could not clean up write %s in %s: %s", self.write_id, self.storage.root, cleanup_exc)
            return
        definite = isinstance(exc, (CommitConflictError, DatasetExistsError, SchemaMismatchError))
        try:
            self._remove_staging()
            if not self.commit_attempted or definite:
                self.storage.delete_prefix(f"{self.write_id}/")
                if self.storage.is_local:
                    _rmdir(self.storage.local_path(self.write_id))
            else:
                log.warning("%s: the outcome of committing write %s is unknown (%s); its files are kept, "
                            "`sparkbridge vacuum` removes them if the commit did not land",
                            self.storage.root, self.write_id, exc)
        except Exception as cleanup_exc:  # the write's own error is the one to report
            log.warning("could not clean up write %s in %s: %s", self.write_id, self.storage.root, cleanup_exc)


    def _remove_staging(self) -> None:
        """This write's staging (unaccepted local attempts, the descriptor), and ``_staging``
        itself once empty. A late attempt writer then fails to create its folder."""
        self.storage.delete_prefix(f"{staging_prefix(self.write_id)}/")
        if self.storage.is_local:
            folder = self.storage.local_path(staging_prefix(self.write_id))
            for _ in range(10):  # a cancelled attempt may still be closing a file in it
                if not os.path.exists(folder):
                    break
                time.sleep(0.1)
                self.storage.delete_prefix(f"{staging_prefix(self.write_id)}/")
            _rmdir(self.storage.local_path(STAGING))


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:  # not empty (another write's staging), or already gone
        pass


def _legacy_schema(base: Snapshot) -> Optional[dict[str, Any]]:
    m = base.legacy_manifest
    if m is None:
        return None
    return schema_record(columns=m.columns, fingerprint=m.schema_fingerprint, nulls=m.nulls,
                         compression=m.compression, hashes=m.hashes)
