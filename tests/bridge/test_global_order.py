"""``shuffle_algo="global"`` (:class:`sparkbridge.bridge.order.GlobalOrder`): a global shuffle
computed per batch, through ``StreamingLoader`` on real written datasets: every row once per
epoch on every read path, the same order for any ``num_workers``, exact resume at three
midpoints, disjoint and complete rank shares under a real torchrun, and an elastic resume (saved
by 2 ranks, resumed by 1). It is the default for ``shuffle=True``; a loader left at the default
resumes a state saved under Mosaic's order in that order. (Mosaic's algorithms keep Mosaic's exact
order: tests/bridge/test_values.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkbridge.bridge import ShuffleAlgo, StreamingLoader
from sparkbridge.bridge.order import GlobalOrder
from sparkbridge.bridge.state import StateError
from tests.bridge.util import take, torchrun, write_every_encoding, write_numeric

N, B = 1003, 32
BATCHES = -(-N // B)  # 32: 31 full batches and one of 11
# decoded_cache_bytes: None = the resident row table in memory; 4 KiB = the row table mapped from a file
PATHS = [(0, None), (2, None), (0, 4096), (2, 4096)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("global") / "ds", N, compression="zstd", size_limit=3000)


def make(data, workers=0, budget=None, **kw):
    return StreamingLoader(data, batch_size=B, shuffle=True, seed=11, shuffle_algo=ShuffleAlgo.GLOBAL,
                           num_workers=workers, decoded_cache_bytes=budget, **kw)


def score(ids: np.ndarray) -> float:
    """bench/shuffle.py's shuffle score against the stored order (ids are stored in order)."""
    return float(np.abs(np.arange(len(ids)) - ids).mean() / (len(ids) / 3))


@pytest.fixture(scope="module")
def reference(data):
    loader = make(data)
    assert len(loader) == BATCHES
    epochs = [take(loader), take(loader)]
    loader.close()
    return [np.concatenate(e) for e in epochs]


def test_reference_is_a_global_shuffle(reference):
    for ids in reference:
        assert sorted(ids.tolist()) == list(range(N))  # every row exactly once
        assert score(ids) > 0.9
    assert not np.array_equal(reference[0], reference[1])  # a new shuffle each epoch
    # the loader's order is GlobalOrder's: positions 0..N-1 through the seeded bijection
    order = GlobalOrder(rows=N, shuffle=True, seed=11, epoch=0, start=0, ranks=1, workers=1, batch_size=B)
    assert np.array_equal(reference[0], order.samples(np.arange(N)))


@pytest.mark.parametrize("workers,budget", PATHS)
def test_every_path_gives_the_same_epochs(data, reference, workers, budget):
    loader = make(data, workers, budget)
    for expected in reference:
        batches = take(loader)
        assert len(batches) == BATCHES == len(loader) and [len(b) for b in batches] == [B] * 31 + [11]
        assert np.array_equal(np.concatenate(batches), expected)
    table = loader.dataset.reader().resident
    assert (table.folder is not None) == (budget is not None)
    if budget is not None:  # its pages are a file's (page cache), not anonymous memory
        maps = open("/proc/self/maps").read()
        assert any(".sparkbridge-rows-" in line and "(deleted)" in line for line in maps.splitlines())
    loader.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_variable_width_columns_read_per_shard(tmp_path_factory, workers):
    """A str column: no row table; each batch is gathered from up to batch_size shards, read
    from decompressed files, memory-mapped, when they do not fit decoded_cache_bytes."""
    rows = 301
    data = tmp_path_factory.getbasetemp() / "global-every"
    if not (data / "index.json").exists():
        write_every_encoding(data, rows, compression="zstd", size_limit=2048)
    order = GlobalOrder(rows=rows, shuffle=True, seed=11, epoch=0, start=0, ranks=1, workers=1, batch_size=B)
    loader = make(data, workers, 1 << 12)
    assert not loader.dataset.resident()
    batches = take(loader, 4)
    state = loader.state_dict()
    loader.close()
    resumed = make(data, 2 - workers, 1 << 12)
    resumed.load_state_dict(state)
    ids = np.concatenate(batches + take(resumed))
    resumed.close()
    assert np.array_equal(ids, order.samples(np.arange(rows)))  # every row once, the global order
    if workers:  # real DataLoader workers, each its batches g % 2: with drop_last the 9 full ones
        dropped = make(data, workers, 1 << 12, drop_last=True)
        batches = take(dropped)
        assert len(dropped) == 9
        dropped.close()
        assert len(batches) == 9 and np.array_equal(np.concatenate(batches), order.samples(np.arange(9 * B)))


def test_drop_last_and_unshuffled(data, reference):
    loader = make(data, 2, drop_last=True)
    batches = take(loader)
    assert len(batches) == len(loader) == 31
    assert np.array_equal(np.concatenate(batches), reference[0][:31 * B])
    loader.close()
    plain = StreamingLoader(data, batch_size=B, shuffle=False, shuffle_algo="global")
    assert np.array_equal(np.concatenate(take(plain)), np.arange(N))
    plain.close()


@pytest.mark.parametrize("k", [1, 13, BATCHES - 1])
@pytest.mark.parametrize("before,after", [((0, None), (2, None)), ((2, 4096), (0, None)), ((0, 4096), (2, 4096))])
def test_resume_at_three_midpoints(data, reference, k, before, after):
    first = make(data, *before)
    seen = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["shuffle_algo"] == "global" and state["sample_in_epoch"] == k * B
    second = make(data, *after)
    second.load_state_dict(state)
    rest = take(second)
    assert len(rest) == BATCHES - k
    got = np.concatenate(seen + rest)
    assert np.array_equal(got, reference[0])  # none lost, none repeated, the uninterrupted order
    assert np.array_equal(np.concatenate(take(second)), reference[1])  # and the next epoch as before
    second.close()


def test_a_state_of_another_order_is_refused(data):
    mosaic = StreamingLoader(data, batch_size=B, shuffle=True, seed=11, shuffle_algo="py1e")
    take(mosaic, 2)
    state = mosaic.state_dict()
    mosaic.close()
    loader = make(data)
    with pytest.raises(StateError, match="shuffle_algo='py1e'.*shuffle_algo='global'"):
        loader.load_state_dict(state)
    loader.close()


def test_the_default_shuffle_is_global_and_unshuffled_stays_mosaics(data, reference):
    default = StreamingLoader(data, batch_size=B, shuffle=True, seed=11)
    assert default.options.shuffle_algo is None and default.options.order_algo is ShuffleAlgo.GLOBAL
    assert np.array_equal(np.concatenate(take(default)), reference[0])
    assert default.state_dict()["shuffle_algo"] == "global"
    default.close()
    plain = StreamingLoader(data, batch_size=B)  # without shuffle: Mosaic's partition, shards in order
    assert plain.options.order_algo is ShuffleAlgo.PY1E
    assert np.concatenate(take(plain)).tolist() == list(range(N))
    assert plain.state_dict()["shuffle_algo"] == "py1e"
    plain.close()


@pytest.mark.parametrize("algo", ["py1e", "py1s"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_default_loader_resumes_a_state_in_the_order_it_names(data, algo, workers):
    """A state saved under Mosaic's order (an older version's default, py1e) resumes in that order
    in a loader left at the default shuffle_algo, this epoch and the next; the state it saves names
    that order again."""
    mosaic = StreamingLoader(data, batch_size=B, shuffle=True, seed=11, shuffle_algo=algo)
    whole = [np.concatenate(take(mosaic)), np.concatenate(take(mosaic))]
    mosaic.close()
    first = StreamingLoader(data, batch_size=B, shuffle=True, seed=11, shuffle_algo=algo)
    head = np.concatenate(take(first, 5))
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = StreamingLoader(data, batch_size=B, shuffle=True, seed=11, num_workers=workers)
    resumed.load_state_dict(state)
    rest = np.concatenate(take(resumed))
    assert np.array_equal(np.concatenate([head, rest]), whole[0])  # none lost, none repeated, Mosaic's order
    assert resumed.state_dict()["shuffle_algo"] == algo
    assert np.array_equal(np.concatenate(take(resumed)), whole[1])  # and its next epoch
    resumed.close()


def test_a_loader_given_an_order_keeps_it(data):
    """Only the default gives way to a saved state's order: a loader given ``shuffle_algo``
    refuses a state of another order, either way round."""
    default = StreamingLoader(data, batch_size=B, shuffle=True, seed=11)
    take(default, 2)
    state = default.state_dict()
    default.close()
    mosaic = StreamingLoader(data, batch_size=B, shuffle=True, seed=11, shuffle_algo="py1e")
    with pytest.raises(StateError, match="shuffle_algo='global'.*shuffle_algo='py1e'"):
        mosaic.load_state_dict(state)
    mosaic.close()
    again = make(data)  # shuffle_algo="global", given: a default loader's state is a global one
    again.load_state_dict(state)
    got = np.concatenate(take(again))
    again.close()
    reference = GlobalOrder(rows=N, shuffle=True, seed=11, epoch=0, start=0, ranks=1, workers=1, batch_size=B)
    assert np.array_equal(got, reference.samples(np.arange(2 * B, N)))


def test_an_unknown_algo_is_named(data):
    with pytest.raises(ValueError, match=r"shuffle_algo must be one of \['py1e'.*'global'\], got 'globl'"):
        StreamingLoader(data, batch_size=B, shuffle_algo="globl")


def test_rank_shares_of_every_world_size_and_an_elastic_resume():
    """GlobalOrder alone: for 1..5 ranks x 1..3 workers, the ranks' batches are disjoint and
    cover every row (padding: up to ranks - 1 repeats, equal batch counts); resuming a pass
    stopped by 3 ranks with 2 (and 5) ranks reads exactly the rows not read yet."""
    n = 1001
    for ranks in range(1, 6):
        for workers in (1, 3):
            order = GlobalOrder(rows=n, shuffle=True, seed=1, epoch=2, start=0, ranks=ranks, workers=workers,
                                batch_size=16)
            shares = [[b for w in range(workers) for b in order.batches(r, worker=w, drop_last=False)]
                      for r in range(ranks)]
            counts = {order.batch_count(r, drop_last=False) for r in range(ranks)} | {len(s) for s in shares}
            assert len(counts) == 1  # every rank takes as many batches (no DDP hang)
            rows = np.concatenate([np.concatenate(s) for s in shares])
            assert set(rows.tolist()) == set(range(n)) and len(rows) == -(-n // ranks) * ranks
            once = order.without_padding()
            rows = np.concatenate([b for r in range(ranks) for b in once.batches(r, drop_last=False)])
            assert sorted(rows.tolist()) == list(range(n))
    stopped = GlobalOrder(rows=n, shuffle=True, seed=1, epoch=0, start=0, ranks=3, workers=2, batch_size=16)
    read = [np.concatenate(list(stopped.batches(r, drop_last=False))[:5]) for r in range(3)]
    for ranks in (2, 5):
        resumed = GlobalOrder(rows=n, shuffle=True, seed=1, epoch=0, start=5 * 16 * 3, ranks=ranks, workers=1,
                              batch_size=10, pad_ranks=False)
        rest = [b for r in range(ranks) for b in resumed.batches(r, drop_last=False)]
        assert sorted(np.concatenate(read + rest).tolist()) == list(range(n))


@pytest.mark.slow
def test_torchrun_two_ranks_then_resume_alone(tmp_path):
    from pathlib import Path

    rows = 1001  # odd: one row repeated so both ranks take as many batches
    data = write_numeric(tmp_path / "ds", rows, compression="zstd", size_limit=4000)
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(Path(__file__).with_name("global_ranks.py"), out, data, 7, timeout=300)
    assert proc.returncode == 0, proc.stderr[:6000]  # the first rank to fail says why
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for workers in (0, 2):
        a, b = (r[f"epoch{workers}"] for r in ranks)
        assert a["world"] == b["world"] == 2
        assert a["batches"] == b["batches"] == a["len"] == b["len"] == 32  # 501 rows each, batches of 16
        assert len(a["ids"]) == len(b["ids"]) == 501
        assert set(a["ids"]) | set(b["ids"]) == set(range(rows))  # complete
        assert len(a["ids"]) + len(b["ids"]) - len(set(a["ids"]) | set(b["ids"])) == 1  # one repeat, the pad
        assert len(set(a["ids"])) == len(set(b["ids"])) == 501
    assert ranks[0]["epoch0"] == ranks[0]["epoch2"] and ranks[1]["epoch0"]["ids"] == ranks[1]["epoch2"]["ids"]
    a, b = (r["once"] for r in ranks)
    assert sorted(a["ids"] + b["ids"]) == list(range(rows))  # pad_ranks=False: every row exactly once
    # elastic: 2 ranks stopped after 7 batches each; one process reads the rest
    a, b = (r["stopped"] for r in ranks)
    assert a["state"] == b["state"] and a["state"]["sample_in_epoch"] == 7 * 16 * 2
    alone = StreamingLoader(data, batch_size=16, shuffle=True, seed=3, shuffle_algo="global", num_workers=0)
    alone.load_state_dict(a["state"])
    rest = np.concatenate(take(alone)).tolist()
    alone.close()
    assert sorted(a["ids"] + b["ids"] + rest) == list(range(rows))  # none lost, none repeated


def test_lazy_spanner_maps_as_mosaics():
    """bridge/mosaic.py replaces Mosaic's Spanner (an int64 per sample at build) by a binary
    search: the same (shard, index) for every sample, empty shards included."""
    from streaming.base.spanner import Spanner

    from sparkbridge.bridge.mosaic import LazySpanner

    sizes = np.array([5, 0, 7, 1, 0, 0, 3000, 2, 1024], dtype=np.int64)
    mosaic, lazy = Spanner(sizes.copy()), LazySpanner(sizes.copy())
    for i in range(int(sizes.sum())):
        shard, row = mosaic[i]
        assert lazy[i] == (int(shard), int(row))
    for bad in (-1, int(sizes.sum())):
        with pytest.raises(IndexError, match="Invalid sample index"):
            lazy[bad]


def test_no_disk_for_the_mapped_table_is_a_clear_error(data, tmp_path):
    """The mapped row table's blocks are allocated up front: without the space (here a file size
    limit) the loader says how much it needs where, instead of dying of SIGBUS mid-epoch."""
    import subprocess
    import sys

    code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from sparkbridge.bridge import StreamingLoader
try:  # the table is made, and its fill started, when the loader is built
    loader = StreamingLoader({str(data)!r}, batch_size=32, shuffle=True, shuffle_algo="global", decoded_cache_bytes=4096)
except OSError as exc:
    print("ERROR", exc)
"""
    env = dict(__import__("os").environ, SPARKBRIDGE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"needs {N * 16:,} bytes of local disk in {tmp_path / 'cache'}" in proc.stdout, proc.stdout + proc.stderr[-2000:]
