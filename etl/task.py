"""What runs inside each Spark task: encode batches, cut shards, compress + hash + store them on a
background thread, and return one small manifest row (JSON) to the driver.

Why a thread: compression (zstd), hashing (xxhash) and file/S3 I/O release the GIL, so shard ``k``
is compressed and written while the task receives and encodes the batches of shard ``k+1``. Only
metadata travels back to the driver; the data never leaves the executor except as shard files.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from sparkbridge.errors import SparkbridgeError
from sparkbridge.etl.encode import EncodeError, encode_batch, null_counts
from sparkbridge.etl.phases import Phases
from sparkbridge.log.layout import attempt_name, job_file, staging_prefix
from sparkbridge.format.mds import ShardFormatError, encode_shard_chunks, index_entry, shard_config
from sparkbridge.format.codecs import compress, compression_extension
from sparkbridge.etl.types import ColumnPlan

__all__ = ["TaskConfig", "TaskFailure", "run_task", "task_function", "MANIFEST_FIELD", "ERROR_TAG",
]


MANIFEST_FIELD = "sparkbridge_manifest"
#: Prefix of task error messages; the driver finds it in Spark's exception and re-raises it plainly.
ERROR_TAG = "sparkbridge-task-error: "


class TaskFailure(SparkbridgeError, RuntimeError):
    """A task could not write its shards; the message is shown to the user by the driver."""

    def __init__(self, message: str) -> None:
        super().__init__(ERROR_TAG + message)


@dataclass(frozen=True)
class TaskConfig:
    """Everything a task needs, pickled once into the task closure (no Spark objects)."""

    storage: Any  # sparkbridge.storage.Storage
    job_id: str
    plans: tuple[ColumnPlan, ...]
    compression: Optional[str]
    hashes: tuple[str, ...]
    shard_size: int
    nulls: str
    max_pending: int = 2
    #: "job": the driver commits every partition in one log entry; "partition": each task commits
    #: its own (see :mod:`sparkbridge.etl.partition`) on top of ``read_version`` (the begin entry)
    commit: str = "job"
    read_version: int = -1
    #: the driver run (:func:`sparkbridge.log.layout.new_run_id`): part of every attempt folder name
    run: str = ""

    def config(self) -> dict[str, Any]:
        return shard_config(
            column_names=[p.name for p in self.plans],
            column_encodings=[p.encoding for p in self.plans],
            compression=self.compression,
            hashes=self.hashes,
            size_limit=self.shard_size,
        )


class _Target:
    """Where an attempt's shards go: a folder under local staging, or S3 keys under ``job/attempt``."""

    def __init__(self, cfg: TaskConfig, attempt: str) -> None:
        self.cfg = cfg
        self.storage = cfg.storage
        self.attempt = attempt
        if self.storage.is_local:
            parent = self.storage.local_path(staging_prefix(cfg.job_id))
            self.folder = os.path.join(parent, attempt)
            try:
                os.mkdir(self.folder)  # not makedirs: fails once the job's staging is removed
            except FileNotFoundError:
                raise TaskFailure(
                    f"staging folder {parent} does not exist on this executor: either job {cfg.job_id} "
                    "already finished or was aborted (this attempt must not write), or the output is not "
                    "on a filesystem shared by the driver and the executors (use a shared folder or s3://)"
                ) from None
        else:
            self._check_job()

    def _check_job(self) -> None:
        if not self.storage.exists(job_file(self.cfg.job_id)):
            raise TaskFailure(
                f"{self.storage.url(job_file(self.cfg.job_id))} is gone: job {self.cfg.job_id} has "
                "already finished or was aborted, so this task attempt must not write"
            )

    def write(self, basename: str, data: bytes) -> None:
        if self.storage.is_local:
            # open() in a removed folder fails: a late writer cannot resurrect staging
            with open(os.path.join(self.folder, basename), "xb") as f:
                f.write(data)
        else:
            self._check_job()
            self.storage.write_bytes_atomic(f"{self.cfg.job_id}/{self.attempt}/{basename}", data)


class _ShardSink:
    """Background thread: join + compress + hash + store each closed shard, in order."""

    def __init__(self, cfg: TaskConfig, target: _Target, phases: Optional[Phases] = None) -> None:
        self.cfg = cfg
        self.target = target
        self.phases = phases or Phases()
        self.config = cfg.config()
        self.ext = compression_extension(cfg.compression) if cfg.compression else None
        self.entries: list[dict[str, Any]] = []
        self.error: Optional[BaseException] = None
        self.queue: "queue.Queue[Any]" = queue.Queue(maxsize=cfg.max_pending)
        self.thread = threading.Thread(target=self._run, name="sparkbridge-shard-sink", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            t = self.phases.clock()
            item = self.queue.get()
            self.phases.add("sink_idle", t)
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as exc:  # re-raised on the task thread
                self.error = exc

    def _write(self, number: int, chunks: list[np.ndarray], sizes: list[np.ndarray]) -> None:
        phases = self.phases
        t = phases.clock()
        size_arr = sizes[0] if len(sizes) == 1 else np.concatenate(sizes)
        raw = encode_shard_chunks(self.config, chunks, size_arr)
        del chunks[:]  # the batches' buffers can go before compressing
        t = phases.add("join", t)
        raw_name = f"shard.{number:05d}.mds"
        if self.ext:
            zipped = compress(self.cfg.compression, raw)
            t = phases.add("compress", t)
            zip_name = f"{raw_name}.{self.ext}"
            entry = index_entry(self.config, samples=len(size_arr), raw_basename=raw_name, raw=raw,
                                zip_basename=zip_name, zipped=zipped)
            t = phases.add("hash", t)
            self.target.write(zip_name, zipped)
        else:
            entry = index_entry(self.config, samples=len(size_arr), raw_basename=raw_name, raw=raw)
            t = phases.add("hash", t)
            self.target.write(raw_name, raw)
        phases.add("write", t)
        self.entries.append(entry)

    def _raise(self) -> None:
        if self.error is not None:
            err = self.error
            if isinstance(err, TaskFailure):
                raise err
            raise TaskFailure(f"writing a shard of attempt {self.target.attempt} failed: "
                              f"{type(err).__name__}: {err}") from err

    def submit(self, number: int, chunks: list[np.ndarray], sizes: list[np.ndarray]) -> None:
        self._raise()
        t = self.phases.clock()
        self.queue.put((number, chunks, sizes))  # blocks while max_pending shards wait
        self.phases.add("wait_sink", t)

    def abandon(self) -> None:
        """The task failed: stop writing queued shards and wait for the thread (its error, if any,
        is dropped: the task's own error is the one to report)."""
        if self.error is None:
            self.error = RuntimeError("the task failed")  # _run skips the shards still queued
        self.queue.put(None)
        self.thread.join()

    def close(self) -> list[dict[str, Any]]:
        self.queue.put(None)
        self.thread.join()
        self._raise()
        return self.entries


class _ShardCutter:
    """Accumulates packed batches and cuts them into shards under the size limit (header included,
    as Mosaic's ``size_limit``); each closed shard goes to the sink."""

    def __init__(self, sink: _ShardSink, size_limit: int) -> None:
        self.sink = sink
        self.size_limit = size_limit
        self.config_len = len(json.dumps(sink.config, sort_keys=True).encode("utf-8"))
        self.number = 0
        self.chunks: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []
        self.rows = 0
        self.bytes = 0

    def _flush(self) -> None:
        if self.rows:
            self.sink.submit(self.number, self.chunks, self.sizes)
            self.number += 1
        self.chunks, self.sizes, self.rows, self.bytes = [], [], 0, 0

    def add(self, data: np.ndarray, sizes: np.ndarray) -> None:
        n = len(sizes)
        ends = np.cumsum(sizes)
        start = 0
        while start < n:
            base = int(ends[start - 1]) if start else 0
            room = self.size_limit - (self.bytes + 4 + 4 * (self.rows + 1) + self.config_len)
            # the shard grows by each row's bytes plus 4 bytes of offset per row
            if int(ends[-1]) - base + 4 * (n - start) <= room:
                take = n - start  # the common case: the rest of the batch fits, no per-row test
            else:
                fits = (ends[start:] - base) + 4 * np.arange(1, n - start + 1) <= room
                take = int(np.argmin(fits))
            if take == 0 and self.rows == 0:
                take = 1  # a sample larger than the limit gets a shard of its own
            if take == 0:
                self._flush()
                continue
            hi = int(ends[start + take - 1])
            self.chunks.append(data[base:hi])
            self.sizes.append(sizes[start:start + take])
            self.rows += take
            self.bytes += hi - base
            start += take

    def close(self) -> None:
        self._flush()


def run_task(cfg: TaskConfig, batches: Iterator[Any], *, partition: int, task_attempt_id: int,
             attempt_number: int) -> dict[str, Any]:
    """Write one partition; returns the manifest row (attempt folder, index entries, counts)."""
    attempt = attempt_name(partition, task_attempt_id, cfg.run)
    phases = Phases()  # opt-in timing of the phases below (etl.phases)
    sink = _ShardSink(cfg, _Target(cfg, attempt), phases)
    cutter = _ShardCutter(sink, cfg.shard_size)
    plans: Sequence[ColumnPlan] = cfg.plans
    nulls: dict[str, int] = {}
    rows = 0
    started = t = phases.clock()
    try:
        for batch in batches:
            t = phases.add("wait_batch", t)  # Spark's JVM → Arrow → Python transfer
            phases.count("batches")
            if batch.num_rows == 0:
                continue
            rows += batch.num_rows
            if cfg.nulls == "error":
                for k, v in null_counts(batch, plans).items():
                    nulls[k] = nulls.get(k, 0) + v
            if nulls:  # the driver fails the job before commit; just count the rest
                t = phases.clock()
                continue
            enc = encode_batch(batch, plans)
            t = phases.add("encode", t)
            cutter.add(enc.data, enc.sizes)
            t = phases.add("cut", t)
        if not nulls:
            cutter.close()
        entries = sink.close()
        phases.add("close", t)
    except BaseException:
        sink.abandon()
        raise
    phases.report(partition=partition, attempt=attempt_number, rows=rows, shards=len(entries),
                  total=round(phases.clock() - started, 4))
    return {
        "attempt": attempt,
        "partition": partition,
        "task_attempt_id": task_attempt_id,
        "attempt_number": attempt_number,
        "rows": rows,
        "nulls": nulls,
        "entries": [] if nulls else entries,
    }


def task_function(cfg: TaskConfig, credentials: Any = None):
    """The function given to ``mapInArrow``: one output row of JSON per task. ``credentials``: the
    write's :class:`~sparkbridge.etl.credentials.CredentialKey` (the task's half of the S3 settings)."""

    def fn(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark import TaskContext

        from sparkbridge.etl.credentials import from_task_context

        ctx = TaskContext.get()
        if not cfg.storage.is_local:
            # the driver's S3 settings travel sealed as local properties of this task, opened with the
            # key in this closure, into this task's own client only: never into the worker's environment
            cfg.storage.set_client_args(from_task_context(ctx, credentials))
        partition, attempt = ctx.partitionId(), ctx.attemptNumber()
        try:
            if cfg.commit == "partition":
                from sparkbridge.etl.partition import claimed

                if claimed(cfg, partition):  # a retry after its commit landed, or a resumed write
                    for _ in batches:
                        pass
                    row = {"attempt": None, "partition": partition, "task_attempt_id": ctx.taskAttemptId(),
                           "attempt_number": attempt, "rows": 0, "nulls": {}, "entries": [], "superseded": True}
                    yield pa.RecordBatch.from_arrays([pa.array([json.dumps(row)], pa.string())], [MANIFEST_FIELD])
                    return
            row = run_task(cfg, batches, partition=partition, task_attempt_id=ctx.taskAttemptId(),
                           attempt_number=attempt)
            if cfg.commit == "partition":
                from sparkbridge.etl.partition import commit_partition

                if row["nulls"]:  # nothing of this partition may become visible
                    detail = ", ".join(f"{k!r}: {v}" for k, v in sorted(row["nulls"].items()))
                    raise TaskFailure(f"nulls='error' and partition {partition} has nulls ({detail}); its rows were "
                                      "not committed. Pass nulls='fill' or nulls='mask', or clean these columns first")
                row = commit_partition(cfg, row)
        except TaskFailure:
            raise
        except (EncodeError, ShardFormatError) as exc:  # explained to the user by the driver
            raise TaskFailure(str(exc)) from None
        except Exception as exc:  # still one line for the user, never a JVM-wrapped traceback
            raise TaskFailure(f"partition {partition} attempt {attempt}: {type(exc).__name__}: {exc}") from None
        yield pa.RecordBatch.from_arrays([pa.array([json.dumps(row)], pa.string())], [MANIFEST_FIELD])

    return fn
