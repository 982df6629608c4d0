"""Driving ``write_mds``'s own commit path without Spark: the log tests need thousands of writes.

``write_mds`` is: :class:`sparkbridge.etl.commit.WriteJob` (mode, begin, start) → one
:func:`sparkbridge.etl.task.run_task` per partition (real MDS shards from Arrow batches) →
:func:`sparkbridge.etl.partition.commit_partition` per task (``commit="partition"``) or
``WriteJob.finish`` (``commit="job"``) → ``complete`` / ``after_commit`` / ``abort``. The helpers
below call exactly those, in that order, with an ``id`` int64 column, so a test can read the ids
back and account for every row. Only Spark's scheduling is left out (a task is a function call).
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional, Sequence

import pyarrow as pa

from sparkbridge.etl.commit import WriteJob, schema_record
from sparkbridge.etl.partition import claimed, commit_partition
from sparkbridge.etl.task import TaskConfig, run_task
from sparkbridge.etl.types import logical_schema, plan_columns

__all__ = ["ID_PLANS", "ID_SCHEMA", "Write", "write_ids", "read_ids"]


def _plans():
    from pyspark.sql.types import LongType, StructField, StructType

    return tuple(plan_columns(StructType([StructField("id", LongType(), False)])))


ID_PLANS = _plans()
_SPECS = [p.spec for p in ID_PLANS if p.spec is not None]
ID_SCHEMA = schema_record(columns=_SPECS, nulls="error", compression=None, hashes=("xxh64",),
                          fingerprint=hashlib.sha256(json.dumps(logical_schema(ID_PLANS), sort_keys=True)
                                                     .encode()).hexdigest())


class Write:
    """One write in progress, step by step (what ``write_mds`` does between its lines)."""

    def __init__(self, storage, mode: str, *, commit: str = "job", resume=False) -> None:
        self.job = WriteJob(storage, mode, resume=resume)
        self.commit = commit
        self.tasks: list[dict] = []
        if commit == "partition":
            self.job.begin(schema=ID_SCHEMA, info={"writer": "tests.log.writes", "mode": mode})
        self.job.start()
        self.cfg = TaskConfig(storage=storage, job_id=self.job.write_id, plans=ID_PLANS, compression=None,
                              hashes=("xxh64",), shard_size=1 << 16, nulls="error", commit=commit,
                              read_version=-1 if self.job.begin_version is None else self.job.begin_version,
                              run=self.job.run_id)
        self._attempts = 0

    def task(self, partition: int, ids: Sequence[int], *, task_attempt_id: Optional[int] = None) -> dict:
        """One task attempt of ``partition`` writing ``ids`` (and, per partition, committing them)."""
        if self.commit == "partition" and claimed(self.cfg, partition):
            row = {"attempt": None, "partition": partition, "rows": 0, "nulls": {}, "entries": [], "superseded": True}
            self.tasks.append(row)
            return row
        return self.commit_task(self.write_shards(partition, ids, task_attempt_id=task_attempt_id))

    def write_shards(self, partition: int, ids: Sequence[int], *, task_attempt_id: Optional[int] = None) -> dict:
        """The first half of a task: its shards written (staged), nothing committed. Task attempt
        ids count from 0 in each Write, as they do in each Spark application."""
        tid = self._attempts if task_attempt_id is None else task_attempt_id
        self._attempts += 1
        batch = pa.RecordBatch.from_arrays([pa.array(list(ids), pa.int64())], ["id"])
        return run_task(self.cfg, iter([batch]), partition=partition, task_attempt_id=tid, attempt_number=0)

    def commit_task(self, row: dict) -> dict:
        """The second half: publish and commit the partition (``commit="partition"``)."""
        if self.commit == "partition":
            row = commit_partition(self.cfg, row)
        self.tasks.append(row)
        return row

    def finish(self, *, partitions: int, retention_seconds: float = 3600.0, run_vacuum: bool = False):
        """Commit (job) or complete (partition), then the derived files: returns the log entry."""
        try:
            if self.commit == "partition":
                entry = self.job.complete(self.tasks, partitions=partitions)
            else:
                entry = self.job.finish(self.tasks, schema=ID_SCHEMA, info={"writer": "tests.log.writes"})
        except BaseException as exc:
            self.job.abort(exc)
            raise
        self.job.after_commit(retention_seconds=retention_seconds, run_vacuum=run_vacuum)
        return entry

    def abort(self, exc: Optional[BaseException] = None) -> None:
        self.job.abort(exc)

    def crash(self) -> None:
        """The driver dies: no abort, no cleanup; only its heartbeat thread stops."""
        self.job._stop_heartbeat()


def write_ids(storage, mode: str, parts: Sequence[Sequence[int]], *, commit: str = "job", **kw):
    """A whole write of ``parts`` (one list of ids per partition); returns the last entry."""
    w = Write(storage, mode, commit=commit, **kw)
    try:
        for p, ids in enumerate(parts):
            w.task(p, ids)
    except BaseException as exc:
        w.abort(exc)
        raise
    return w.finish(partitions=len(parts))


def read_ids(storage, snapshot) -> list[int]:
    """The ``id`` of every row of ``snapshot``, in its shard order, read from the real shard files."""
    import numpy as np

    from sparkbridge.format.mds import sample_offsets

    out: list[int] = []
    for e in snapshot.shards:
        raw = storage.read_bytes(e["raw_data"]["basename"])
        offsets = sample_offsets(raw)
        starts = offsets[:-1]
        buf = np.frombuffer(raw, dtype=np.uint8)
        out.extend(int(buf[s:s + 8].view("<i8")[0]) for s in starts)
    return out
