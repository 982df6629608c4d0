"""``sparkbridge.bridge.order_ahead.OrderAhead``: a global order's ids computed a chunk ahead in a
thread give exactly the batches of ``GlobalOrder.batches`` (every row once, the same order), for
any chunk size, rank, start and padding; the loader requests the next epoch's first chunk, and a
resume at a chunk's middle, edge or last batch reads the uninterrupted order."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader, order_ahead
from sparkbridge.bridge.order import GlobalOrder
from sparkbridge.bridge.order_ahead import OrderAhead
from tests.bridge.util import process_alive, take, write_numeric


def per_batch(order: GlobalOrder, rank: int, drop_last: bool) -> list[list[int]]:
    """The rank's batches from the pass's definition, one ``_batch_span`` at a time (no chunks,
    no blocks): the reference."""
    perm = order.permutation()
    out = []
    for g in range(order.batch_count(rank, drop_last=drop_last)):
        s, n = order._batch_span(rank, g)
        out.append(order.samples(np.arange(s, s + n), perm).tolist())
    return out


CASES = [  # rows, ranks, start, batch size, pad_ranks, shuffle
    (1003, 1, 0, 32, True, True),
    (1003, 3, 0, 32, True, True),
    (1003, 3, 0, 32, False, True),
    (1003, 2, 417, 10, True, True),
    (1003, 4, 999, 16, False, True),
    (64, 2, 0, 32, True, True),  # exactly one global batch
    (7, 5, 0, 4, True, True),  # fewer rows than a global batch
    (1003, 3, 0, 32, True, False),
    (0, 1, 0, 8, True, True),
]


@pytest.mark.parametrize("rows,ranks,start,b,pad,shuffle", CASES)
@pytest.mark.parametrize("chunk", [1, 32 * 3, 1 << 20])
def test_chunks_give_the_batches_of_the_order(monkeypatch, rows, ranks, start, b, pad, shuffle, chunk):
    monkeypatch.setattr(order_ahead, "CHUNK_POSITIONS", chunk)
    order = GlobalOrder(rows=rows, shuffle=shuffle, seed=5, epoch=1, start=start, ranks=ranks, workers=2,
                        batch_size=b, pad_ranks=pad)
    ahead = OrderAhead()
    try:
        for drop_last in (False, True):
            read = []
            for rank in range(ranks):
                expected = per_batch(order, rank, drop_last)
                ahead.request_first(order, rank, drop_last=drop_last)  # half the time computed ahead
                got = [ids.tolist() for ids in ahead.batches(order, rank, drop_last=drop_last)]
                assert got == expected
                assert got == [ids.tolist() for ids in order.batches(rank, drop_last=drop_last)]
                # each worker's share, interleaved, is the rank's batches (any num_workers)
                shares = [list(order.batches(rank, worker=w, drop_last=drop_last)) for w in range(2)]
                assert [shares[g % 2][g // 2].tolist() for g in range(len(expected))] == expected
                read += sum(got, [])
            if not drop_last:  # the ranks together: every remaining row, padded with repeats or not
                rest = list(range(rows))
                if shuffle and rows:
                    rest = order.permutation()(np.arange(start, rows)).tolist()
                else:
                    rest = rest[start:]
                assert sorted(set(read)) == sorted(rest)
                assert len(read) == len(rest) + order.padding
    finally:
        ahead.close()


def test_unread_chunks_are_bounded_and_errors_reach_the_reader(monkeypatch):
    monkeypatch.setattr(order_ahead, "CHUNK_POSITIONS", 64)
    ahead = OrderAhead()
    orders = [GlobalOrder(rows=1000, shuffle=True, seed=1, epoch=e, start=0, ranks=1, workers=1, batch_size=16)
              for e in range(5)]
    for order in orders:
        ahead.request_first(order, 0, drop_last=False)
    assert len(ahead._futures) == order_ahead.KEEP
    ahead.clear()
    assert not ahead._futures

    class Broken(GlobalOrder):
        def ids(self, rank, batches, perm=None):
            raise RuntimeError(f"broken order, thread {threading.current_thread().name}")

    broken = Broken(rows=1000, shuffle=True, seed=1, epoch=0, start=0, ranks=1, workers=1, batch_size=16)
    ahead.request_first(broken, 0, drop_last=False)
    with pytest.raises(RuntimeError, match="broken order, thread sparkbridge-order-ahead"):
        next(iter(ahead.batches(broken, 0, drop_last=False)))
    ahead.close()


N, B = 1003, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("ahead") / "ds", N, compression="zstd", size_limit=3000)


def make(data, workers=0, budget=None):
    return StreamingLoader(data, batch_size=B, shuffle=True, seed=11, shuffle_algo="global", num_workers=workers,
                           decoded_cache_bytes=budget)


@pytest.mark.parametrize("workers,budget", [(0, None), (2, None), (0, 4096)])
def test_the_loader_reads_chunks_and_requests_the_next_epochs_first(monkeypatch, data, workers, budget):
    monkeypatch.setattr(order_ahead, "CHUNK_POSITIONS", 5 * B)  # 7 chunks an epoch
    loader = make(data, workers, budget)
    ahead = loader._snapshot._ids_ahead
    orders = [GlobalOrder(rows=N, shuffle=True, seed=11, epoch=e, start=0, ranks=1, workers=max(1, workers),
                          batch_size=B) for e in range(4)]
    for e in range(3):
        got = np.concatenate(take(loader))
        assert np.array_equal(got, orders[e].samples(np.arange(N)))
        # the next epoch's first chunk was requested as this epoch's last one started
        assert [k[:3] for k in ahead._futures] == [(orders[e + 1], 0, 0)]
    loader.close()
    assert not ahead._futures and ahead._executor is None


@pytest.mark.parametrize("k", [1, 4, 5, 6, 31])  # inside the first chunk, its last batch, the next's first...
def test_resume_inside_and_at_the_edges_of_chunks(monkeypatch, data, k):
    monkeypatch.setattr(order_ahead, "CHUNK_POSITIONS", 5 * B)
    reference = GlobalOrder(rows=N, shuffle=True, seed=11, epoch=0, start=0, ranks=1, workers=1,
                            batch_size=B).samples(np.arange(N))
    first = make(data)
    seen = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    second = make(data, 2)
    second.load_state_dict(state)
    rest = take(second)
    second.close()
    assert np.array_equal(np.concatenate(seen + rest), reference)


@pytest.mark.parametrize("chunk", [5 * B, B // 2])  # through shared memory; larger than it: through the pipe
def test_the_order_process_computes_the_chunks_once_forked(monkeypatch, data, chunk):
    """A resident table's loader forks its order process at a pass's start, when nothing of it is
    busy; from then on that process computes the chunks (the thread only waits for them), with the
    same ids, and a state saved then resumes exactly."""
    monkeypatch.setattr(order_ahead, "CHUNK_POSITIONS", chunk)
    loader = make(data)
    orders = [GlobalOrder(rows=N, shuffle=True, seed=11, epoch=e, start=0, ranks=1, workers=1, batch_size=B)
              for e in range(4)]
    assert np.array_equal(np.concatenate(take(loader)), orders[0].samples(np.arange(N)))
    snap = loader._snapshot
    while snap._ids_ahead.pending():  # epoch 1's first chunk, from the thread
        time.sleep(0.01)
    it = iter(loader)  # epoch 1 starts: nothing is busy, the process is forked
    assert snap._orders is not None and snap._ids_ahead.helper is not None
    calls = []
    real = snap._orders.compute_ids
    monkeypatch.setattr(snap._orders, "compute_ids", lambda *a: calls.append(a[1:]) or real(*a))
    assert np.array_equal(np.concatenate([b["id"].numpy() for b in it]), orders[1].samples(np.arange(N)))
    assert np.array_equal(np.concatenate(take(loader)), orders[2].samples(np.arange(N)))
    assert calls and all(rank == 0 for rank, _, _ in calls)  # the chunks came from the process
    it = iter(loader)
    seen = [next(it)["id"].numpy().copy() for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    again = make(data)
    again.load_state_dict(state)
    assert np.array_equal(np.concatenate(seen + take(again)), orders[3].samples(np.arange(N)))
    again.close()


def test_a_killed_order_process_leaves_the_chunks_to_the_thread(data, caplog):
    loader = make(data)
    orders = [GlobalOrder(rows=N, shuffle=True, seed=11, epoch=e, start=0, ranks=1, workers=1, batch_size=B)
              for e in range(4)]
    for e in range(2):
        assert np.array_equal(np.concatenate(take(loader)), orders[e].samples(np.arange(N)))
    snap = loader._snapshot
    assert snap._orders is not None
    pid = snap._orders.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    snap._ids_ahead.clear()  # a chunk it may have computed before dying: ask again
    with caplog.at_level("WARNING", logger="sparkbridge.bridge.epochs"):
        for e in (2, 3):
            assert np.array_equal(np.concatenate(take(loader)), orders[e].samples(np.arange(N)))
    assert snap._orders is None and snap._ids_ahead.helper is None  # and none is forked again
    assert any(f"pid {pid}" in r.getMessage() and "in a thread" in r.getMessage() for r in caplog.records)
    loader.close()


def test_an_error_in_the_order_process_is_raised_here(data):
    loader = make(data)
    for _ in range(2):
        take(loader)
    helper = loader._snapshot._orders
    bad = GlobalOrder(rows=(1 << 62) + 1, shuffle=True, seed=11, epoch=0, start=0, ranks=1, workers=1, batch_size=B)
    with pytest.raises(ValueError, match=r"a permutation is over \[0, n\) with 0 <= n <= 2\^62"):
        helper.compute_ids(bad, 0, 0, 3)
    good = GlobalOrder(rows=N, shuffle=True, seed=11, epoch=0, start=0, ranks=2, workers=1, batch_size=B)
    ids, lengths = helper.compute_ids(good, 1, 0, 3)  # it answers the next request
    assert np.array_equal(ids, good.ids(1, np.arange(3))[0]) and lengths.tolist() == [B] * 3
    loader.close()
