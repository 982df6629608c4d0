"""Followed epochs under torchrun (gloo, CPU): ranks in lockstep by construction, every failure on
every rank.

Each rank follows a write while it lands and runs an all_reduce per step, as DDP does: a rank
that takes a step the others do not take hangs the job, so the process group's timeout is short
and a hang fails the test in seconds. ``make follow-ddp`` runs the randomized cases at scale
(FOLLOW_DDP_CASES per world size)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from sparkbridge import etl
from tests.bridge.util import torchrun, torchrun_start

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
RANKS = HERE / "follow_ranks.py"


def _ranks(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_two_ranks_stay_in_lockstep_when_partitions_split_a_batch_unevenly(spark, tmp_path):
    """3 partitions x 255 rows at batch 128: after the first partition rank 0 holds 128 rows and
    rank 1 holds 127; rank 0 used to take a step rank 1 did not, and both waited forever."""
    from tests.bridge.test_follow import _warm

    out = tmp_path / "ds"
    _warm(spark)

    def staggered(batches):  # partition p lands about 2 s after partition p - 1: one at a time
        from pyspark import TaskContext

        time.sleep(1.0 + 2.0 * TaskContext.get().partitionId())
        yield from batches

    frame = (spark.range(0, 765, numPartitions=3).selectExpr("id", "cast(id as double) / 4 AS x")
             .mapInArrow(staggered, "id long, x double"))
    box: dict = {}

    def write():
        try:
            box["result"] = etl.write_mds(frame, str(out), commit="partition")
        except BaseException as exc:
            box["error"] = exc

    # the ranks start first and wait for the write's first commit (follow=True waits for it)
    ranks = torchrun_start(RANKS, "follow", tmp_path, out, 128, env={"FOLLOW_PG_TIMEOUT": "20"})
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)) and ranks.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    thread = threading.Thread(target=write)
    thread.start()
    try:
        _, stderr = ranks.communicate(timeout=150)
    finally:
        if ranks.poll() is None:
            ranks.kill()
    thread.join(timeout=120)
    assert "error" not in box, box.get("error")
    assert ranks.returncode == 0, stderr[-4000:]
    r0, r1 = _ranks(tmp_path, 2)
    assert r0["steps"] == r1["steps"] == 3  # 383 and 382 rows: 128 + 128 + 127 (rank 1 pads one row)
    assert r0["pads"] == [0, 0, 0] and r1["pads"] == [0, 0, 1]
    real0, real1 = r0["ids"], r1["ids"][:-1]
    assert len(real0) == 383 and len(real1) == 382
    assert sorted(real0 + real1) == list(range(765))  # every row once, none lost
    assert r1["ids"][-1] in real1  # the padded row repeats one of rank 1's own rows
    assert set(r0["second"]) | set(r1["second"]) == set(range(765))  # the next epoch: the finished version


@pytest.mark.parametrize("world", [2, 3])
def test_randomized_followed_epochs_keep_ranks_in_lockstep_and_read_every_row_once(tmp_path, world):
    """Partition sizes around every multiple of batch x world, empty partitions, fewer rows than
    ranks, commits landing while the ranks step, shuffle and drop_last: equal step counts, every
    row exactly once (padded rows flagged by ``loader.padding``). The first cases are fixed edge
    cases (see follow_ranks._FIXED)."""
    count = int(os.environ.get("FOLLOW_DDP_CASES", "16"))
    seed = int(os.environ.get("FOLLOW_DDP_SEED", "1"))
    proc = torchrun(RANKS, "cases", tmp_path, seed, count, nproc=world,
                    env={"FOLLOW_PG_TIMEOUT": "30", "CASE_TIMEOUT": "30"}, timeout=120 + 5 * count)
    failure = tmp_path / "failure.json"
    detail = failure.read_text()[:3000] if failure.exists() else ""
    detail += "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("crash*.txt")))
    detail += "".join(f"\n{p.stem}: case {p.read_text()}" for p in sorted(tmp_path.glob("case[0-9].txt")))
    assert proc.returncode == 0, detail + proc.stderr[-4000:]
    assert [r["cases"] for r in _ranks(tmp_path, world)] == [count] * world
    print(f"{count} randomized followed epochs on {world} ranks: lockstep, every row once")


def test_a_followed_write_that_fails_raises_the_same_error_on_every_rank(tmp_path):
    """The write is replaced by an overwrite, fenced by a vacuum, or stalls past follow_timeout
    (rank 0 sees it in the log); a shard that only rank 1 reads is damaged (rank 1 sees it);
    no commit ever comes (rank 0 waits for it while the loader is built): every rank raises the
    same error (class and message) within seconds, instead of failing in gloo or waiting for
    the process group's timeout."""
    proc = torchrun(RANKS, "error", tmp_path, "replaced,fenced,timeout,damaged,nothing",
                    env={"FOLLOW_PG_TIMEOUT": "20"}, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _ranks(tmp_path, 2)
    expected = {"replaced": ("CommitConflictError", "was replaced before it completed", 2),
                "fenced": ("CommitConflictError", "was fenced before it completed", 2),
                "timeout": ("FollowTimeoutError", "no commit to .* for 2 s while write .* is still open", 2),
                "damaged": ("CorruptShardError", "p00001-a0/shard.00000.mds.*hash", 2),
                "nothing": ("FollowTimeoutError", "waited 2 s for the first commit", 0)}
    for kind, (name, message, steps) in expected.items():
        a, b = r0[kind], r1[kind]
        assert a["raised"] is not None and b["raised"] is not None, (kind, a, b)
        assert a["raised"]["type"] == b["raised"]["type"] == name, (kind, a["raised"], b["raised"])
        assert a["raised"]["message"] == b["raised"]["message"], kind
        assert re.search(message, b["raised"]["message"]), (kind, b["raised"]["message"])
        # 10 rows a rank at batch 4: 2 steps, then both wait (damaged: 11 each, the last step fails)
        assert a["steps"] == b["steps"] == steps, (kind, a["steps"], b["steps"])
        assert max(a["seconds"], b["seconds"]) < 15, (kind, a["seconds"], b["seconds"])
