"""``sparkbridge.collector.paused_collector``: the cyclic collector is off during bulk metadata
work and comes back exactly as it was."""

from __future__ import annotations

import gc
import threading

from sparkbridge.collector import paused_collector


def test_pauses_nest_share_threads_and_keep_a_callers_own_setting():
    assert gc.isenabled()
    with paused_collector():
        assert not gc.isenabled()
        with paused_collector():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still runs
        entered, leave = threading.Event(), threading.Event()

        def other():
            with paused_collector():
                entered.set()
                leave.wait(10)

        t = threading.Thread(target=other)
        t.start()
        entered.wait(10)
    assert not gc.isenabled()  # the other thread's pause still runs
    leave.set()
    t.join(10)
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_collector():
            pass
        assert not gc.isenabled()  # the caller disabled it: left so
    finally:
        gc.enable()
    try:
        with paused_collector():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled()


def test_a_replay_of_thousands_of_shards_runs_no_collection(tmp_path):
    """An entry of 5,000 shards makes ~25,000 containers: about 35 collections if the collector
    ran (it did, before: 2/3 of the time ``json.loads`` took at 100,000 shards)."""
    from sparkbridge.log import Draft, LogReader, commit
    from sparkbridge.storage import open_storage
    from tests.log.test_log import SCHEMA, shard, wid

    st = open_storage(str(tmp_path / "ds"))
    commit(st, Draft(operation="create", write_id=wid(1), read_version=-1, schema=SCHEMA,
                     add=tuple(shard(f"{wid(1)}/p00000-a0/shard.{k:05d}.mds", 3) for k in range(5000))))
    runs: list[int] = []

    def count(phase, info):
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(count)
    try:
        snap = LogReader(st).snapshot(take=True)
    finally:
        gc.callbacks.remove(count)
    assert (snap.version, len(snap.shards), snap.rows) == (0, 5000, 15000)
    assert runs in ([], [0])  # at most the one young collection when the collector resumes
    assert gc.isenabled()


def test_what_a_pause_made_joins_the_oldest_generation_without_a_collection():
    """When the collector resumed after building a loader over 100,000 shards, its first young
    collection walked every container made during the pause (~1M: Mosaic's reader per shard,
    the entries), then the next one again: ~0.4 s each right after a loader's build. What a pause
    made now joins the oldest generation as it is, without a collection (``gc.freeze()`` then
    ``gc.unfreeze()``); it is walked by the next full collection, like any long-lived object.
    Objects a caller froze itself stay frozen (then the collector just resumes)."""
    runs: list[int] = []

    def count(phase, info):
        if phase == "start":
            runs.append(info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    try:
        with paused_collector():
            made = [{"k": [k]} for k in range(50_000)]
        assert gc.get_count()[0] < 100 and runs == []
        assert any(o is made for o in gc.get_objects(generation=2))  # no young collection walks it again
    finally:
        gc.callbacks.remove(count)
    mine = [{"mine": [1]}]
    gc.freeze()
    try:
        with paused_collector():
            made2 = [{"k": [k]} for k in range(1000)]
        assert gc.get_freeze_count() > 0 and any(o is mine for o in gc.get_objects(generation=2)) is False
    finally:
        gc.unfreeze()
    assert gc.isenabled() and len(made) == 50_000 and len(made2) == 1000


def test_a_small_pause_leaves_what_it_made_young():
    """Promoting everything at the end of every pause put each short pause's garbage cycles in the
    oldest generation, reachable only by a full collection: the log's model test (thousands of
    small replays and commits in one process) ran 1.9x slower at 800 examples, and a followed
    epoch refreshes the log every poll. Only a bulk pause (a large index, a loader's build)
    promotes what it made."""
    gc.collect()
    with paused_collector():
        a: list = []
        b = [a]
        a.append(b)  # a cycle, garbage once the pause ends
        del a, b
    assert gc.collect(generation=0) >= 2  # still young: the next young collection frees it
    assert gc.isenabled()
