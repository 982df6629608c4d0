"""Small helpers shared by the ETL tests."""

from __future__ import annotations

import contextlib
import errno
import os

from sparkbridge.storage import LocalStorage

__all__ = ["stock_ids", "arrow_batch_rows", "FullDiskInTasks"]


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
