"""The dataset log without Spark: entries, conflicts, checkpoints, vacuum fences, derived files.

Every test commits real entries to a real folder (and, where the storage differs, to SeaweedFS)."""

from __future__ import annotations

import json
import os
import time

import pytest

from sparkbridge.errors import (
    CommitConflictError,
    DatasetExistsError,
    LogError,
    SchemaMismatchError,
    UnsafePathError,
    VersionNotFoundError,
)
from sparkbridge.format.mds import shard_config
from sparkbridge.log import Draft, LogReader, Superseded, commit, open_dataset, sync_derived, vacuum
from sparkbridge.log.entry import LogEntry, entry_name
from sparkbridge.log.snapshot import CHECKPOINT_INTERVAL
from sparkbridge.log.commit import write_checkpoint
from sparkbridge.storage import open_storage

SCHEMA = {"fingerprint": "f1", "columns": [], "nulls": "error", "compression": None, "hashes": []}
OTHER = dict(SCHEMA, fingerprint="f2")
_CFG = shard_config(column_names=["id"], column_encodings=["int64"], compression=None, hashes=[], size_limit=1 << 20)


def shard(name: str, rows: int) -> dict:
    """An entry as an int64-column shard of ``rows`` rows declares it: count, offsets, 8 bytes a row."""
    return dict(_CFG, samples=rows, raw_data={"basename": name, "bytes": 8 + 12 * rows, "hashes": {}}, zip_data=None)


def wid(k: int) -> str:
    return f"j20260101T000000-{k:08x}"


def put(storage, draft: Draft):
    return commit(storage, draft)


def write(storage, k: int, mode: str, read_version: int, rows: int = 10, schema=SCHEMA, **kw):
    base = LogReader(storage).refresh()
    remove = tuple((s.get("zip_data") or s["raw_data"])["basename"] for s in base.shards) if mode == "overwrite" else ()
    return put(storage, Draft(operation="write", mode=mode, write_id=wid(k), read_version=read_version,
                              add=(shard(f"{wid(k)}/p00000-a0/shard.00000.mds", rows),), remove=remove,
                              schema=schema, **kw))


@pytest.fixture
def st(tmp_path):
    return open_storage(str(tmp_path / "ds"))


def test_versions_replay_and_time_travel(st):
    write(st, 1, "create", -1, rows=5)
    write(st, 2, "append", 0, rows=7)
    write(st, 3, "overwrite", 1, rows=3)
    latest = open_dataset(st.root)
    assert (latest.version, latest.rows, len(latest.shards)) == (2, 3, 1)
    assert [open_dataset(st.root, version=v).rows for v in range(3)] == [5, 12, 3]
    assert latest.identity == f"v2:{LogReader(st).read_entry(2).commit_id}"
    with pytest.raises(VersionNotFoundError, match="versions 0 to 2; version=7 does not exist"):
        open_dataset(st.root, version=7)


def test_a_taken_snapshot_is_handed_over_and_the_reader_reads_the_store_again(st):
    write(st, 1, "create", -1, rows=5)
    reader = LogReader(st)
    copied = reader.snapshot()
    assert copied is not reader.latest()  # a copy: the reader keeps its own state
    taken = reader.snapshot(take=True)
    assert (taken.version, taken.rows) == (0, 5) and taken.shards == copied.shards
    write(st, 2, "append", 0, rows=7)
    again = reader.snapshot()  # read from the store again, not advanced on the taken one
    assert (again.version, again.rows) == (1, 12) and again is not taken
    assert (taken.version, taken.rows) == (0, 5)  # the taken snapshot is not changed by the reader


def test_conflict_rules(st):
    write(st, 1, "create", -1)
    write(st, 2, "append", 0)  # lands while the others below planned on version 0
    write(st, 3, "append", 0)  # two appends never conflict
    with pytest.raises(CommitConflictError, match="version 1: append by .*landed while this overwrite"):
        write(st, 4, "overwrite", 0)
    with pytest.raises(DatasetExistsError, match="a dataset was committed while this write ran"):
        write(st, 5, "create", -1)
    with pytest.raises(SchemaMismatchError, match="schema .* differs"):
        write(st, 6, "append", 2, schema=OTHER)
    write(st, 7, "overwrite", 2, schema=OTHER)  # planned on the latest: fine, and changes the schema
    with pytest.raises(CommitConflictError, match="the dataset was replaced .*version 3: overwrite by"):
        write(st, 8, "append", 2)  # planned before the overwrite
    assert open_dataset(st.root).rows == 10 and open_dataset(st.root).schema["fingerprint"] == "f2"


def test_a_partition_is_claimed_once_and_a_stream_batch_committed_once(st):
    put(st, Draft(operation="begin", mode="create", write_id=wid(1), read_version=-1, schema=SCHEMA))
    part = Draft(operation="partition", write_id=wid(1), read_version=0, partition=3,
                 add=(shard(f"{wid(1)}/p00003-a5/shard.00000.mds", 4),))
    put(st, part)
    retry = Draft(operation="partition", write_id=wid(1), read_version=0, partition=3,
                  add=(shard(f"{wid(1)}/p00003-a9/shard.00000.mds", 4),))
    with pytest.raises(Superseded, match="partition 3 of write .* was already committed"):
        put(st, retry)
    put(st, Draft(operation="complete", write_id=wid(1), read_version=1, rows=4))
    with pytest.raises(Superseded, match="already complete"):
        put(st, Draft(operation="partition", write_id=wid(1), read_version=1, partition=4,
                      add=(shard(f"{wid(1)}/p00004-a6/shard.00000.mds", 4),)))
    snap = open_dataset(st.root)
    assert snap.rows == 4 and snap.writes[wid(1)].state == "complete" and snap.writes[wid(1)].partitions == [3]

    txn = {"app_id": "query-1", "batch_id": 0}
    put(st, Draft(operation="stream", write_id=wid(2), read_version=2, txn=txn, schema=SCHEMA,
                  add=(shard(f"{wid(2)}/p00000-a0/shard.00000.mds", 6),)))
    with pytest.raises(Superseded, match="batch 0 of stream query-1 is already committed"):
        put(st, Draft(operation="stream", write_id=wid(3), read_version=2, txn=txn, schema=SCHEMA,
                      add=(shard(f"{wid(3)}/p00000-a0/shard.00000.mds", 6),)))
    assert open_dataset(st.root).rows == 10 and open_dataset(st.root).txns == {"query-1": 0}


def test_checkpoints_shorten_the_replay_and_a_damaged_one_is_ignored(st):
    write(st, 0, "create", -1, rows=1)
    for k in range(1, CHECKPOINT_INTERVAL + 3):
        write(st, k, "append", k - 1, rows=1)
    reader = LogReader(st)
    assert write_checkpoint(st, reader, CHECKPOINT_INTERVAL)
    expected = open_dataset(st.root)
    assert expected.rows == CHECKPOINT_INTERVAL + 3
    # a fresh reader replays from the checkpoint: it reads no entry below it
    os.rename(st.local_path(entry_name(3)), st.local_path(entry_name(3)) + ".hidden")
    assert open_dataset(st.root).rows == expected.rows
    os.rename(st.local_path(entry_name(3)) + ".hidden", st.local_path(entry_name(3)))
    path = st.local_path(f"_log/{CHECKPOINT_INTERVAL:020d}.checkpoint.json")
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(b"XXXX")
    assert open_dataset(st.root).rows == expected.rows  # checksum mismatch: replayed from 0


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.update(version=9), "the entry says version 9, its file name says 1"),
    (lambda e: e.update(format="sparkbridge.log/9"), "upgrade sparkbridge"),
    (lambda e: e.update(operation="drop_table"), "unknown operation"),
    (lambda e: e["add"][0]["raw_data"].update(basename="../../x.mds"), "added shard 0, raw_data"),
    (lambda e: e["add"][0].update(samples=-1), "samples must be an int"),
    (lambda e: e.update(remove=["/etc/passwd"]), "removed shard 0"),
])
def test_damaged_or_hostile_entries_are_refused_naming_the_file(st, edit, message):
    write(st, 1, "create", -1)
    write(st, 2, "append", 0)
    path = st.local_path(entry_name(1))
    obj = json.loads(open(path).read())
    edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f)
    with pytest.raises((LogError, UnsafePathError), match=message) as info:
        open_dataset(st.root)
    assert "_log/00000000000000000001.json" in str(info.value)


def test_a_missing_entry_below_the_latest_is_reported(st):
    write(st, 1, "create", -1)
    write(st, 2, "append", 0)
    os.unlink(st.local_path(entry_name(0)))
    with pytest.raises(LogError, match=r"versions \[0\] are missing"):
        open_dataset(st.root)


def _touch(st, rel: str, age: float = 0.0) -> None:
    st.write_bytes_atomic(rel, b"x")
    if age:
        t = time.time() - age
        os.utime(st.local_path(rel), (t, t))


def test_vacuum_fences_a_stalled_write_and_its_late_commit_is_refused(st):
    write(st, 1, "create", -1)
    zombie = wid(9)
    _touch(st, f"{zombie}/p00000-a1/shard.00000.mds", age=7200)  # a write that stalled two hours ago
    _touch(st, f"{wid(8)}/p00000-a1/shard.00000.mds")  # one active right now
    plan = vacuum(st, retention_seconds=3600, dry_run=True)
    assert plan.fence == [zombie] and plan.kept_active == [wid(8)]
    assert plan.delete == [f"{zombie}/p00000-a1/shard.00000.mds"]
    assert os.path.exists(st.local_path(plan.delete[0]))  # dry run
    done = vacuum(st, retention_seconds=3600)
    assert done.committed_version == 1 and not os.path.exists(st.local_path(plan.delete[0]))
    # the zombie wakes up and commits what it wrote: refused, nothing visible
    with pytest.raises(CommitConflictError, match="fenced by a vacuum"):
        write(st, 9, "append", 0)
    assert open_dataset(st.root).rows == 10
    assert os.path.exists(st.local_path(f"{wid(8)}/p00000-a1/shard.00000.mds"))


def test_vacuum_keeps_replaced_versions_for_the_retention_window(st):
    write(st, 1, "create", -1)
    write(st, 2, "overwrite", 0)
    for name in (f"{wid(1)}/p00000-a0/shard.00000.mds", f"{wid(2)}/p00000-a0/shard.00000.mds"):
        _touch(st, name)
    assert vacuum(st, retention_seconds=3600).delete == []  # version 0 replaced just now: kept
    assert open_dataset(st.root, version=0).rows == 10
    plan = vacuum(st, retention_seconds=0)
    assert plan.delete == [f"{wid(1)}/p00000-a0/shard.00000.mds"] and plan.retained_from == 1
    with pytest.raises(VersionNotFoundError, match="no longer retained"):
        open_dataset(st.root, version=0)


def test_derived_files_follow_the_latest_version_and_never_regress(st):
    write(st, 1, "create", -1)
    older = LogReader(st)
    older.refresh()  # a writer that read version 0 ...
    write(st, 2, "append", 0)
    assert sync_derived(st) == 1
    index = json.loads(st.read_bytes("index.json"))
    manifest = json.loads(st.read_bytes("manifest.json"))
    assert len(index["shards"]) == 2 and manifest["extra"]["log_version"] == 1 and manifest["rows"] == 20
    assert sync_derived(st, older) == 1  # ... and syncs late: it re-reads the log, the files stay at 1
    assert json.loads(st.read_bytes("manifest.json"))["extra"]["log_version"] == 1


def test_s3_put_if_absent_has_one_winner_and_reads_back_an_ambiguous_put(s3_bucket, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    st = open_storage(s3_bucket.url("ds"))
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda k: st.put_if_absent("_log/x.json", b"%d" % k), range(16)))
    assert won.count(True) == 1 and st.read_bytes("_log/x.json") == b"%d" % won.index(True)
    monkeypatch.setenv("SPARKBRIDGE_FAULTS", "storage.put_if_absent.after_put=ambiguous")
    assert st.put_if_absent("_log/y.json", b"mine") is True  # applied, the client saw an error
    assert st.put_if_absent("_log/y.json", b"theirs") is False


def test_s3_commits_and_vacuum(s3_bucket):
    st = open_storage(s3_bucket.url("ds"))
    write(st, 1, "create", -1)
    write(st, 2, "append", 0)
    write(st, 3, "append", 0)
    assert open_dataset(st.root).rows == 30
    stray = f"{wid(9)}/p00000-a1/shard.00000.mds"
    st.write_bytes_atomic(stray, b"x")
    assert vacuum(st, retention_seconds=3600).delete == []  # just written: an active write
    time.sleep(1.1)  # S3 times have one-second resolution: "older than 0 s" needs the next second
    plan = vacuum(st, retention_seconds=0)
    assert plan.fence == [wid(9)] and plan.delete == [stray] and not st.exists(stray)
    assert sync_derived(st) == 3 and json.loads(st.read_bytes("manifest.json"))["rows"] == 30
