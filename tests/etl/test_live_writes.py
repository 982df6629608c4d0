"""Writes that become visible while they run: ``commit="partition"`` and Structured Streaming.

Exactly once is asserted as exact row sets: a task that fails after its partition was claimed, a
speculative copy, a resumed write, a replayed micro-batch — none may add a row twice or lose one."""

from __future__ import annotations

import os
import threading
import time

import pytest

from sparkbridge import etl
from sparkbridge.errors import CommitConflictError, DatasetNotFoundError, WriteError
from sparkbridge.log import open_dataset

from tests.etl.helpers import leftovers, log_versions, stock_ids

pytestmark = pytest.mark.slow


def _frame(spark, lo, hi, parts):
    return spark.range(lo, hi, numPartitions=parts).selectExpr("id", "cast(id * 2 as int) AS twice")


@pytest.fixture
def faults(spark):
    """Arm fault hooks in the Python workers of tasks started from now on (their environment
    comes from the SparkContext's, sent with each function)."""
    env = spark.sparkContext.environment

    def arm(spec: str) -> None:
        env["SPARKBRIDGE_FAULTS"] = spec

    yield arm
    env.pop("SPARKBRIDGE_FAULTS", None)


def test_partition_commits_each_partition_once_even_when_a_task_fails_after_its_commit(spark, tmp_path, faults):
    out = str(tmp_path / "ds")
    faults("etl.partition.after_log.p2.a0=raise")  # partition 2's first attempt dies after its commit landed
    result = etl.write_mds(_frame(spark, 0, 1000, 5), out, commit="partition")
    assert (result.rows, result.partitions) == (1000, 5)
    assert log_versions(out) == ["create (per partition)"] + ["partition"] * 5 + ["complete"]
    snap = open_dataset(out)
    assert sorted(snap.writes[result.job_id].partitions) == [0, 1, 2, 3, 4] and snap.writes[result.job_id].state == "complete"
    assert sorted(stock_ids(out)) == list(range(1000))  # index.json written at the end
    assert leftovers(out) == []


def test_a_failed_partitioned_write_stays_readable_and_resume_finishes_it(spark, tmp_path, faults):
    out = str(tmp_path / "ds")
    etl.write_mds(_frame(spark, 0, 100, 1), out)
    # partition 3 fails on every attempt: the job fails, partitions 0-2 and 4 may be committed
    faults(",".join(f"etl.partition.before_log.p3.a{a}=raise" for a in range(4)))
    with pytest.raises(WriteError, match="injected fault"):
        etl.write_mds(_frame(spark, 1000, 1500, 5), out, mode="append", commit="partition")
    snap = open_dataset(out)
    (w,) = snap.open_writes
    assert 3 not in w.partitions and len(w.partitions) >= 1
    # a loader that does not follow sees the last complete version; stock readers too
    assert sorted(stock_ids(out)) == list(range(100))
    faults("")
    again = etl.write_mds(_frame(spark, 1000, 1500, 5), out, mode="append", commit="partition", resume=True)
    assert again.job_id == w.write_id and again.rows == 500
    assert sorted(stock_ids(out)) == list(range(100)) + list(range(1000, 1500))
    assert open_dataset(out).open_writes == []
    with pytest.raises(CommitConflictError, match="no write is open"):
        etl.write_mds(_frame(spark, 0, 10, 1), out, mode="append", commit="partition", resume=True)


def test_first_partitioned_write_is_invisible_to_a_loader_that_does_not_follow(spark, tmp_path, faults):
    from sparkbridge.bridge import StreamingLoader

    out = str(tmp_path / "ds")
    faults(",".join(f"etl.partition.before_log.p1.a{a}=raise" for a in range(4)))
    with pytest.raises(WriteError):
        etl.write_mds(_frame(spark, 0, 300, 3), out, commit="partition")
    assert open_dataset(out).rows > 0  # partitions 0 and 2 are committed ...
    with pytest.raises(DatasetNotFoundError, match="follow=True"):
        StreamingLoader(out, batch_size=8)  # ... but the write is incomplete: not served silently


def test_structured_streaming_appends_every_micro_batch_once_across_a_crash(spark, tmp_path):
    src, out, ckpt = tmp_path / "in", str(tmp_path / "ds"), str(tmp_path / "ckpt")
    src.mkdir()
    for k in range(5):
        (src / f"part-{k}.csv").write_text("id,x\n" + "".join(f"{k * 100 + i},{i / 2}\n" for i in range(100)))
    crashed = {"done": False}
    sink = etl.mds_sink(out, nulls="error")

    def crash_after_commit_of_batch_2(df, batch_id):
        sink(df, batch_id)
        if batch_id == 2 and not crashed["done"]:
            crashed["done"] = True  # the batch is committed to the dataset, not to Spark's checkpoint
            raise RuntimeError("driver crash after the sink's commit")

    def run(fn):
        q = (spark.readStream.schema("id LONG, x DOUBLE").option("header", "true").option("maxFilesPerTrigger", 1)
             .csv(str(src)).writeStream.foreachBatch(fn).option("checkpointLocation", ckpt)
             .trigger(availableNow=True).start())
        try:
            q.awaitTermination()
        finally:
            q.stop()
        return q

    with pytest.raises(Exception, match="driver crash after the sink"):
        run(crash_after_commit_of_batch_2)
    first = open_dataset(out)
    assert first.rows == 300 and sorted(first.txns.values()) == [2]
    q = run(sink)  # restarted from the checkpoint: batch 2 is replayed, then 3 and 4
    snap = open_dataset(out)
    assert snap.txns == {str(q.id): 4}
    assert sorted(stock_ids(out)) == list(range(500))
    assert log_versions(out).count("stream") == 5  # the replay of batch 2 added nothing
    assert leftovers(out) == []


def test_a_fixed_app_id_with_a_fresh_checkpoint_is_refused_never_skipped(spark, tmp_path):
    """Issue 22 item 7: a stream is its app_id *and* its checkpoint (Spark's query id, kept in the
    checkpoint). A fresh checkpoint restarts batch ids at 0: with a reused app_id those batches
    used to be skipped as already committed (rows silently dropped); now the batch is refused
    with an error naming the app_id. A checkpoint moved with its files keeps its query id and is
    the same stream: its next batches are appended."""
    import shutil

    src, out = tmp_path / "in", str(tmp_path / "ds")
    src.mkdir()

    def add_file(k):
        (src / f"part-{k}.csv").write_text("id,x\n" + "".join(f"{k * 100 + i},{i / 2}\n" for i in range(100)))

    def run(ckpt):
        q = (spark.readStream.schema("id LONG, x DOUBLE").option("header", "true").option("maxFilesPerTrigger", 1)
             .csv(str(src)).writeStream.foreachBatch(etl.mds_sink(out, app_id="events"))
             .option("checkpointLocation", str(ckpt)).trigger(availableNow=True).start())
        try:
            q.awaitTermination()
        finally:
            q.stop()

    for k in range(3):
        add_file(k)
    run(tmp_path / "ckpt1")
    assert open_dataset(out).txns == {"events": 2}
    assert sorted(stock_ids(out)) == list(range(300))

    shutil.copytree(tmp_path / "ckpt1", tmp_path / "ckpt-moved")  # the same stream, moved
    add_file(3)
    run(tmp_path / "ckpt-moved")
    assert open_dataset(out).txns == {"events": 3}
    assert sorted(stock_ids(out)) == list(range(400))

    add_file(4)  # a fresh checkpoint reads every file again, from batch 0, under the same app_id
    with pytest.raises(Exception, match="app_id 'events'.*another checkpoint") as err:
        run(tmp_path / "ckpt-fresh")
    assert "new app_id" in str(err.value)
    snap = open_dataset(out)
    assert snap.txns == {"events": 3} and sorted(stock_ids(out)) == list(range(400))
    assert leftovers(out) == []
