"""``mds_sink``: Structured Streaming into an MDS dataset, each micro-batch exactly once.

    query = (spark.readStream.schema(schema).csv("in/")
             .writeStream.foreachBatch(mds_sink("s3://bucket/events", nulls="fill"))
             .option("checkpointLocation", "ckpt/").start())

Why a log entry per micro-batch with the query id and batch id (as Delta's ``txnAppId`` and
``txnVersion``): after a crash Spark replays the last micro-batch from its checkpoint with the
same batch id; the sink finds that id already committed for this query and skips it, so no row
is added twice, and a batch that never committed is written again, so none is lost. The query id
is Spark's own (stable across restarts from the same checkpoint, and kept when a checkpoint is
moved with its files); pass ``app_id`` to name the stream yourself. A stream is its ``app_id``
*and* its checkpoint: each batch records the query id, and a batch of a query started from a fresh
checkpoint under an ``app_id`` another checkpoint committed is refused (CommitConflictError) —
its batch ids restart at 0 and would otherwise be skipped as already committed. Give such a
stream a new ``app_id``. A ``StreamingLoader(...,
follow=True)`` on the dataset trains on micro-batches as they land.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from sparkbridge.errors import UsageError

__all__ = ["mds_sink", "SINK_OPTIONS"]

log = logging.getLogger(__name__)

#: ``write_mds`` options a sink passes through (``mode`` is always append, ``commit`` always job).
SINK_OPTIONS = ("columns", "nulls", "compression", "hashes", "shard_size", "decimals", "retention_seconds")


def mds_sink(out: str, *, app_id: Optional[str] = None, on_batch: Optional[Callable[[Any], None]] = None,
             **write_options: Any) -> Callable[[Any, int], None]:
    """A ``foreachBatch`` function appending each micro-batch to ``out`` exactly once.

    ``write_options``: any of :data:`SINK_OPTIONS`, as for :func:`~sparkbridge.etl.write_mds`.
    ``on_batch``: called with each batch's :class:`~sparkbridge.etl.WriteResult` (progress)."""
    unknown = sorted(set(write_options) - set(SINK_OPTIONS))
    if unknown:
        raise UsageError(f"mds_sink does not take {unknown}: a stream always appends one entry per micro-batch; "
                         f"options it passes to write_mds: {list(SINK_OPTIONS)}")
    if app_id is not None and (not isinstance(app_id, str) or not app_id):
        raise UsageError(f"app_id must be a non-empty string naming the stream, got {app_id!r}")
    options = dict(write_options)

    def sink(batch_df: Any, batch_id: int) -> None:
        from sparkbridge.etl.writer import write_mds

        query_id = _query_id(batch_df)
        stream = app_id or query_id
        if not stream:
            raise UsageError("mds_sink could not find the streaming query id (is it running inside foreachBatch?); "
                             "pass app_id='<a stable name for this stream>'")
        txn = {"app_id": stream, "batch_id": int(batch_id)}
        if query_id:  # the checkpoint's identity: a reused app_id with a fresh checkpoint is refused
            txn["query_id"] = query_id
        result = write_mds(batch_df, out, mode="append", _txn=txn, **options)
        log.info("stream %s batch %d → %s: %s", stream, batch_id, out,
                 "already committed, skipped" if result.skipped else f"{result.rows} rows (version {result.version})")
        if on_batch is not None:
            on_batch(result)

    return sink


def _query_id(batch_df: Any) -> Optional[str]:
    """Spark's query id for this micro-batch (kept in the checkpoint: stable across restarts and
    moves of the checkpoint, new for a fresh one); None where the session cannot tell (Connect)."""
    try:
        return batch_df.sparkSession.sparkContext.getLocalProperty("sql.streaming.queryId") or None
    except Exception:  # a Spark Connect session has no sparkContext
        return None
