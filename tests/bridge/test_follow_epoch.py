"""The followed epoch on one process, with partitions committed through the log API (no Spark):
resuming after it, its cost per batch from a large pool, and its decompressions when the landed
data outgrows ``decoded_cache_bytes``."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge import shard_source
from sparkbridge.bridge.follow import _Pool
from tests.bridge.follow_log import PartitionedWrite


def _ids(batches) -> list[int]:
    out = []
    for batch in batches:
        assert (batch["x"].numpy() == batch["id"].numpy() / 4).all()
        out += batch["id"].tolist()
    return out


def test_a_follow_loader_resumes_a_state_saved_after_its_followed_epoch(tmp_path):
    """The saved run finished its followed epoch and was in epoch 1 when it saved; the new loader
    (follow=True, and a new write is open, so it would follow again) resumes epoch 1 on the
    version the saved run read: used to raise AttributeError ('NoneType' has no 'version')."""
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root)
    w.partition(30)
    a = StreamingLoader(root, batch_size=8, follow=True, follow_poll=0.02)
    w.partition(20)
    w.complete()
    assert sorted(_ids(a)) == list(range(50))  # the followed epoch
    seen = []
    for k, batch in enumerate(a):  # epoch 1, on the finished version
        seen += _ids([batch])
        if k == 2:
            break
    state = json.loads(json.dumps(a.state_dict()))
    a.close()
    assert state["epoch"] == 1 and state.get("follow") is None

    more = PartitionedWrite(root, mode="append", first=50)  # something to follow again
    more.partition(7)
    b = StreamingLoader(root, batch_size=8, follow=True, follow_poll=0.02)
    b.load_state_dict(state)
    rest = _ids(b)
    assert b.epoch == 2 and b.version == state["version"]
    b.close()
    assert len(seen) == 24 and not set(seen) & set(rest)
    assert sorted(seen + rest) == list(range(50))  # exactly epoch 1 of the version it read
    more.complete()


@pytest.mark.parametrize("compression", ["zstd", None])
def test_a_shuffled_followed_epoch_larger_than_the_budget_decompresses_each_shard_once(tmp_path, monkeypatch,
                                                                                        compression):
    """20 shards, 1 MiB of decoded_cache_bytes for ~2.4 MB of rows, shuffle=True: each batch
    draws from nearly every shard. A zstd shard is decompressed once into a spill file, an
    uncompressed one is mapped in place, and each is checked (hashed) once; before, an evicted
    shard was read, decompressed and hashed again, thousands of times."""
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root, compression=compression, size_limit=120_000)
    n = 120_000
    for _ in range(4):
        w.partition(n // 4)
    shards = len(w.reader.refresh().shards)
    assert shards >= 20
    passes = []
    real = shard_source.check_shard  # the one place a shard is checked, for followed epochs too

    def counted(stored, **kw):
        passes.append(kw["where"])
        return real(stored, **kw)

    monkeypatch.setattr(shard_source, "check_shard", counted)
    loader = StreamingLoader(root, batch_size=256, shuffle=True, seed=1, follow=True, follow_poll=0.02,
                             decoded_cache_bytes=1 << 20)
    w.complete()
    ids, peak = [], 0
    spill = None
    for batch in loader:
        ids += _ids([batch])
        if loader._follower is not None:
            peak = max(peak, loader._follower.cache.anon_bytes)
            spill = getattr(loader._follower, "_spill_dir", None)
    assert sorted(ids) == list(range(n))
    assert len(passes) == shards, f"{len(passes)} decompress passes for {shards} shards"
    assert (spill is not None) == (compression is not None)
    assert peak <= 1 << 20  # decoded shards in anonymous memory stay within the budget
    assert spill is None or not os.path.exists(spill)  # the spill folder goes when the followed epoch ends
    loader.close()


@pytest.mark.parametrize("draw", ["front", "random"])
def test_the_followed_pool_costs_o_batch_per_draw_whatever_its_size(draw):
    """A draw of 128 rows from a 4M-row pool touches O(128) elements: the survivors are not
    shifted (front) and no mask of the whole pool is built (random); the draws stay exact."""
    size, n, draws = 4_000_000, 128, 50
    pool = _Pool()
    pool.add(np.arange(size, dtype=np.int64))
    before = getattr(pool, "touched", 0)
    front = pool.rows[:n].copy()
    tracemalloc.start()
    got = []
    for k in range(draws):
        if draw == "front":
            got.append(pool.take_front(n))
        else:
            got.append(pool.take_random(n, np.random.default_rng([7, k])))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * n * 8, f"a draw allocated {peak} bytes"  # a whole-pool mask is 4 MB
    if draw == "front":
        assert np.array_equal(pool.rows[:n], front), "the survivors were shifted"
    assert pool.touched - before <= 3 * n * draws  # elements written or scanned: O(batch) each
    taken = np.concatenate(got)
    assert len(np.unique(taken)) == n * draws  # no row twice
    rest = pool.rows[pool.head:pool.end]
    assert pool.size == size - n * draws
    assert np.array_equal(np.sort(np.concatenate([taken, rest])), np.arange(size))  # none lost


def test_the_followed_pool_grows_and_compacts_in_amortized_o_rows():
    """Adds and draws interleaved, as commits land during an epoch: every row comes out once, in
    order, and the pool's work stays proportional to the rows that passed through it."""
    pool, expect, nxt = _Pool(), [], 0
    rng = np.random.default_rng(3)
    for _ in range(2000):
        add = int(rng.integers(0, 300))
        pool.add(np.arange(nxt, nxt + add, dtype=np.int64))
        nxt += add
        take = int(min(pool.size, rng.integers(0, 300)))
        expect.append(pool.take_front(take))
    out = np.concatenate(expect + [pool.take_front(pool.size)])
    assert np.array_equal(out, np.arange(nxt))
    assert pool.touched <= 4 * 2 * nxt  # each row added, moved a bounded number of times, taken


def test_a_resumed_followed_epoch_waits_with_the_loaders_own_follow_settings(tmp_path):
    """A loader that follows nothing itself (follow=False) resumes a followed epoch whose append
    has stalled: it waits follow_timeout (1 s here), not a built-in 600 s."""
    import time

    from sparkbridge.errors import FollowTimeoutError

    root = str(tmp_path / "ds")
    first = PartitionedWrite(root)
    first.partition(16)
    first.complete()
    w = PartitionedWrite(root, mode="append", first=16)
    w.partition(24)
    a = StreamingLoader(root, batch_size=8, follow=True, follow_poll=0.02)
    seen = []
    for k, batch in enumerate(a):
        seen += _ids([batch])
        if k == 1:
            break
    state = a.state_dict()
    a.close()
    b = StreamingLoader(root, batch_size=8, follow_timeout=1.0, follow_poll=0.02)
    b.load_state_dict(state)
    started = time.monotonic()
    rest = []
    with pytest.raises(FollowTimeoutError, match="no commit to .* for 1 s"):
        for batch in b:
            rest += _ids([batch])
    assert time.monotonic() - started < 30
    assert sorted(seen + rest) == list(range(40))  # every landed row once before the wait
    b.close()
