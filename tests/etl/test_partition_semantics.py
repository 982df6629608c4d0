"""What a failed, fenced or abandoned ``commit="partition"`` write means for readers, what vacuum
keeps, and who may resume which write (issue 22, items 1-4 and 6; README "The dataset log").

Every test goes through ``write_mds`` on the shared Spark session, real files, and reads back with
``StreamingLoader``, stock Mosaic (``index.json``) and ``open_dataset``: exact row sets."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from sparkbridge import etl
from sparkbridge.bridge import StreamingLoader
from sparkbridge.errors import CommitConflictError, DatasetExistsError, WriteError
from sparkbridge.log import LogReader, open_dataset, vacuum
from sparkbridge.storage import open_storage

from tests.etl.helpers import leftovers, stock_ids
from tests.etl.test_live_writes import _frame, faults  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

OLD = list(range(1000))


def loader_ids(root: str) -> list[int]:
    """What a default (non-following) loader serves, sorted."""
    loader = StreamingLoader(root, batch_size=64)
    try:
        return sorted(int(i) for batch in loader for i in batch["id"])
    finally:
        loader.close()


def served(root: str) -> tuple[list[int], list[int]]:
    """(default loader, stock Mosaic through index.json), both sorted."""
    return loader_ids(root), sorted(stock_ids(root))


def fail_partition(faults, p: int) -> None:
    faults(",".join(f"etl.partition.before_log.p{p}.a{a}=raise" for a in range(4)))


def _failed_overwrite(spark, out, faults) -> str:
    """1,000 committed rows, then a partitioned overwrite whose partition 3 fails on every attempt:
    some of partitions 0-2 are committed, the write stays open. Returns its write id."""
    etl.write_mds(_frame(spark, 0, 1000, 2), out)
    fail_partition(faults, 3)
    with pytest.raises(WriteError, match="injected fault"):
        etl.write_mds(_frame(spark, 1000, 1400, 4), out, mode="overwrite", commit="partition")
    faults("")
    (w,) = open_dataset(out).open_writes
    assert w.rows > 0 and 3 not in w.partitions
    return w.write_id


# ---------------------------------------------------------------- item 1: a fenced write is rolled back


def test_a_fenced_partitioned_overwrite_is_rolled_back_and_never_served(spark, tmp_path, faults):
    out = str(tmp_path / "ds")
    write_id = _failed_overwrite(spark, out, faults)
    assert served(out) == (OLD, OLD)  # open: default readers keep the last complete version
    plan = vacuum(out, retention_seconds=0)
    assert plan.fence == [write_id]
    # fenced = rolled back: its partitions are never served, the old rows never deleted
    assert served(out) == (OLD, OLD)
    snap = open_dataset(out)
    assert (snap.rows, snap.writes[write_id].state, snap.open_writes) == (1000, "fenced", [])
    manifest = json.loads(open_storage(out).read_bytes("manifest.json"))
    assert (manifest["rows"], manifest["extra"]["complete"]) == (1000, True)
    assert leftovers(out) == []  # the fenced write's files are gone, nothing else
    vacuum(out, retention_seconds=0)  # and again: nothing changes
    assert served(out) == (OLD, OLD)


def test_another_jobs_append_with_zero_retention_rolls_back_the_stalled_overwrite(spark, tmp_path, faults):
    out = str(tmp_path / "ds")
    write_id = _failed_overwrite(spark, out, faults)
    etl.write_mds(_frame(spark, 5000, 5010, 1), out, mode="append", retention_seconds=0)  # its vacuum fences
    assert open_dataset(out).writes[write_id].state == "fenced"
    assert served(out) == (OLD + list(range(5000, 5010)),) * 2
    with pytest.raises(CommitConflictError, match=f"write {write_id} was fenced"):
        etl.write_mds(_frame(spark, 1000, 1400, 4), out, mode="overwrite", commit="partition", resume=write_id)
    assert served(out) == (OLD + list(range(5000, 5010)),) * 2


def test_a_live_partitioned_overwrite_fenced_by_another_jobs_append_is_refused_and_rolled_back(
        spark, tmp_path, faults):
    out = str(tmp_path / "ds")
    etl.write_mds(_frame(spark, 0, 1000, 2), out)
    faults("etl.partition.before_log.p3.a0=sleep10")  # partition 3 is still being written ...
    failure: list[BaseException] = []

    def overwrite() -> None:
        try:
            etl.write_mds(_frame(spark, 1000, 1400, 4), out, mode="overwrite", commit="partition")
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    writer = threading.Thread(target=overwrite)
    writer.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # ... when partitions 0-2 have landed
        w = open_dataset(out).writes
        if any(s.state == "open" and len(s.partitions) == 3 for s in w.values()):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the partitioned overwrite did not commit 3 partitions in time")
    # another job appends and vacuums with no retention: the live overwrite looks idle and is fenced
    etl.write_mds(_frame(spark, 5000, 5010, 1), out, mode="append", retention_seconds=0)
    writer.join(timeout=120)
    faults("")
    assert len(failure) == 1 and isinstance(failure[0], CommitConflictError) and "fenced" in str(failure[0])
    expected = OLD + list(range(5000, 5010))
    assert served(out) == (expected, expected)
    assert open_dataset(out).rows == 1010


# ---------------------------------------------------------------- item 2: staging removed, still fenced


def test_a_failed_partitioned_append_is_fenced_although_abort_removed_its_staging(spark, tmp_path):
    out = str(tmp_path / "ds")
    etl.write_mds(_frame(spark, 0, 100, 1), out)
    nulls_in_p3 = spark.range(1000, 1400, numPartitions=4).selectExpr(
        "id", "cast(if(id >= 1300, null, id * 2) as int) AS twice")
    with pytest.raises(WriteError, match="partition 3 has nulls"):
        etl.write_mds(nulls_in_p3, out, mode="append", commit="partition")
    assert not os.path.exists(os.path.join(out, "_staging"))  # abort removed it
    etl.write_mds(_frame(spark, 2000, 2010, 1), out, mode="append")
    # the failed write is open: default readers keep the version before it began
    assert served(out) == (list(range(100)),) * 2
    expected = list(range(100)) + list(range(2000, 2010))
    versions = LogReader(open_storage(out)).refresh().version
    plan = vacuum(out, retention_seconds=0)
    assert len(plan.fence) == 1 and plan.committed_version == versions + 1
    assert served(out) == (expected, expected)
    assert open_dataset(out).rows == 110 and leftovers(out) == []
    vacuum(out, retention_seconds=0)
    assert served(out) == (expected, expected)


# ---------------------------------------------------------------- item 3: keep what default readers serve


def test_vacuum_keeps_the_version_default_readers_serve_while_a_long_partitioned_overwrite_runs(
        spark, tmp_path, faults):
    out = str(tmp_path / "ds")
    write_id = _failed_overwrite(spark, out, faults)
    # the overwrite began two hours ago and is still making progress (its files are fresh)
    old = time.time() - 7200
    for name in os.listdir(os.path.join(out, "_log")):
        os.utime(os.path.join(out, "_log", name), (old, old))
    plan = vacuum(out, retention_seconds=3600)
    assert plan.fence == [] and plan.kept_active == [write_id] and plan.retained_from == 0
    assert served(out) == (OLD, OLD)
    assert open_dataset(out, version=0).rows == 1000
    # the healthy write goes on and completes: then it is served
    done = etl.write_mds(_frame(spark, 1000, 1400, 4), out, mode="overwrite", commit="partition", resume=write_id)
    assert done.job_id == write_id
    assert served(out) == (list(range(1000, 1400)),) * 2


# ---------------------------------------------------------------- item 4: two creates, one winner


def test_two_concurrent_partitioned_creates_have_one_winner(spark, tmp_path, monkeypatch):
    from sparkbridge.etl.commit import WriteJob

    out = str(tmp_path / "ds")
    both_planned = threading.Barrier(2, timeout=60)
    begin = WriteJob.begin

    def begin_together(self, **kw):  # both have read the (empty) root before either begins
        both_planned.wait()
        return begin(self, **kw)

    monkeypatch.setattr(WriteJob, "begin", begin_together)
    results: dict[int, object] = {}

    def run(k: int) -> None:
        try:
            results[k] = etl.write_mds(_frame(spark, k * 1000, k * 1000 + 1000, 2), out, commit="partition")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    won = [k for k, r in results.items() if isinstance(r, etl.WriteResult)]
    lost = [r for r in results.values() if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], DatasetExistsError) and "mode='append'" in str(lost[0])
    k = won[0]
    assert served(out) == (list(range(k * 1000, k * 1000 + 1000)),) * 2
    assert open_dataset(out).rows == 1000


# ---------------------------------------------------------------- item 6: who may resume which write


def test_resume_names_the_write_and_never_adopts_another_one(spark, tmp_path, faults):
    out = str(tmp_path / "ds")
    etl.write_mds(_frame(spark, 0, 100, 1), out)
    fail_partition(faults, 1)
    with pytest.raises(WriteError) as first:  # yesterday's job
        etl.write_mds(_frame(spark, 1000, 1200, 2), out, mode="append", commit="partition")
    with pytest.raises(WriteError):  # today's job
        etl.write_mds(_frame(spark, 2000, 2200, 2), out, mode="append", commit="partition")
    faults("")
    yesterday, today = sorted(open_dataset(out).open_writes, key=lambda w: w.begun_at)
    assert f"resume={yesterday.write_id!r}" in "\n".join(getattr(first.value, "__notes__", []))
    # two writes are open: resume=True cannot know which one is the caller's
    with pytest.raises(CommitConflictError, match=f"{yesterday.write_id}.*{today.write_id}.*resume="):
        etl.write_mds(_frame(spark, 1000, 1200, 2), out, mode="append", commit="partition", resume=True)
    # rerunning yesterday's job names its write: only yesterday's rows complete
    done = etl.write_mds(_frame(spark, 1000, 1200, 2), out, mode="append", commit="partition",
                         resume=yesterday.write_id)
    assert (done.job_id, done.rows) == (yesterday.write_id, 200)
    snap = open_dataset(out)
    assert snap.writes[yesterday.write_id].state == "complete" and snap.writes[today.write_id].state == "open"
    # a write that is not open cannot be resumed, nor one that never existed
    with pytest.raises(CommitConflictError, match=f"{yesterday.write_id} is complete"):
        etl.write_mds(_frame(spark, 1000, 1200, 2), out, mode="append", commit="partition",
                      resume=yesterday.write_id)
    with pytest.raises(CommitConflictError, match="j20990101T000000-00000000 .*never begun"):
        etl.write_mds(_frame(spark, 1000, 1200, 2), out, mode="append", commit="partition",
                      resume="j20990101T000000-00000000")
    # with one write open, resume=True continues it
    again = etl.write_mds(_frame(spark, 2000, 2200, 2), out, mode="append", commit="partition", resume=True)
    assert again.job_id == today.write_id
    assert loader_ids(out) == list(range(100)) + list(range(1000, 1200)) + list(range(2000, 2200))
