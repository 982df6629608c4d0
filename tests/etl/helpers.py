"""Small helpers shared by the ETL tests."""

from __future__ import annotations

import contextlib
import errno
import os

from sparkbridge.storage import LocalStorage

__all__ = ["stock_ids", "arrow_batch_rows", "FullDiskInTasks", "leftovers", "log_versions"]


def leftovers(root) -> list[str]:
    """Files sparkbridge wrote under ``root`` that no retained version of its log references
    (failed attempts, crashed writes, staging): what a clean write must not leave behind."""
    from sparkbridge.log.layout import owner
    from sparkbridge.log.snapshot import LogReader
    from sparkbridge.storage import open_storage

    storage = open_storage(str(root))
    reader = LogReader(storage)
    latest = reader.refresh()
    keep = set()
    if latest.version >= 0:  # every retained version (older ones may be vacuumed)
        snap = reader.snapshot(latest.retained_from)
        keep |= snap.files()
        for v in range(snap.version + 1, latest.version + 1):
            snap.apply(reader.read_entry(v))
            keep |= snap.files()
    if latest.legacy:
        keep |= latest.files()
    return sorted(f.rel for f in storage.list_info("") if owner(f.rel) is not None and f.rel not in keep)


def log_versions(root) -> list[str]:
    """The operation of each log entry of ``root``, oldest first (``create (per partition)`` for a
    write that opens and commits a partition at a time)."""
    from sparkbridge.log.snapshot import LogReader
    from sparkbridge.storage import open_storage

    reader = LogReader(open_storage(str(root)))
    latest = reader.refresh()
    out = []
    for v in range(latest.version + 1):
        e = reader.read_entry(v)
        out.append(f"{e.operation} (per partition)" if e.opens else str(e.operation))
    return out


def stock_ids(path: str) -> list[int]:
    """The ``id`` column of a dataset as stock Mosaic reads it, in stored order."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=path, batch_size=1, shuffle=False)
    try:
        return [int(ds[i]["id"]) for i in range(len(ds))]
    finally:
        del ds


@contextlib.contextmanager
def arrow_batch_rows(spark, rows: int):
    """Smaller Arrow batches for one block, so tasks cut several shards from little data."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    old = spark.conf.get(key)
    spark.conf.set(key, str(rows))
    try:
        yield
    finally:
        spark.conf.set(key, old)


class FullDiskInTasks(LocalStorage):
    """A local output whose disk is full for the executors' Python workers only (another process
    than the driver): the fault is raised where a task first touches its staging folder."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.driver_pid = os.getpid()

    def local_path(self, rel: str) -> str:
        if os.getpid() != self.driver_pid:
            raise OSError(errno.ENOSPC, "No space left on device", super().local_path(rel))
        return super().local_path(rel)
