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

On Spark Connect the ``foreachBatch`` function runs in a Python process next to the server, on a
session that does not expose the query id (:func:`sparkbridge.etl.session.streaming_query_id`):
there ``app_id`` is required, and ``mds_sink`` says so when it is made, before the stream starts.
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
    if app_id is None:
        from sparkbridge.etl.session import SessionKind, active_session_kind

        if active_session_kind() is SessionKind.CONNECT:
            raise UsageError(
                "mds_sink on a Spark Connect session needs app_id='<a stable name for this stream>': there the "
                "foreachBatch function runs next to the server on a session that does not expose the streaming "
                "query id, which exactly-once needs to recognise a replayed micro-batch")
    options = dict(write_options)

    def sink(batch_df: Any, batch_id: int) -> None:
        from sparkbridge.etl.session import is_connect, streaming_query_id
        from sparkbridge.etl.writer import write_mds

        query_id = streaming_query_id(batch_df)
        stream = app_id or query_id
        if not stream:
            where = ("on Spark Connect the batch's session does not expose it" if is_connect(batch_df)
                     else "is it running inside foreachBatch?")
            raise UsageError(f"mds_sink could not find the streaming query id ({where}); nothing of batch "
                             f"{batch_id} was written: pass app_id='<a stable name for this stream>'")
        txn = {"app_id": stream, "batch_id": int(batch_id)}
        if query_id:  # the checkpoint's identity: a reused app_id with a fresh checkpoint is refused
            txn["query_id"] = query_id
        result = write_mds(batch_df, out, mode="append", _txn=txn, **options)
        log.info("stream %s batch %d → %s: %s", stream, batch_id, out,
                 "already committed, skipped" if result.skipped else f"{result.rows} rows (version {result.version})")
        if on_batch is not None:
            on_batch(result)

    return sink

