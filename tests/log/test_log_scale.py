"""The log and the driver at many shards and entries (issue 20 item 4): what the fixes found by
``bench/metadata.py`` changed, pinned by exact values (how the cost grows is the bench's to show,
never a timing here)."""

from __future__ import annotations

import collections
import json
import os

import pytest

from sparkbridge.errors import LogError
from sparkbridge.log.commit import Draft, commit
from sparkbridge.log.entry import CommitUnit, LogEntry, Operation, checkpoint_name, entry_name
from sparkbridge.log.snapshot import CHECKPOINT_INTERVAL, LogReader, Snapshot
from sparkbridge.storage import LocalStorage, open_storage

from tests.log.writes import ID_SCHEMA, Write, read_ids


@pytest.fixture
def fsynced(monkeypatch):
    """Every path ``os.fsync`` is called on, counted (the real fsync still runs)."""
    seen: collections.Counter = collections.Counter()
    real = os.fsync

    def counting(fd):
        seen[os.readlink(f"/proc/self/fd/{fd}")] += 1
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return seen


def _shard_files(root: str) -> set[str]:
    out = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if ".mds" in name:
                out.add(os.path.realpath(os.path.join(folder, name)))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced descriptors")
@pytest.mark.parametrize("unit", ["partition", "job"])
def test_every_shard_file_is_fsynced_once(tmp_path, fsynced, unit):
    """A partitioned write's task fsynced every file of every partition published before it
    (``fsync_tree`` of the whole write folder: quadratic in partitions), and a job commit every
    file twice (before and after the rename). Once each is what makes them durable."""
    storage = open_storage(str(tmp_path / "ds"))
    w = Write(storage, "error", commit=unit)
    parts = [list(range(p * 100, p * 100 + 100)) for p in range(4)]
    for p, ids in enumerate(parts):
        w.task(p, ids)
    entry = w.finish(partitions=4)
    snap = LogReader(storage).snapshot()
    assert sorted(read_ids(storage, snap)) == list(range(400))
    assert snap.rows == 400 and entry.version == (5 if unit == "partition" else 0)
    files = _shard_files(str(tmp_path / "ds"))
    assert len(files) == 4 and len(snap.shards) == 4
    # every shard fsynced exactly once, under the name it had then (staging) or has now
    shard_syncs: collections.Counter = collections.Counter()
    for path, n in fsynced.items():
        if ".mds" in path:
            shard_syncs["/".join(path.split("/")[-2:])] += n  # <attempt>/<shard>: staged or published
    assert sorted(shard_syncs.values()) == [1, 1, 1, 1], shard_syncs
    assert set(shard_syncs) == {"/".join(p.split("/")[-2:]) for p in files}


def test_listing_after_a_name_stats_only_newer_files(tmp_path, monkeypatch):
    """``list_info(prefix, start_after=...)`` (a reader's refresh) stat'ed every file of ``_log/``
    and dropped the older ones afterwards: O(entries) stat calls per commit."""
    storage = LocalStorage(str(tmp_path))
    os.makedirs(tmp_path / "_log")
    for v in range(6):
        (tmp_path / entry_name(v)).write_bytes(b"x" * (v + 1))
    stated: list[str] = []
    real = os.stat

    def counting(path, *a, **kw):
        if str(path).endswith(".json"):
            stated.append(os.path.basename(str(path)))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "stat", counting)
    got = storage.list_info("_log/", start_after=entry_name(3))
    assert [(f.rel, f.size) for f in got] == [(entry_name(4), 5), (entry_name(5), 6)]
    assert sorted(stated) == [os.path.basename(entry_name(4)), os.path.basename(entry_name(5))]
    stated.clear()
    assert [f.rel for f in storage.list_info("_log/")] == [entry_name(v) for v in range(6)]
    assert len(stated) == 6


def _entry(version: int, names: list[str], *, op=Operation.APPEND, remove=(), write_id="w") -> LogEntry:
    from sparkbridge.format.mds import index_entry, shard_config

    config = shard_config(column_names=["id"], column_encodings=["int64"], compression=None, hashes=[],
                          size_limit=None)
    add = tuple(index_entry(config, samples=1, raw_basename=n, raw=b"\0" * 20) for n in names)
    return LogEntry(operation=op, commit=CommitUnit.JOB if op in (Operation.APPEND, Operation.CREATE,
                                                                  Operation.OVERWRITE) else None,
                    write_id=write_id, read_version=version - 1, version=version, add=add, remove=tuple(remove),
                    schema=ID_SCHEMA if version == 0 else None)


def test_parsed_entries_and_checkpoints_share_their_column_lists(tmp_path):
    """The shards of one log entry (and of one checkpoint) share one set of column lists, as an
    ``index.json``'s do: three lists a shard, 300,000 at 100,000 shards, were each parsed and
    checked on their own."""
    e = _entry(0, [f"w/s{i}.mds" for i in range(3)], op=Operation.CREATE)
    parsed = LogEntry.from_bytes(e.to_bytes(), where="test", expect_version=0)
    a, b, c = parsed.add
    for key in ("column_names", "column_encodings", "column_sizes"):
        assert a[key] is b[key] is c[key]
    assert [s["raw_data"]["basename"] for s in parsed.add] == ["w/s0.mds", "w/s1.mds", "w/s2.mds"]
    assert json.loads(parsed.to_bytes()) == json.loads(e.to_bytes())

    storage = LocalStorage(str(tmp_path))
    from sparkbridge.log.snapshot import checkpoint_bytes

    snap = Snapshot(root=storage.root, version=-1)
    snap.apply(parsed)
    storage.write_bytes_atomic(checkpoint_name(0), checkpoint_bytes(snap))
    storage.put_if_absent(entry_name(0), e.to_bytes())
    loaded = LogReader(storage).read_checkpoint(0)
    x, y, z = loaded.shards
    assert x["column_names"] is y["column_names"] is z["column_names"]
    assert loaded.shards == snap.shards and loaded.rows == 3


def _names(snap: Snapshot) -> list[str]:
    return [s["raw_data"]["basename"] for s in snap.shards]


def test_replay_keeps_refusing_a_shard_added_twice_across_removes_copies_and_rollbacks():
    """A replay appends in place and keeps the set of stored names between entries (a new list
    and a new set an entry made it O(entries x shards)): the set must follow every way the
    shard list changes: appends, an overwrite's removals, a copy changed on its own, a fenced
    overwrite rolled back (its removed shards return)."""
    snap = Snapshot(root="r", version=-1)
    snap.apply(_entry(0, ["w/a.mds", "w/b.mds"], op=Operation.CREATE))
    snap.apply(_entry(1, ["w/c.mds"]))
    with pytest.raises(LogError, match=r"shard w/b.mds is already in the dataset \(version 1\)"):
        snap.apply(_entry(2, ["w/x.mds", "w/b.mds"]))
    assert _names(snap) == ["w/a.mds", "w/b.mds", "w/c.mds"] and snap.version == 1

    other = snap.copy()
    other.apply(_entry(2, ["w/d.mds"]))
    snap.apply(_entry(2, ["w/e.mds"]))  # the copy's d is not the original's
    assert _names(other) == ["w/a.mds", "w/b.mds", "w/c.mds", "w/d.mds"]
    assert _names(snap) == ["w/a.mds", "w/b.mds", "w/c.mds", "w/e.mds"]
    snap.apply(_entry(3, ["w/d.mds"]))
    assert snap.rows == 5

    # an overwrite removes all, then a removed name may come back; a present one may not
    snap.apply(_entry(4, ["v/f.mds"], op=Operation.OVERWRITE, remove=_names(snap), write_id="v"))
    assert _names(snap) == ["v/f.mds"]
    snap.apply(_entry(5, ["w/a.mds"]))
    with pytest.raises(LogError, match="shard v/f.mds is already in the dataset"):
        snap.apply(_entry(6, ["v/f.mds"]))

    # an open (partitioned) overwrite removes a and f; a fence rolls it back: they are served
    # again, and adding them once more is refused
    snap.apply(LogEntry(operation=Operation.OVERWRITE, commit=CommitUnit.PARTITION, write_id="j20260101T000000-00000000",
                        read_version=5, version=6, remove=("w/a.mds", "v/f.mds"), schema=ID_SCHEMA))
    assert _names(snap) == []
    snap.apply(_entry(7, ["w/g.mds"]))
    snap.apply(LogEntry(operation=Operation.VACUUM, write_id="vac", read_version=7, version=8,
                        fence=("j20260101T000000-00000000",)))
    assert _names(snap) == ["v/f.mds", "w/a.mds", "w/g.mds"]
    with pytest.raises(LogError, match="shard w/a.mds is already in the dataset"):
        snap.apply(_entry(9, ["w/a.mds"]))
    snap.apply(_entry(9, ["w/h.mds"]))
    assert _names(snap) == ["v/f.mds", "w/a.mds", "w/g.mds", "w/h.mds"] and snap.rows == 4


def test_the_vacuum_after_an_append_reads_no_entry_of_the_retention_window(tmp_path, monkeypatch):
    """Every ``write_mds`` ends with a vacuum, which opened the dataset again and read every entry
    of the retention window (an hour by default) to learn which files retained versions name:
    O(entries) a write on a busy log. On an append-only log every file is in the latest version,
    so nothing of the window needs reading; after an overwrite the old version's files are still
    kept inside the window and deleted once it has passed."""
    from tests.log.writes import write_ids

    storage = open_storage(str(tmp_path / "ds"))
    for k in range(CHECKPOINT_INTERVAL + 3):  # versions 0..34: a checkpoint at 32
        write_ids(storage, "error" if k == 0 else "append", [[k]])
    read: list[str] = []
    real = LocalStorage.read_bytes

    def counting(self, rel):
        if rel.startswith("_log/"):
            read.append(rel)
        return real(self, rel)

    monkeypatch.setattr(LocalStorage, "read_bytes", counting)
    w = Write(storage, "append")
    w.task(0, [1000])
    w.finish(partitions=1)  # version 35 (no vacuum in the helper's finish)
    read.clear()
    w.job.after_commit(retention_seconds=3600)  # what write_mds runs: derived files, then vacuum
    # the write's reader had the log replayed: the vacuum reads no entry and no checkpoint again,
    # but the replay of the window's first version (0: every version is inside the hour)
    assert read == [entry_name(0)]
    snap = LogReader(storage).snapshot()
    assert snap.version == 35 and sorted(read_ids(storage, snap)) == list(range(35)) + [1000]

    write_ids(storage, "overwrite", [[7]])  # version 36 replaces every shard
    old = {s["raw_data"]["basename"] for s in snap.shards}
    from sparkbridge.log.vacuum import plan_vacuum, vacuum

    assert plan_vacuum(storage, retention_seconds=3600).delete == []  # inside the window: kept
    plan = vacuum(storage, retention_seconds=0)
    assert set(plan.delete) == old and len(plan.delete) == 36
    assert read_ids(storage, LogReader(storage).snapshot()) == [7]


def test_a_checkpoint_is_hashed_as_stored_and_format_1_is_still_read(tmp_path):
    """Format 1 hashed another serialization of the state (sorted keys, spaced separators): a
    writer serialized the state twice and every reader serialized the parsed state again to check
    it (~0.5 s an open at 100,000 shards). Format 2 stores the sha256 of the stored bytes."""
    import hashlib

    from sparkbridge.log.commit import write_checkpoint
    from tests.log.writes import write_ids

    storage = open_storage(str(tmp_path / "ds"))
    for k in range(CHECKPOINT_INTERVAL + 2):  # the commit of version 32 writes its checkpoint
        write_ids(storage, "error" if k == 0 else "append", [[k]])
    path = storage.local_path(checkpoint_name(CHECKPOINT_INTERVAL))
    data = open(path, "rb").read()
    obj = json.loads(data)
    assert sorted(obj) == ["format", "sha256", "state"] and obj["format"] == "sparkbridge.log.checkpoint/2"
    state = json.dumps(obj["state"], sort_keys=True, separators=(",", ":")).encode()
    assert data == b'{"format":"sparkbridge.log.checkpoint/2","sha256":"' + hashlib.sha256(state).hexdigest().encode() \
        + b'","state":' + state + b"}"
    reader = LogReader(storage)
    assert reader.read_checkpoint(CHECKPOINT_INTERVAL).to_state() == obj["state"]
    expected = reader.snapshot()
    assert (expected.version, sorted(read_ids(storage, expected))) == (33, list(range(34)))

    # the same state written as sparkbridge before this format did: read as it was
    old = {"format": "sparkbridge.log.checkpoint/1", "state": obj["state"],
           "sha256": hashlib.sha256(json.dumps(obj["state"], sort_keys=True).encode()).hexdigest()}
    with open(path, "wb") as f:
        f.write(json.dumps(old, sort_keys=True, separators=(",", ":")).encode())
    assert LogReader(storage).read_checkpoint(CHECKPOINT_INTERVAL).to_state() == obj["state"]

    # one byte changed inside the stored state: refused (and a reader replays the entries)
    damaged = data.replace(b'"samples":1', b'"samples":2', 1)
    assert damaged != data
    with open(path, "wb") as f:
        f.write(damaged)
    with pytest.raises(LogError, match="damaged checkpoint"):
        LogReader(storage).read_checkpoint(CHECKPOINT_INTERVAL)
    again = LogReader(storage).snapshot()
    assert again.to_state() == expected.to_state()
    assert write_checkpoint(storage, LogReader(storage), CHECKPOINT_INTERVAL)  # rewritten: read again
    assert LogReader(storage).read_checkpoint(CHECKPOINT_INTERVAL).to_state() == obj["state"]


def test_derived_files_and_vacuum_read_the_writers_state_without_copying_or_changing_it(tmp_path):
    """``sync_derived`` copied the whole state to derive two files and hashed the index three
    times; the vacuum after every write copied it once more (``after``) with no fence to apply.
    They now read the write's own reader state: it must come out unchanged, and the files exact."""
    import hashlib

    from sparkbridge.log.derived import sync_derived
    from sparkbridge.log.vacuum import vacuum
    from tests.log.writes import write_ids

    storage = open_storage(str(tmp_path / "ds"))
    write_ids(storage, "error", [[1, 2], [3]])
    w = Write(storage, "append")
    w.task(0, [4, 5, 6])
    entry = w.finish(partitions=1)
    reader = w.job.reader
    latest = reader.latest()
    before = json.dumps(latest.to_state(), sort_keys=True)
    os.remove(storage.local_path("index.json"))
    os.remove(storage.local_path("manifest.json"))
    assert sync_derived(storage, reader) == entry.version == 1
    plan = vacuum(storage, retention_seconds=3600, reader=reader)
    assert plan.delete == [] and plan.fence == [] and plan.committed_version is None
    assert reader.latest() is latest and json.dumps(latest.to_state(), sort_keys=True) == before
    index = open(storage.local_path("index.json"), "rb").read()
    assert index == latest.index_bytes()
    manifest = json.loads(open(storage.local_path("manifest.json"), "rb").read())
    assert manifest["index_sha256"] == hashlib.sha256(index).hexdigest()
    assert (manifest["rows"], manifest["shards"], manifest["extra"]["log_version"]) == (6, 3, 1)
    assert sorted(read_ids(storage, LogReader(storage).snapshot())) == [1, 2, 3, 4, 5, 6]


def test_validate_checks_older_checkpoints_by_checksum_and_reports_a_damaged_one(tmp_path):
    """``validate`` parsed every checkpoint in full (312 of up to 100,000 shards for a log of
    10,000 entries); the newest is still checked in full, older ones by their checksum, and a
    damaged one is reported either way."""
    from sparkbridge.jobs.datasets import validate_dataset
    from tests.log.writes import write_ids

    storage = open_storage(str(tmp_path / "ds"))
    for k in range(2 * CHECKPOINT_INTERVAL + 1):  # versions 0..64: checkpoints at 32 and 64
        write_ids(storage, "error" if k == 0 else "append", [[k]])
    assert LogReader(storage).checkpoint_versions() == [32, 64]
    report = validate_dataset(storage.root, progress=False)
    assert report.ok and report.rows == 65 and report.version == 64, report.problems
    for v in (32, 64):
        path = storage.local_path(checkpoint_name(v))
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data.replace(b'"samples":1', b'"samples":3', 1))
    report = validate_dataset(storage.root, progress=False)
    damaged = [p for p in report.problems if "damaged checkpoint" in p]
    assert len(damaged) == 2 and "00000000000000000032.checkpoint.json" in damaged[0] \
        and "00000000000000000064.checkpoint.json" in damaged[1], report.problems
    assert LogReader(storage).snapshot().rows == 65  # readers skip both and replay the entries


@pytest.mark.parametrize("name, plain, safe", [
    ("j20260101T000000-0a1b2c3d/p00001-r1a2b3c4d-a7/shard.00000.mds.zstd", True, True),
    ("shard.00000.mds", True, True),
    (".hidden/shard.mds", False, True), ("a/.x", False, True), ("a b/c", False, True), ("é/x", False, True),
    ("a/./b", False, False), ("a/../b", False, False), ("../a", False, False), ("..", False, False),
    ("/etc/passwd", False, False), ("a//b", False, False), ("a/", False, False), ("C:x", False, False),
    ("a\\b", False, False), ("a\nb", False, False), ("a\x00b", False, False), ("", False, False),
    ("x" * 1025, False, False), (None, False, False), (7, False, False),
])
def test_plain_names_take_one_regular_expression_and_every_other_name_the_full_checks(name, plain, safe):
    """200,000 file names an entry of 100,000 shards: the common ones are decided by one regular
    expression, and only names it accepts skip the checks (never one they would refuse)."""
    from sparkbridge.errors import UnsafePathError
    from sparkbridge.format.paths import check_relpath, is_plain

    assert is_plain(name) is plain
    if safe:
        assert check_relpath(name, where="test") == name
    else:
        with pytest.raises(UnsafePathError, match="^test: "):
            check_relpath(name, where="test")


def test_a_shard_table_stats_ahead_only_the_claims_that_cost_memory_and_each_file_once(tmp_path, monkeypatch):
    """Before any order is computed, a table stats the files whose declared size could make the
    order cost more than the file backs: an uncompressed shard declaring at least
    ``STAT_AHEAD_BYTES``, a compressed one declaring more than the budget. A smaller claim costs
    no more than an honest shard of that size, and its file is checked when first opened
    (100,000 stats of small shards were ~1 s of opening a dataset). The early fill and then the
    dataset check the same table: each file stat'ed once however often sizes are checked, the
    budget each time, and a file that does not match is refused on every call."""
    from sparkbridge.bridge import shards as shard_table
    from sparkbridge.bridge.shards import ShardTable
    from sparkbridge.errors import CorruptShardError
    from tests.log.writes import write_ids

    storage = open_storage(str(tmp_path / "ds"))
    write_ids(storage, "error", [[1, 2], [3], [4, 5, 6]])
    snap = LogReader(storage).snapshot()
    stated: list[str] = []
    real = os.stat

    def counting(path, *a, **kw):
        if ".mds" in str(path):
            stated.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "stat", counting)
    small = ShardTable(snap.shards, cache_root=storage.root + "/", origin_root=None, where="ds")
    small.check_declared_sizes(1 << 20)
    assert stated == []  # three small shards: each checked when opened
    monkeypatch.setattr(shard_table, "STAT_AHEAD_BYTES", 1)  # now every one of them is a large claim
    table = ShardTable(snap.shards, cache_root=storage.root + "/", origin_root=None, where="ds")
    table.check_declared_sizes(1 << 20)
    assert len(stated) == 3
    table.check_declared_sizes(1 << 20)
    assert len(stated) == 3
    monkeypatch.setattr(os, "stat", real)

    path = storage.local_path(snap.shards[1]["raw_data"]["basename"])
    with open(path, "r+b") as f:
        f.truncate(10)
    broken = ShardTable(snap.shards, cache_root=storage.root + "/", origin_root=None, where="ds")
    for _ in range(2):
        with pytest.raises(CorruptShardError, match=r"raw_data.bytes=\d+ but the file .* has 10 bytes"):
            broken.check_declared_sizes(1 << 20)
