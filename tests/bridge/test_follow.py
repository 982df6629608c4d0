"""``StreamingLoader(follow=True)``: training starts while Spark still writes.

Real Spark jobs commit a partition at a time (``commit="partition"``) or a micro-batch at a time
(``mds_sink``) while a loader built at the same moment follows the log. Exactness is asserted as
row sets: every row exactly once in the followed epoch, on one rank and split over two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sparkbridge import etl
from sparkbridge.bridge import StreamingLoader
from sparkbridge.errors import FollowTimeoutError

from tests.etl.helpers import stock_ids

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N = 12_000


def _slow(seconds: float):
    def slow(batches):
        for batch in batches:
            time.sleep(seconds)
            yield batch

    return slow


def _gated(seconds: float, gate: str, ready: int):
    """Partition 0 lands at once; the others wait until ``ready`` files ``gate<k>`` exist (the
    readers have started following), then land ``seconds`` apart per Arrow batch."""
    def slow(batches):
        from pyspark import TaskContext

        if TaskContext.get().partitionId() > 0:
            deadline = time.monotonic() + 180
            while not all(os.path.exists(f"{gate}{k}") for k in range(ready)) and time.monotonic() < deadline:
                time.sleep(0.05)
        for batch in batches:
            time.sleep(seconds)
            yield batch

    return slow


def _slow_frame(spark, n: int = N, parts: int = 6, seconds: float = 1.0):
    return (spark.range(0, n, numPartitions=parts).selectExpr("id", "cast(id as double) / 4 AS x")
            .mapInArrow(_slow(seconds), "id long, x double"))


def _write_in_thread(fn):
    box: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            box["result"] = fn()
        except BaseException as exc:  # reported by the test
            box["error"] = exc
        box["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _check(batch) -> list[int]:
    ids = batch["id"].numpy()
    assert (batch["x"].numpy() == ids / 4).all()
    return ids.tolist()


def _warm(spark) -> None:
    """Start the session's Python workers first: a cold start costs seconds that belong to no job."""
    spark.range(0, 100, numPartitions=2).mapInArrow(_slow(0.0), "id long").collect()


def test_training_starts_while_spark_writes_and_reads_every_row_once(spark, tmp_path):
    out = str(tmp_path / "ds")
    _warm(spark)
    started = time.monotonic()
    thread, box = _write_in_thread(lambda: etl.write_mds(_slow_frame(spark, parts=8), out, commit="partition"))
    loader = StreamingLoader(out, batch_size=256, shuffle=True, seed=5, follow=True, follow_poll=0.05)
    ids, first = [], None
    for batch in loader:
        first = first if first is not None else time.monotonic() - started
        ids += _check(batch)
    thread.join(timeout=120)
    assert "error" not in box, box.get("error")
    job = box["seconds"]
    assert first < job / 2, f"first batch after {first:.1f} s of a {job:.1f} s job"
    assert sorted(ids) == list(range(N)) and len(ids) == N  # every row once
    assert loader.version == box["result"].version  # later epochs read the finished version
    second = [i for batch in loader for i in _check(batch)]
    assert sorted(second) == list(range(N)) and len(loader) == -(-N // 256)
    loader.close()
    assert sorted(stock_ids(out)) == list(range(N))


def test_a_followed_epoch_resumes_with_exactly_the_unseen_rows(spark, tmp_path):
    out = str(tmp_path / "ds")
    thread, box = _write_in_thread(lambda: etl.write_mds(_slow_frame(spark, seconds=0.5), out, commit="partition"))
    loader = StreamingLoader(out, batch_size=200, shuffle=True, seed=9, follow=True, follow_poll=0.05)
    seen = []
    for k, batch in enumerate(loader):
        seen += _check(batch)
        if k == 6:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    assert state["follow"]["batches"] == 7 and state["follow"]["history"][0] == [0, state["version"]]
    resumed = StreamingLoader(out, batch_size=200, shuffle=True, seed=9, follow=True, follow_poll=0.05)
    resumed.load_state_dict(state)
    rest = [i for batch in resumed for i in _check(batch)]
    thread.join(timeout=120)
    assert "error" not in box, box.get("error")
    assert len(seen) == 1400 and not set(seen) & set(rest)
    assert sorted(seen + rest) == list(range(N))
    resumed.close()


def test_following_a_structured_stream_until_it_goes_quiet(spark, tmp_path):
    src, out, ckpt = tmp_path / "in", str(tmp_path / "ds"), str(tmp_path / "ckpt")
    src.mkdir()

    def drop(k: int) -> None:
        tmp = src / f".part-{k}.csv"
        tmp.write_text("id,x\n" + "".join(f"{k * 100 + i},{(k * 100 + i) / 4}\n" for i in range(100)))
        tmp.rename(src / f"part-{k}.csv")  # the file source must never see a half-written file

    drop(0)
    query = (spark.readStream.schema("id LONG, x DOUBLE").option("header", "true").csv(str(src))
             .writeStream.foreachBatch(etl.mds_sink(out)).option("checkpointLocation", ckpt)
             .trigger(processingTime="500 milliseconds").start())
    try:
        loader = StreamingLoader(out, batch_size=50, follow=True, follow_idle_timeout=6.0, follow_poll=0.1)
        ids = []
        for k, batch in enumerate(loader):
            ids += _check(batch)
            if k in (1, 3, 5, 7):  # a new file lands while the trainer is reading
                drop(k // 2 + 1)
        assert sorted(ids) == list(range(500))
    finally:
        query.stop()
    loader.close()


def test_follow_waits_for_the_first_commit_and_says_what_it_waited_for(tmp_path):
    with pytest.raises(FollowTimeoutError, match=r"waited 1 s for the first commit to .*ds"):
        StreamingLoader(str(tmp_path / "ds"), batch_size=8, follow=True, follow_timeout=1.0, follow_poll=0.1)


RANK_FOLLOWER = r'''
import json, sys, torch, torch.distributed as dist
from sparkbridge.bridge import StreamingLoader
dist.init_process_group("gloo")
out, path = sys.argv[1], sys.argv[2]
loader = StreamingLoader(path, batch_size=128, shuffle=True, seed=3, follow=True, follow_poll=0.05)
open(f"{out}/ready{dist.get_rank()}", "w").close()  # the writer's later partitions wait for these
ids, steps, followed = [], 0, []
for batch in loader:
    ids += batch["id"].tolist()
    steps += 1
    followed.append(loader.state_dict().get("follow") is not None)
    dist.all_reduce(torch.zeros(1))  # what DDP does every step: a rank with fewer steps would hang here
json.dump({"ids": ids, "steps": steps, "followed": all(followed)}, open(f"{out}/rank{dist.get_rank()}.json", "w"))
loader.close()
dist.destroy_process_group()
'''


def test_two_ranks_follow_one_live_dataset_disjoint_complete_same_steps(spark, tmp_path):
    out = str(tmp_path / "ds")
    script = tmp_path / "rank.py"
    script.write_text(RANK_FOLLOWER)
    n = 5001  # odd: the ranks' shares differ by one row, and the last step is padded
    # the ranks must follow a write still running: the later partitions wait until both loaders
    # are built (a warm Spark wrote all 5001 rows before torchrun had started, and the ranks then
    # read a finished dataset, whose padding is another matter)
    frame = (spark.range(0, n, numPartitions=5).selectExpr("id", "cast(id as double) / 4 AS x")
             .mapInArrow(_gated(0.7, str(tmp_path / "ready"), 2), "id long, x double"))
    thread, box = _write_in_thread(lambda: etl.write_mds(frame, out, commit="partition"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={_free_port()}", str(script), str(tmp_path), out],
                          capture_output=True, text=True, timeout=240, cwd=str(REPO),
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    thread.join(timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "error" not in box, box.get("error")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    both = set(r0["ids"]) & set(r1["ids"])
    facts = (f"steps {r0['steps']}/{r1['steps']}, rows {len(r0['ids'])}/{len(r1['ids'])}, distinct "
             f"{len(set(r0['ids']))}/{len(set(r1['ids']))}, in both {len(both)} (e.g. {sorted(both)[:5]}), "
             f"log: {sorted(os.listdir(os.path.join(out, '_log')))}")
    assert r0["followed"] and r1["followed"], facts  # every batch came from the followed epoch
    assert r0["steps"] == r1["steps"] == -(-((n + 1) // 2) // 128), facts
    assert not both, facts  # padding repeats a rank's own rows
    assert set(r0["ids"]) | set(r1["ids"]) == set(range(n))
    assert len(r0["ids"]) + len(r1["ids"]) == 2 * ((n + 1) // 2)  # one padded row on the smaller share


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
