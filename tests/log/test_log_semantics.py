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
    commit(st, Draft(operation="append", commit="partition", write_id=wid(2), read_version=0, schema=SCHEMA))
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
    commit(st, Draft(operation="overwrite", commit="partition", write_id=wid(2), read_version=0, schema=other,
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


def test_readme_table_lists_every_conflict_check_in_order(repo_root):
    from sparkbridge.log.commit import CHECKS

    rows = [line.split("|")[1:3] for line in (repo_root / "README.md").read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in {c.name for c in CHECKS}]
    documented = [(name.strip(), where.strip()) for name, where in rows]
    checked: list[tuple[str, str]] = []
    for c in CHECKS:  # a name checked against both an entry and the state is one row: "entry, state"
        if c.name in [n for n, _ in checked]:
            checked = [(n, f"{w}, {c.against}" if n == c.name else w) for n, w in checked]
        else:
            checked.append((c.name, c.against))
    assert documented == checked


def test_no_rows_of_another_write_on_a_schema_an_open_overwrite_introduced(st):
    from sparkbridge.errors import CommitConflictError

    write(st, 1, "create", -1, rows=5)
    other = dict(SCHEMA, fingerprint="f2")
    commit(st, Draft(operation="overwrite", commit="partition", write_id=wid(2), read_version=0, schema=other,
                     remove=(f"{wid(1)}/p00000-a0/shard.00000.mds",)))
    with pytest.raises(CommitConflictError, match=f"write {wid(2)} .*set the schema this append would commit on"):
        write(st, 3, "append", 1, schema=other)
    assert open_dataset(st.root).rows == 0  # (what a follower sees: the open overwrite has no partition yet)


def test_an_append_on_an_open_overwrite_of_the_same_schema_survives_its_rollback(st):
    write(st, 1, "create", -1, rows=5)
    commit(st, Draft(operation="overwrite", commit="partition", write_id=wid(2), read_version=0, schema=SCHEMA,
                     remove=(f"{wid(1)}/p00000-a0/shard.00000.mds",)))
    write(st, 3, "append", 1, rows=2)  # planned on the open overwrite, same schema: allowed
    _touch(st, f"{wid(1)}/p00000-a0/shard.00000.mds")
    _touch(st, f"{wid(3)}/p00000-a0/shard.00000.mds")
    assert vacuum(st, retention_seconds=0).fence == [wid(2)]
    snap = open_dataset(st.root)
    assert (snap.rows, [s["raw_data"]["basename"].split("/")[0] for s in snap.shards]) == (7, [wid(1), wid(3)])
