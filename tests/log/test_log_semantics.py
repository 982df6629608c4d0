"""The log's semantics without Spark (README "The dataset log"): a fence rolls a write back, vacuum
never commits when it cannot keep what default readers are served, the conflict checks by name,
and a log saved by an older sparkbridge still reads."""

from __future__ import annotations

import os
import time

import pytest

from sparkbridge.errors import LogError
from sparkbridge.log import Draft, LogReader, commit, open_dataset, vacuum
from sparkbridge.storage import open_storage

from tests.log.test_log import SCHEMA, _touch, shard, wid, write


@pytest.fixture
def st(tmp_path):
    return open_storage(str(tmp_path / "ds"))


def test_vacuum_refuses_before_committing_when_the_served_version_is_gone(st):
    """A log as an older vacuum left it: retained_from above the version default readers are
    served (a partitioned write still open and active). Vacuum must fail before committing."""
    write(st, 1, "create", -1)
    commit(st, Draft(operation="begin", mode="append", write_id=wid(2), read_version=0, schema=SCHEMA))
    commit(st, Draft(operation="partition", write_id=wid(2), read_version=1, partition=0,
                     add=(shard(f"{wid(2)}/p00000-a0/shard.00000.mds", 4),)))
    commit(st, Draft(operation="vacuum", write_id=wid(3), read_version=2, retained_from=2))
    _touch(st, f"{wid(2)}/p00000-a0/shard.00000.mds")  # the open write is active
    with pytest.raises(LogError, match=f"version 0, which default readers .* no longer retained.*{wid(2)}"):
        vacuum(st, retention_seconds=3600)
    assert LogReader(st).refresh().version == 3  # nothing committed


def test_a_fence_rolls_back_an_overwrite_and_restores_its_schema(st):
    write(st, 1, "create", -1, rows=5)
    other = dict(SCHEMA, fingerprint="f2")
    commit(st, Draft(operation="begin", mode="overwrite", write_id=wid(2), read_version=0, schema=other,
                     remove=(f"{wid(1)}/p00000-a0/shard.00000.mds",)))
    commit(st, Draft(operation="partition", write_id=wid(2), read_version=1, partition=0,
                     add=(shard(f"{wid(2)}/p00000-a0/shard.00000.mds", 3),)))
    assert open_dataset(st.root).rows == 3  # what a follower sees while it is open
    for rel in (f"{wid(1)}/p00000-a0/shard.00000.mds", f"{wid(2)}/p00000-a0/shard.00000.mds"):
        _touch(st, rel, age=7200)
    old = time.time() - 7200
    for name in os.listdir(st.local_path("_log")):
        os.utime(st.local_path(f"_log/{name}"), (old, old))
    plan = vacuum(st, retention_seconds=3600)
    assert plan.fence == [wid(2)] and plan.delete == []  # version 2 (its partition) was the latest: kept
    snap = open_dataset(st.root)
    assert (snap.rows, snap.schema["fingerprint"], snap.writes[wid(2)].state) == (5, "f1", "fenced")
    assert LogReader(st).complete_version() == snap.version
    assert vacuum(st, retention_seconds=0).delete == [f"{wid(2)}/p00000-a0/shard.00000.mds"]
    assert os.path.exists(st.local_path(f"{wid(1)}/p00000-a0/shard.00000.mds"))
    assert open_dataset(st.root).rows == 5
