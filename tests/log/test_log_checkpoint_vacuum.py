"""``vacuum`` deletes superseded checkpoints, and never the one a replaying reader is reading.

Checkpoints are a cache of the replay (``_log/N.checkpoint.json`` every
:data:`CHECKPOINT_INTERVAL` versions); they were never deleted (5.2 GB at 10,000 entries of
100,000 shards). The interleavings that could break a reader, each tested below:

1. a reader listed ``_log/`` and chose a checkpoint, a newer one landed, a vacuum runs, then the
   reader reads its choice: kept while the newer one is younger than the retention window;
2. the same with ``retention_seconds=0`` (the user's choice): the reader's checkpoint is gone and
   it replays from an older one or the entries: slower, the same state;
3. the newest checkpoint is damaged: readers skip it, so the ones below it are kept;
4. a retained version older than the newest checkpoint is replayed from the floor (the newest
   checkpoint at or below ``retained_from``), which is kept;
5. a reader already holding its checkpoint applies entries: entries are never deleted.
"""

from __future__ import annotations

import os
import time

import pytest

from sparkbridge.log import Draft, LogReader, commit, vacuum
from sparkbridge.log.entry import checkpoint_name, entry_name
from sparkbridge.log.snapshot import CHECKPOINT_INTERVAL
from sparkbridge.log.vacuum import plan_vacuum
from sparkbridge.storage import LocalStorage, open_storage

from tests.log.test_log import SCHEMA, shard, wid

HOUR = 3600.0


def _versions(st, upto: int) -> LogReader:
    """Versions 0..``upto``, one append of 1 row each; checkpoints as ``commit`` writes them."""
    reader = LogReader(st)
    for k in range(upto + 1):
        commit(st, Draft(operation="create" if k == 0 else "append", write_id=wid(k), read_version=k - 1,
                         schema=SCHEMA, add=(shard(f"{wid(k)}/p00000-a0/shard.00000.mds", 1),)), reader=reader)
    return reader


def _age(st, rels, seconds: float = 2 * HOUR) -> None:
    then = time.time() - seconds
    for rel in rels:
        os.utime(st.local_path(rel), (then, then))


def _log_files(st) -> list[str]:
    return sorted(os.listdir(st.local_path("_log")))


def _checkpoints(st) -> list[int]:
    return sorted(int(n[:20]) for n in _log_files(st) if n.endswith(".checkpoint.json"))


@pytest.fixture
def st(tmp_path):
    return open_storage(str(tmp_path / "ds"))


def test_superseded_checkpoints_are_deleted_once_the_floor_is_older_than_the_window(st):
    top = 3 * CHECKPOINT_INTERVAL + 1  # checkpoints at 32, 64, 96
    _versions(st, top)
    assert _checkpoints(st) == [32, 64, 96]
    entries = [entry_name(v) for v in range(top + 1)]

    # everything inside the hour: every version is retained, nothing is superseded yet
    plan = plan_vacuum(st, retention_seconds=HOUR)
    assert (plan.retained_from, [p for p in plan.delete if p.startswith("_log/")]) == (0, [])

    # the log written two hours ago: only the latest version is retained, and its checkpoint
    # (96, written then) supersedes 32 and 64
    _age(st, entries + [checkpoint_name(v) for v in (32, 64, 96)])
    expected = LogReader(st).snapshot().to_state()
    plan = vacuum(st, retention_seconds=HOUR)
    assert plan.retained_from == top
    assert plan.delete == [checkpoint_name(32), checkpoint_name(64)]
    assert plan.reasons[checkpoint_name(32)].startswith(f"a checkpoint superseded by {checkpoint_name(96)}")
    assert plan.committed_version == top + 1  # deleted after the vacuum's entry, as every file
    assert _checkpoints(st) == [96]
    # entries are never deleted: every version still replays, and the latest reads the same
    assert [n for n in _log_files(st) if not n.endswith(".checkpoint.json")] == \
        [os.path.basename(entry_name(v)) for v in range(top + 2)]
    again = LogReader(st)
    state = again.snapshot().to_state()
    assert {k: v for k, v in state.items() if k not in ("version", "commit_id", "timestamp", "retained_from")} == \
        {k: v for k, v in expected.items() if k not in ("version", "commit_id", "timestamp", "retained_from")}
    assert state["version"] == top + 1 and len(state["shards"]) == top + 1

    # a vacuum with nothing older than the floor deletes no checkpoint and commits nothing
    plan = vacuum(st, retention_seconds=HOUR)
    assert (plan.delete, plan.committed_version, _checkpoints(st)) == ([], None, [96])


@pytest.mark.parametrize("retention", [HOUR, 0.0])
def test_a_reader_between_its_listing_and_its_checkpoint_read(st, monkeypatch, retention):
    """Interleavings 1 and 2: versions 0..65 were written two hours ago (checkpoints 32, 64). A
    reader lists ``_log/`` and chooses checkpoint 64; before it reads it, versions 66..96 land
    (checkpoint 96) and a vacuum runs. With the window, 96 is younger than it: 64 is the floor and
    stays (32 goes), the reader reads it. With ``retention_seconds=0``, 96 is the floor, 32 and 64
    go, and the reader, finding neither, replays the entries: the same state."""
    first = 2 * CHECKPOINT_INTERVAL + 1
    reader = _versions(st, first)
    _age(st, [entry_name(v) for v in range(first + 1)] + [checkpoint_name(32), checkpoint_name(64)])
    real = LocalStorage.read_bytes
    read: list[str] = []
    plans: list = []
    started: list = []

    def others():
        for k in range(first + 1, 3 * CHECKPOINT_INTERVAL + 1):  # versions 66..96
            commit(st, Draft(operation="append", write_id=wid(k), read_version=k - 1, schema=SCHEMA,
                             add=(shard(f"{wid(k)}/p00000-a0/shard.00000.mds", 1),)), reader=reader)
        assert _checkpoints(st) == [32, 64, 96]
        _age(st, [checkpoint_name(96)] + [entry_name(v) for v in range(first + 1, 97)], 10.0)
        plans.append(vacuum(st, retention_seconds=retention))

    def reading(self, rel):
        if rel == checkpoint_name(64) and not started:
            started.append(True)
            others()  # between this reader's listing and its read of the checkpoint it chose
            read.clear()  # (the others' reads)
        read.append(rel)
        return real(self, rel)

    monkeypatch.setattr(LocalStorage, "read_bytes", reading)
    snap = LogReader(st).snapshot()
    if retention:
        assert (plans[0].retained_from, plans[0].delete) == (first, [checkpoint_name(32)])
        assert _checkpoints(st) == [64, 96]
        assert read == [checkpoint_name(64), entry_name(first)]
    else:
        assert (plans[0].retained_from, plans[0].delete) == (96, [checkpoint_name(32), checkpoint_name(64)])
        assert _checkpoints(st) == [96]
        # its listing offered 64 and 32, both gone when read: every entry is replayed
        assert read == [checkpoint_name(64), checkpoint_name(32)] + [entry_name(v) for v in range(first + 1)]
    assert (snap.version, snap.rows) == (first, first + 1)
    assert sorted(s["raw_data"]["basename"] for s in snap.shards) == \
        sorted(f"{wid(k)}/p00000-a0/shard.00000.mds" for k in range(first + 1))
    latest = LogReader(st).snapshot()
    assert (latest.version, latest.rows) == (97, 97)  # 96 and the vacuum's entry


def test_a_damaged_newest_checkpoint_supersedes_nothing(st):
    """Interleaving 3: readers skip a damaged checkpoint and fall back to the one below it."""
    top = 3 * CHECKPOINT_INTERVAL + 1
    _versions(st, top)
    _age(st, [entry_name(v) for v in range(top + 1)] + [checkpoint_name(v) for v in (32, 64, 96)])
    path = st.local_path(checkpoint_name(96))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data.replace(b'"samples":1', b'"samples":2', 1))
    os.utime(path, (time.time() - 2 * HOUR,) * 2)
    plan = vacuum(st, retention_seconds=HOUR)
    assert plan.delete == [checkpoint_name(32)]  # 64 is the floor: the newest intact one
    assert _checkpoints(st) == [64, 96]
    snap = LogReader(st).snapshot()
    assert (snap.version, snap.rows) == (top + 1, top + 1)


def test_a_retained_version_below_the_newest_checkpoint_replays_from_the_kept_floor(st, monkeypatch):
    """Interleaving 4: versions 0..70 were written two hours ago, 71..97 now: versions from 70
    on are retained, and 70 replays from checkpoint 64 (the floor), which stays; 32 goes."""
    top = 3 * CHECKPOINT_INTERVAL + 1
    _versions(st, top)
    _age(st, [entry_name(v) for v in range(71)] + [checkpoint_name(32), checkpoint_name(64)])
    plan = vacuum(st, retention_seconds=HOUR)
    assert plan.retained_from == 70
    assert plan.delete == [checkpoint_name(32)] and _checkpoints(st) == [64, 96]
    read: list[str] = []
    real = LocalStorage.read_bytes

    def counting(self, rel):
        read.append(rel)
        return real(self, rel)

    monkeypatch.setattr(LocalStorage, "read_bytes", counting)
    reader = LogReader(st)
    reader.refresh()
    read.clear()
    snap = reader.snapshot(70)
    assert read == [checkpoint_name(64)] + [entry_name(v) for v in range(65, 71)]
    assert (snap.version, snap.rows) == (70, 71)
