"""Small helpers shared by the ETL tests."""

from __future__ import annotations

import contextlib

__all__ = ["stock_ids", "arrow_batch_rows"]


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
